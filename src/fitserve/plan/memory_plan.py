"""The memory plan's types: what goes in, what the budget holds, and the plan with its problems (torch-free).

plan/planner.py makes a plan (plan_memory); plan/problems.py says why one does not fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fitserve.arch_config import ArchConfig
from fitserve.config import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_GPU_MEMORY_UTILIZATION,
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    DEFAULT_MAX_NUM_SEQS,
    ConfigError,
)
from fitserve import kv_groups
from fitserve.plan.shapes import ParamCounts, WeightBytes

UTILIZATION_STEP = 0.01  # suggested utilizations are rounded to this, up (need) or down (limit)


@dataclass(frozen=True, slots=True)
class PlanInputs:
    arch: ArchConfig
    model_name: str
    param_counts: ParamCounts
    max_model_len: int
    dtype: str = "bfloat16"  # resolved: bfloat16, float16 or float32
    quantization: str | None = None  # None, "fp8", "fp8_per_tensor" or "gguf" (linear layers)
    kv_cache_dtype: str = "auto"  # "auto" (= dtype) or an fp8 name
    device_total_bytes: int | None = None  # None: the CPU
    device_free_bytes: int | None = None  # measured at start-up; None: total minus a CUDA context
    gpu_name: str | None = None
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    kv_cache_memory_bytes: int | None = None
    num_gpu_blocks_override: int | None = None
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    block_size: int = DEFAULT_BLOCK_SIZE
    cuda_graphs: bool = True  # False with --enforce-eager
    tensor_parallel_size: int = 1  # GPUs the model is split over; every figure of the plan is per GPU

    @property
    def on_gpu(self) -> bool:
        return self.device_total_bytes is not None

    @property
    def fixed_kv_cache(self) -> bool:
        """The KV cache's size is given (--kv-cache-memory-bytes or --num-gpu-blocks-override), not
        what --gpu-memory-utilization leaves after the rest."""
        return self.kv_cache_memory_bytes is not None or self.num_gpu_blocks_override is not None

    @property
    def kv_windows(self) -> tuple[int | None, ...]:
        """The window of each KV cache group (kv_groups.py): one entry unless the model is hybrid."""
        return kv_groups.kv_layout(self.arch.layer_windows).windows

    @property
    def rank_arch(self) -> ArchConfig:
        """One GPU's shapes (ConfigError when the size does not divide the heads or MLP columns)."""
        return self.arch.shard(self.tensor_parallel_size)


@dataclass(frozen=True, slots=True)
class MemoryBreakdown:
    """What the budget holds besides the KV cache."""

    weights_bytes: int
    activation_peak_bytes: int  # forward of the token budget, logits and sampling
    runtime_non_torch_bytes: int  # outside torch's allocator, added by loading and running
    cuda_graph_bytes: int  # the decode graphs' pool (0 on the CPU or with --enforce-eager)

    @property
    def non_kv_bytes(self) -> int:
        return self.weights_bytes + self.activation_peak_bytes + self.runtime_non_torch_bytes + self.cuda_graph_bytes


@dataclass(frozen=True, slots=True)
class PlanProblem:
    kind: str  # "free_memory", "weights", "no_kv", "kv_exceeds_free", "max_model_len", "concurrency"
    fatal: bool  # False: a warning
    message: str  # one paragraph with the numbers and the flag that fixes it


def kv_blocks_for_budget(kv_budget_bytes: int, block_bytes: int) -> int:
    """The one sizing rule: whole blocks of what is left, never negative."""
    return max(kv_budget_bytes, 0) // block_bytes


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def request_blocks(inputs: PlanInputs, context_tokens: int) -> int:
    """KV blocks one decoding request of `context_tokens` holds: all of its context, or with a sliding
    window at most ceil(window / block_size) + 1 (core/kv_cache_manager.py frees the rest); a model
    mixing windowed and full layers holds that in each of its KV cache groups (kv_groups.py)."""
    return kv_groups.request_blocks(inputs.kv_windows, context_tokens, inputs.block_size)


