"""Peak bytes of live tensors created inside a block, on any device (tests only).

A TorchDispatchMode sees every op's outputs; each new storage counts until its last view
dies. This is what a caching allocator's `max_memory_allocated` would report, without its
rounding, so the planner's activation estimates can be checked on the CPU.
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytesTracker(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}  # data_ptr -> (weak ref, bytes)
        self.live_bytes = 0
        self.peak_bytes = 0

    def _forget_dead(self) -> None:
        for ptr in [p for p, (ref, _) in self._live.items() if ref.expired()]:
            self.live_bytes -= self._live.pop(ptr)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._forget_dead()  # temporaries of earlier ops are gone before this op's outputs count
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in self._live and storage.nbytes() > 0:
                    self._live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
                    self.live_bytes += storage.nbytes()
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return out
