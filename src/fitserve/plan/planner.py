"""The memory plan: what fits on the card, and how many KV blocks the rest holds (torch-free).

One function sizes the KV cache, `kv_blocks_for_budget`, for `fitserve plan` (with
estimated activation and runtime figures) and for start-up (with measured ones), so the
plan is what the server allocates. On a GPU the budget is vLLM's: total memory x
`--gpu-memory-utilization`, holding weights, the activation peak, memory outside torch that
loading and running add, the CUDA-graph pool and the KV cache; the CUDA context that exists
before any of them is outside it. On the CPU the KV cache is `--kv-cache-memory-bytes`.

With `--tensor-parallel-size N` every figure is one GPU's (every GPU holds the same): 1/N of
the linear layers, all of the embeddings, lm_head and norms, the KV heads of its shard, and
activations with 1/N of the MLP columns; the KV blocks are those one GPU holds, and the cache
holds that many tokens (each token's K and V spread over the N GPUs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from fitserve.config import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_CPU_KV_CACHE_BYTES,
    DEFAULT_GPU_MEMORY_UTILIZATION,
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    DEFAULT_MAX_NUM_SEQS,
    ArchConfig,
    ConfigError,
)
from fitserve.plan import estimates
from fitserve.plan.shapes import (
    DTYPE_BYTES,
    ParamCounts,
    WeightBytes,
    kv_bytes_per_token,
    kv_dtype_name,
    weight_bytes,
)

UTILIZATION_STEP = 0.01  # suggested utilizations are rounded to this, up (need) or down (limit)


@dataclass(frozen=True, slots=True)
class PlanInputs:
    arch: ArchConfig
    model_name: str
    param_counts: ParamCounts
    max_model_len: int
    dtype: str = "bfloat16"  # resolved: bfloat16, float16 or float32
    quantization: str | None = None  # None or "fp8" (linear layers)
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

    def requests_at(self, context_tokens: int) -> int:
        """Requests of `context_tokens` tokens the KV cache holds at once (not capped by max_num_seqs)."""
        return self.num_kv_blocks // blocks_for_tokens(context_tokens, self.inputs.block_size)

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


def estimated_breakdown(inputs: PlanInputs, weights: WeightBytes) -> MemoryBreakdown:
    act_bytes = DTYPE_BYTES[inputs.dtype]
    fp8_linear = inputs.quantization is not None
    if not inputs.on_gpu:
        return MemoryBreakdown(weights.total_bytes, 0, 0, 0)
    activation = estimates.activation_peak_bytes(
        inputs.rank_arch, inputs.max_num_batched_tokens, inputs.max_num_seqs, act_bytes, fp8_linear
    )
    graphs = (
        estimates.cuda_graph_pool_bytes(inputs.rank_arch, inputs.max_num_seqs, act_bytes, fp8_linear)
        if inputs.cuda_graphs else 0
    )
    return MemoryBreakdown(weights.total_bytes, activation, estimates.RUNTIME_NON_TORCH_BYTES, graphs)


def plan_memory(inputs: PlanInputs, breakdown: MemoryBreakdown | None = None) -> MemoryPlan:
    """The plan for `inputs`; with `breakdown` (measured at start-up) in place of the estimates."""
    from fitserve.plan.problems import find_problems  # messages need a finished plan

    weights = weight_bytes(inputs.param_counts.per_rank(inputs.tensor_parallel_size), inputs.dtype,
                           inputs.quantization)
    breakdown = breakdown or estimated_breakdown(inputs, weights)
    kv_dtype = kv_dtype_name(inputs.kv_cache_dtype, inputs.dtype)
    block_bytes = kv_bytes_per_token(inputs.rank_arch, kv_dtype) * inputs.block_size
    budget, outside = _budget(inputs, block_bytes)
    if not inputs.on_gpu:
        kv_budget = budget
    elif inputs.num_gpu_blocks_override is not None:
        kv_budget = inputs.num_gpu_blocks_override * block_bytes
    elif inputs.kv_cache_memory_bytes is not None:
        kv_budget = inputs.kv_cache_memory_bytes
    else:
        kv_budget = budget - breakdown.non_kv_bytes
    plan = MemoryPlan(
        inputs=inputs, weights=weights, breakdown=breakdown, kv_dtype=kv_dtype, kv_block_bytes=block_bytes,
        budget_bytes=budget, outside_budget_bytes=outside, kv_budget_bytes=kv_budget,
        num_kv_blocks=kv_blocks_for_budget(kv_budget, block_bytes),
    )
    return replace(plan, problems=tuple(find_problems(plan)))


def _budget(inputs: PlanInputs, block_bytes: int) -> tuple[int, int]:
    """(budget bytes, bytes held outside the budget before start-up)."""
    if not inputs.on_gpu:
        if inputs.num_gpu_blocks_override is not None:
            return inputs.num_gpu_blocks_override * block_bytes, 0
        return inputs.kv_cache_memory_bytes or DEFAULT_CPU_KV_CACHE_BYTES, 0
    total = inputs.device_total_bytes
    assert total is not None
    free = inputs.device_free_bytes if inputs.device_free_bytes is not None else total - estimates.CUDA_CONTEXT_BYTES
    return int(total * inputs.gpu_memory_utilization), total - free


def concurrency_contexts(max_model_len: int) -> list[int]:
    """Context lengths the report shows: powers of two from 512 up to max_model_len, and it."""
    lengths = [1 << n for n in range(9, 21) if (1 << n) < max_model_len]
    return lengths + [max_model_len]


def resolve_max_model_len(asked: int | None, arch: ArchConfig) -> int:
    """--max-model-len, or the model's context; longer than the model's context is an error."""
    model_max = arch.max_position_embeddings
    if asked is None:
        return model_max
    if asked > model_max:
        raise ConfigError(
            f"--max-model-len {asked} is longer than the model's context of {model_max} tokens "
            f"(max_position_embeddings). Use --max-model-len {model_max} or less."
        )
    return asked
