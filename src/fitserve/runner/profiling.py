"""A forward pass of the full token budget, so the activation peak is known before the
KV cache takes the rest of the device's memory budget."""

from __future__ import annotations

import torch

from fitserve.config import ArchConfig
from fitserve.core.interfaces import KVCapacity
from fitserve.core.outputs import ScheduledRequest
from fitserve.runner.input_batch import build_forward_batch
from fitserve.runner.model_runner import allocate_kv_cache
from fitserve.sampling_params import SamplingParams

PROFILE_BLOCK_SIZE = 16


@torch.inference_mode()
def profile_forward(model: torch.nn.Module, arch: ArchConfig, num_tokens: int, device: torch.device) -> int:
    """Run one prefill of `num_tokens` tokens through a throw-away cache and return the
    peak bytes torch allocated (weights + activations, the throw-away cache left out)."""
    num_blocks = -(-num_tokens // PROFILE_BLOCK_SIZE)
    capacity = KVCapacity(num_blocks, PROFILE_BLOCK_SIZE)
    caches = allocate_kv_cache(arch, capacity, next(model.parameters()).dtype, device)
    cache_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in caches)
    model.bind_kv_cache(caches)
    chunk = ScheduledRequest(
        request_id="profile",
        token_ids=tuple([0] * num_tokens),
        num_computed_tokens=0,
        block_table=tuple(range(num_blocks)),
        samples=True,
        sampling_params=SamplingParams(),
    )
    batch = build_forward_batch((chunk,), PROFILE_BLOCK_SIZE, device)
    hidden = model(batch)
    model.compute_logits(hidden[batch.logits_indices])
    torch.cuda.synchronize(device)
    model.bind_kv_cache(allocate_kv_cache(arch, KVCapacity(0, PROFILE_BLOCK_SIZE), caches[0][0].dtype, device))
    del caches, hidden
    torch.cuda.empty_cache()
    # The throw-away cache is not activation memory: take it out of the recorded peak.
    peak_bytes = torch.cuda.max_memory_allocated(device) - cache_bytes
    torch.cuda.reset_peak_memory_stats(device)
    return peak_bytes