def request_kv_tokens(inputs: PlanInputs) -> int:
    """The most KV tokens (blocks x block_size, over every group) one --max-model-len request holds at
    once: its whole context, or with a window the window plus a step's chunk (a prefill chunk is
    stored before older blocks are freed)."""
    windows = inputs.kv_windows
    if windows == (None,):
        return inputs.max_model_len
    if len(windows) == 1:
        chunk_blocks = blocks_for_tokens(windows[0] + inputs.max_num_batched_tokens, inputs.block_size) + 1
        return min(inputs.max_model_len, chunk_blocks * inputs.block_size)
    return kv_groups.peak_request_blocks(windows, inputs.max_model_len, inputs.block_size,
                                         inputs.max_num_batched_tokens) * inputs.block_size


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    inputs: PlanInputs
    weights: WeightBytes
    breakdown: MemoryBreakdown
    kv_dtype: str
    kv_block_bytes: int
    budget_bytes: int  # GPU: total x utilization; CPU: the KV cache bytes
    outside_budget_bytes: int  # GPU: what is in use before fitserve allocates (CUDA context, others)
    kv_budget_bytes: int  # what the budget leaves for the KV cache (negative: it does not fit)
    num_kv_blocks: int
    problems: tuple[PlanProblem, ...] = field(default=())

    @property
    def kv_tokens(self) -> int:
        return self.num_kv_blocks * self.inputs.block_size

    @property
    def kv_cache_bytes(self) -> int:
        return self.num_kv_blocks * self.kv_block_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes a token costs: every layer's K and V, or for a model mixing windowed and full layers
        what a --max-model-len request holds divided by its tokens (windowed layers hold their window)."""
        if len(self.inputs.kv_windows) == 1:
            return self.kv_block_bytes // self.inputs.block_size
        context = max(self.inputs.max_model_len, 1)
        return request_blocks(self.inputs, context) * self.kv_block_bytes // context

    @property
    def fits(self) -> bool:
        return not any(p.fatal for p in self.problems)

    @property
    def headroom_bytes(self) -> int | None:
        """GPU memory neither budgeted nor held before start-up."""
        total = self.inputs.device_total_bytes
        if total is None:
            return None
        used = self.outside_budget_bytes + self.breakdown.non_kv_bytes + self.kv_cache_bytes
        return total - used

    @property
    def max_usable_utilization(self) -> float | None:
        """The largest --gpu-memory-utilization the free memory can give."""
        total = self.inputs.device_total_bytes
        if total is None:
            return None
        return _floor_step((total - self.outside_budget_bytes) / total)

    @property
    def kv_size_text(self) -> str:
        """The cache's size for people: tokens, or the blocks of a pool shared by KV cache groups (whose
        tokens are no single request's)."""
        if len(self.inputs.kv_windows) == 1:
            return f"{self.kv_tokens} tokens"
        return (f"{self.num_kv_blocks} blocks of {self.inputs.block_size} tokens "
                f"(shared by {len(self.inputs.kv_windows)} KV cache groups)")

    @property
    def max_request_tokens(self) -> int:
        """The longest request the cache holds (its blocks in every KV cache group; a windowed group
        holds its window and a step's chunk)."""
        i = self.inputs
        longest = kv_groups.max_request_tokens(i.kv_windows, self.num_kv_blocks, i.block_size, i.max_num_batched_tokens)
        return self.kv_tokens if longest is None else longest

    def requests_at(self, context_tokens: int) -> int:
        """Requests of `context_tokens` tokens the KV cache holds at once (not capped by max_num_seqs)."""
        return self.num_kv_blocks // request_blocks(self.inputs, context_tokens)

    def utilization_for_kv_tokens(self, kv_tokens: int) -> float | None:
        """Smallest utilization whose budget holds the non-KV memory and `kv_tokens` of cache."""
        total = self.inputs.device_total_bytes
        if total is None:
            return None
        need = self.breakdown.non_kv_bytes + blocks_for_tokens(kv_tokens, self.inputs.block_size) * self.kv_block_bytes
        return _ceil_step(need / total)

    def raise_if_fatal(self) -> None:
        fatal = [p for p in self.problems if p.fatal]
        if fatal:
            raise ConfigError(fatal[0].message)


def _ceil_step(fraction: float) -> float:
    return round(math.ceil(round(fraction / UTILIZATION_STEP, 6)) * UTILIZATION_STEP, 2)


def _floor_step(fraction: float) -> float:
    return round(math.floor(round(fraction / UTILIZATION_STEP, 6)) * UTILIZATION_STEP, 2)
