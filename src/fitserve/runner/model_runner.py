"""The torch side of a step: build the batch, run the model, sample.

Implements core.interfaces.ModelRunner. It keeps no request state besides the sampler's
per-request generators, which it drops when the scheduler reports a request finished.
With tensor parallelism rank 0's runner hands each step to the worker ranks (`peers`,
runner/distributed.py) before its own forward; a worker's runner runs `forward_only`.
"""

from __future__ import annotations

from typing import Protocol

import torch

from fitserve.config import ArchConfig
from fitserve.core.interfaces import KVCapacity
from fitserve.core.outputs import RunnerOutput, SchedulerOutput
from fitserve.runner.cuda_graph import DecodeGraphs
from fitserve.runner.input_batch import build_forward_batch
from fitserve.runner.sampler import Sampler


def allocate_kv_cache(
    arch: ArchConfig, capacity: KVCapacity, dtype: torch.dtype, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, K and V each [num_blocks, block_size, num_kv_heads, head_dim]."""
    shape = (capacity.num_blocks, capacity.block_size, arch.num_key_value_heads, arch.head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(arch.num_hidden_layers)
    ]


class StepPeers(Protocol):
    """The other tensor-parallel ranks, as rank 0 sees them (runner.distributed.WorkerGroup)."""

    def send_step(self, scheduler_output: SchedulerOutput) -> None: ...

    def shutdown(self) -> None: ...


class TorchModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        arch: ArchConfig,
        capacity: KVCapacity,
        kv_dtype: torch.dtype,
        device: torch.device,
        seed: int,
        max_num_seqs: int = 256,
        max_model_len: int = 8192,
        use_cuda_graphs: bool = False,
    ) -> None:
        self.model = model
        self.capacity = capacity
        self.device = device
        self.kv_caches = allocate_kv_cache(arch, capacity, kv_dtype, device)
        model.bind_kv_cache(self.kv_caches)
        self.sampler = Sampler(device, seed)
        self.peers: StepPeers | None = None  # set on tensor-parallel rank 0 once the workers are ready
        self.decode_graphs: DecodeGraphs | None = None
        if use_cuda_graphs and device.type == "cuda":
            max_blocks_per_seq = -(-max_model_len // capacity.block_size)
            self.decode_graphs = DecodeGraphs(model, max_num_seqs, max_blocks_per_seq, device)
            self.decode_graphs.capture()

    def kv_capacity(self) -> KVCapacity:
        return self.capacity

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (nothing to do on one GPU)."""
        if self.peers is not None:
            self.peers.shutdown()

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        return self.execute_async(scheduler_output).result()

    @torch.inference_mode()
    def execute_async(self, scheduler_output: SchedulerOutput) -> PendingSample:
        """Queue the step on the device; nothing here waits for the GPU (see PendingSample)."""
        if self.peers is not None:
            self.peers.send_step(scheduler_output)  # the workers run the same forward, in lock-step
        self.sampler.forget(scheduler_output.finished_request_ids)
        scheduled = scheduler_output.scheduled
        if not scheduled:
            return PendingSample((), None)
        if self.decode_graphs is not None and self.decode_graphs.can_run(scheduled):
            logits = self.decode_graphs.run(scheduled, self.capacity.block_size)
            token_ids = self.sampler.sample_tensor(logits, list(scheduled))
            return PendingSample(tuple(c.request_id for c in scheduled), token_ids)
        batch = build_forward_batch(scheduled, self.capacity.block_size, self.device)
        hidden = self.model(batch)  # [T, hidden]
        sampling_chunks = [chunk for chunk in scheduled if chunk.samples]
        if not sampling_chunks:
            return PendingSample((), None)
        logits = self.model.compute_logits(hidden[batch.logits_indices])  # [S_sampling, vocab] float32
        token_ids = self.sampler.sample_tensor(logits, sampling_chunks)
        return PendingSample(tuple(c.request_id for c in sampling_chunks), token_ids)

    @torch.inference_mode()
    def forward_only(self, scheduler_output: SchedulerOutput) -> None:
        """A tensor-parallel worker's step: rank 0's forward (the same graph-or-eager choice, so the
        collectives match), without logits or sampling."""
        scheduled = scheduler_output.scheduled
        if not scheduled:
            return
        if self.decode_graphs is not None and self.decode_graphs.can_run(scheduled):
            self.decode_graphs.replay(scheduled, self.capacity.block_size)
        else:
            self.model(build_forward_batch(scheduled, self.capacity.block_size, self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the graphs' pinned inputs are rewritten next step


class PendingSample:
    """The sampled ids of a queued step; `result()` is the step's one host synchronisation."""

    def __init__(self, request_ids: tuple[str, ...], token_ids: torch.Tensor | None) -> None:
        self.request_ids = request_ids
        self.token_ids = token_ids  # [len(request_ids)] int64 on the device, or None

    def result(self) -> RunnerOutput:
        if self.token_ids is None:
            return RunnerOutput(sampled_token_ids={})
        return RunnerOutput(sampled_token_ids=dict(zip(self.request_ids, self.token_ids.tolist())))
