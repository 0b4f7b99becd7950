"""How many KV blocks the device holds for the configured budget.

CPU: the budget is `--kv-cache-memory-bytes` (default 1 GiB), since a machine's RAM is
shared with everything else and "a fraction of all memory" means little there.
CUDA: vLLM's meaning of `--gpu-memory-utilization`: total device memory x utilization,
minus the weights and the activation peak this process has reached (measured after a
profiling forward), minus memory held outside torch (CUDA context, other processes).
"""

from __future__ import annotations

import logging

import torch

from fitserve.config import DEFAULT_CPU_KV_CACHE_BYTES, ArchConfig, CacheConfig, ConfigError
from fitserve.core.interfaces import KVCapacity

logger = logging.getLogger(__name__)
GIB = 1 << 30


def kv_block_bytes(arch: ArchConfig, block_size: int, kv_dtype: torch.dtype) -> int:
    return arch.kv_elements_per_token * block_size * kv_dtype.itemsize


def kv_capacity_for_budget(
    cache: CacheConfig, arch: ArchConfig, kv_dtype: torch.dtype, device: torch.device, torch_peak_bytes: int = 0
) -> KVCapacity:
    """Blocks that fit the budget. On CUDA, `torch_peak_bytes` is what profile_forward measured."""
    if cache.num_gpu_blocks_override is not None:
        return KVCapacity(cache.num_gpu_blocks_override, cache.block_size)
    block_bytes = kv_block_bytes(arch, cache.block_size, kv_dtype)
    if cache.kv_cache_memory_bytes is not None:
        budget_bytes = cache.kv_cache_memory_bytes
    elif device.type == "cuda":
        budget_bytes = _cuda_kv_budget_bytes(cache.gpu_memory_utilization, device, torch_peak_bytes)
    else:
        budget_bytes = DEFAULT_CPU_KV_CACHE_BYTES
    num_blocks = budget_bytes // block_bytes
    if num_blocks < 1:
        raise ConfigError(
            f"No memory is left for the KV cache: one block of {cache.block_size} tokens needs "
            f"{block_bytes / 2**20:.1f} MiB but the budget leaves {max(budget_bytes, 0) / GIB:.2f} GiB. "
            "Raise --gpu-memory-utilization (or --kv-cache-memory-bytes), or use a smaller model."
        )
    return KVCapacity(int(num_blocks), cache.block_size)


def _cuda_kv_budget_bytes(utilization: float, device: torch.device, torch_peak_bytes: int) -> int:
    free_bytes, total_bytes = torch.cuda.mem_get_info(device)
    non_torch_bytes = (total_bytes - free_bytes) - torch.cuda.memory_reserved(device)
    budget_bytes = int(total_bytes * utilization)
    kv_bytes = budget_bytes - torch_peak_bytes - non_torch_bytes
    logger.info(
        "GPU memory: %.2f GiB total, budget %.2f GiB (utilization %.2f); weights + activation peak %.2f GiB, "
        "outside torch %.2f GiB; KV cache %.2f GiB",
        total_bytes / GIB, budget_bytes / GIB, utilization, torch_peak_bytes / GIB,
        non_torch_bytes / GIB, kv_bytes / GIB,
    )
    return kv_bytes


def check_max_model_len_fits(capacity: KVCapacity, max_model_len: int) -> None:
    if capacity.num_tokens < max_model_len:
        raise ConfigError(
            f"The KV cache holds {capacity.num_tokens} tokens ({capacity.num_blocks} blocks of "
            f"{capacity.block_size}), fewer than --max-model-len {max_model_len}, so one long request could "
            f"never run. Set --max-model-len {capacity.num_tokens} or less, or give the cache more memory "
            "(--kv-cache-memory-bytes on the CPU, --gpu-memory-utilization on a GPU)."
        )
