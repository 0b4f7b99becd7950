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

from dataclasses import replace

from fitserve.arch_config import ArchConfig
from fitserve.config import DEFAULT_CPU_KV_CACHE_BYTES, ConfigError
from fitserve.plan import estimates
from fitserve.plan.memory_plan import (  # noqa: F401  (the plan's types, imported from here by its users)
    MemoryBreakdown,
    MemoryPlan,
    PlanInputs,
    PlanProblem,
    blocks_for_tokens,
    kv_blocks_for_budget,
)
from fitserve.plan.problems import find_problems
from fitserve.plan.shapes import (
    DTYPE_BYTES,
    FP8_QUANTIZATIONS,
    WeightBytes,
    kv_block_bytes,
    kv_dtype_name,
    weight_bytes,
)

def estimated_breakdown(inputs: PlanInputs, weights: WeightBytes) -> MemoryBreakdown:
    act_bytes = DTYPE_BYTES[inputs.dtype]
    fp8_linear = inputs.quantization in FP8_QUANTIZATIONS
    if not inputs.on_gpu:
        return MemoryBreakdown(weights.total_bytes, 0, 0, 0)
    activation = estimates.activation_peak_bytes(
        inputs.rank_arch, inputs.max_num_batched_tokens, inputs.max_num_seqs, act_bytes, fp8_linear
    )
    if inputs.param_counts.packed_always:  # an integer checkpoint: many rows dequantize into a scratch
        activation += estimates.dequant_scratch_bytes(inputs.rank_arch, inputs.max_num_batched_tokens, act_bytes)
    elif inputs.quantization == "gguf":  # GGUF blocks: from a few rows
        activation += estimates.dequant_scratch_bytes(inputs.rank_arch, inputs.max_num_batched_tokens, act_bytes,
                                                      gguf=True)
    graphs = (
        estimates.cuda_graph_pool_bytes(inputs.rank_arch, inputs.max_num_seqs, act_bytes, fp8_linear)
        if inputs.cuda_graphs else 0
    )
    return MemoryBreakdown(weights.total_bytes, activation, estimates.RUNTIME_NON_TORCH_BYTES, graphs)


def plan_memory(inputs: PlanInputs, breakdown: MemoryBreakdown | None = None) -> MemoryPlan:
    """The plan for `inputs`; with `breakdown` (measured at start-up) in place of the estimates."""
    weights = weight_bytes(inputs.param_counts.per_rank(inputs.tensor_parallel_size), inputs.dtype,
                           inputs.quantization)
    breakdown = breakdown or estimated_breakdown(inputs, weights)
    kv_dtype = kv_dtype_name(inputs.kv_cache_dtype, inputs.dtype)
    block_bytes = kv_block_bytes(inputs.rank_arch, kv_dtype, inputs.block_size)
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
    return replace(plan, problems=tuple(find_problems(plan, plan_memory)))  # messages need a finished plan


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
