"""Why a plan does not fit, in one paragraph each: the numbers, and the flag that fixes it.

The same messages stop `fitserve serve` before it loads a weight (as a ConfigError, exit
code 2, no stack trace) and appear in `fitserve plan`'s verdict.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

from fitserve.plan.memory_plan import MemoryPlan, PlanInputs, PlanProblem, request_kv_tokens
from fitserve.plan.shapes import WeightBytes
from fitserve.plan.units import gib

Replan = Callable[[PlanInputs], MemoryPlan]  # planner.plan_memory, for the plans of the other ways out

AVERAGE_CONTEXT_FRACTION = 0.5  # a request's average length, for the concurrency warning


def find_problems(plan: MemoryPlan, replan: Replan) -> Iterator[PlanProblem]:
    inputs = plan.inputs
    if inputs.on_gpu:
        yield from _gpu_budget_problems(plan, replan)
    if plan.num_kv_blocks >= 1 and plan.kv_tokens < request_kv_tokens(inputs):
        yield PlanProblem("max_model_len", True, _max_model_len_message(plan))
    if plan.num_kv_blocks >= 1:
        warning = _concurrency_warning(plan)
        if warning:
            yield PlanProblem("concurrency", False, warning)


def _gpu_budget_problems(plan: MemoryPlan, replan: Replan) -> Iterator[PlanProblem]:
    inputs = plan.inputs
    total = inputs.device_total_bytes
    assert total is not None
    free = total - plan.outside_budget_bytes
    if inputs.fixed_kv_cache:
        need = plan.breakdown.non_kv_bytes + plan.kv_cache_bytes
        if need > free:
            yield PlanProblem("kv_exceeds_free", True, _fixed_kv_message(plan, need, free))
        return
    if plan.budget_bytes > free:
        yield PlanProblem("free_memory", True, _free_memory_message(plan, free))
    if plan.weights.total_bytes > plan.budget_bytes:
        yield PlanProblem("weights", True, _weights_message(plan, replan))
    elif plan.num_kv_blocks < 1:
        yield PlanProblem("no_kv", True, _no_kv_message(plan, replan))


def _model_and_card(plan: MemoryPlan) -> str:
    card = plan.inputs.gpu_name or "this card"
    return f"{plan.inputs.model_name} on {card} ({gib(plan.inputs.device_total_bytes or 0)})"


def _utilization_fix(plan: MemoryPlan) -> str:
    """'Set --gpu-memory-utilization X' when some X holds one full-length request, else why not."""
    inputs = plan.inputs
    need_util = plan.utilization_for_kv_tokens(request_kv_tokens(inputs))
    max_util = plan.max_usable_utilization
    assert need_util is not None and max_util is not None
    if need_util <= max_util:
        return (f"Set --gpu-memory-utilization {need_util:.2f} or more (the least that also holds one "
                f"--max-model-len {inputs.max_model_len} request)")
    return (f"No --gpu-memory-utilization is enough: one --max-model-len {inputs.max_model_len} request would need "
            f"{need_util:.2f} of the card, and at most {max_util:.2f} is free")


def _alternatives(plan: MemoryPlan, replan: Replan) -> str:
    """Other ways out: fp8 weights (with their planned size), fewer sequences, another card."""
    inputs = plan.inputs
    ways = []
    if inputs.quantization is None:
        fp8 = replan(replace(inputs, quantization="fp8"))
        fp8_util = fp8.utilization_for_kv_tokens(request_kv_tokens(inputs))
        ways.append(f"--quantization fp8 ({gib(fp8.weights.total_bytes)} of weights, from utilization "
                    f"{fp8_util:.2f})")
    reserves = plan.breakdown.activation_peak_bytes + plan.breakdown.cuda_graph_bytes
    if inputs.max_num_seqs > 32 and reserves > plan.budget_bytes // 10:
        ways.append(f"a smaller --max-num-seqs (now {inputs.max_num_seqs}; its sampler and CUDA-graph "
                    f"reserves take {gib(reserves)})")
    if inputs.max_model_len > 2048:
        ways.append("a smaller --max-model-len")
    ways.append("a card with more memory")
    return "; ".join(ways)


def _free_memory_message(plan: MemoryPlan, free: int) -> str:
    inputs = plan.inputs
    max_util = plan.max_usable_utilization
    held = "by this process's CUDA context" if inputs.device_free_bytes is None else \
        "by this process's CUDA context and by any other process on the GPU (nvidia-smi lists them)"
    return (
        f"--gpu-memory-utilization {inputs.gpu_memory_utilization:.2f} asks for {gib(plan.budget_bytes)} of "
        f"{_model_and_card(plan)}, but only {gib(free)} can be had: {gib(plan.outside_budget_bytes)} are "
        f"held {held} before fitserve allocates anything. Set --gpu-memory-utilization {max_util:.2f} or "
        "less, or free the GPU of other processes."
    )


def _weights_message(plan: MemoryPlan, replan: Replan) -> str:
    inputs = plan.inputs
    w = plan.weights
    return (
        f"{_model_and_card(plan)} does not fit: its weights need {gib(w.total_bytes)} "
        f"({gib(w.linear_bytes)} of linear layers in {w.linear_dtype}, {gib(w.embedding_bytes)} of embeddings "
        f"in {w.other_dtype}{_experts(w)}), more than the budget of {gib(plan.budget_bytes)} that --gpu-memory-utilization "
        f"{inputs.gpu_memory_utilization:.2f} gives. With activations ({gib(plan.breakdown.activation_peak_bytes)}), "
        f"the CUDA-graph pool ({gib(plan.breakdown.cuda_graph_bytes)}) and runtime memory it needs "
        f"{gib(plan.breakdown.non_kv_bytes)} before any KV cache. {_utilization_fix(plan)}. Other ways: "
        f"{_alternatives(plan, replan)}."
    )


def _experts(w: WeightBytes) -> str:
    """An MoE model's experts, which --quantization leaves in --dtype (plan/shapes.py)."""
    return f", {gib(w.expert_bytes)} of MoE experts in {w.other_dtype}" if w.expert_bytes else ""


def _no_kv_message(plan: MemoryPlan, replan: Replan) -> str:
    inputs = plan.inputs
    b = plan.breakdown
    return (
        f"{_model_and_card(plan)} leaves no memory for the KV cache: the budget of {gib(plan.budget_bytes)} "
        f"(--gpu-memory-utilization {inputs.gpu_memory_utilization:.2f}) holds the weights ({gib(b.weights_bytes)}), "
        f"but with the activation peak ({gib(b.activation_peak_bytes)} for --max-num-batched-tokens "
        f"{inputs.max_num_batched_tokens} and --max-num-seqs {inputs.max_num_seqs}), the CUDA-graph pool "
        f"({gib(b.cuda_graph_bytes)}) and runtime memory ({gib(b.runtime_non_torch_bytes)}) it is "
        f"{gib(-plan.kv_budget_bytes)} short of one {plan.kv_block_bytes // 1024} KiB block. "
        f"{_utilization_fix(plan)}. Other ways: {_alternatives(plan, replan)}."
    )


def _fixed_kv_message(plan: MemoryPlan, need: int, free: int) -> str:
    return (
        f"A KV cache of {gib(plan.kv_cache_bytes)} (--kv-cache-memory-bytes or --num-gpu-blocks-override) with "
        f"{gib(plan.breakdown.non_kv_bytes)} of weights, activations and runtime memory needs {gib(need)}, but "
        f"{_model_and_card(plan)} has {gib(free)} free. Ask for a KV cache of at most "
        f"{gib(max(free - plan.breakdown.non_kv_bytes, 0))}, or leave both flags out to size it from "
        "--gpu-memory-utilization."
    )


def _memory_flag(plan: MemoryPlan, kv_tokens_needed: int) -> str:
    """How to give the KV cache `kv_tokens_needed` tokens."""
    inputs = plan.inputs
    if not inputs.on_gpu:
        return "give the cache more memory with --kv-cache-memory-bytes"
    util = plan.utilization_for_kv_tokens(kv_tokens_needed)
    max_util = plan.max_usable_utilization
    if util is not None and max_util is not None and util <= max_util and not inputs.fixed_kv_cache:
        return f"raise --gpu-memory-utilization to {util:.2f}"
    return "use --kv-cache-dtype fp8 or --quantization fp8, or a card with more memory"


def _max_model_len_message(plan: MemoryPlan) -> str:
    inputs = plan.inputs
    where = f"{_model_and_card(plan)}" if inputs.on_gpu else f"{inputs.model_name} on the CPU"
    return (
        f"The KV cache of {where} holds {plan.kv_tokens} tokens ({plan.num_kv_blocks} blocks of "
        f"{inputs.block_size}, {gib(plan.kv_cache_bytes)}), fewer than one request of --max-model-len "
        f"{inputs.max_model_len} needs, so such a request could never run. Set --max-model-len "
        f"{plan.max_request_tokens} or less (the largest that fits), or "
        f"{_memory_flag(plan, request_kv_tokens(inputs))}."
    )


def _concurrency_warning(plan: MemoryPlan) -> str | None:
    inputs = plan.inputs
    average_tokens = max(int(inputs.max_model_len * AVERAGE_CONTEXT_FRACTION), 1)
    fit = plan.requests_at(average_tokens)
    if fit >= inputs.max_num_seqs:
        return None
    return (
        f"The KV cache holds {plan.kv_size_text}: {fit} requests of {average_tokens} tokens (half of "
        f"--max-model-len {inputs.max_model_len}) at once, fewer than --max-num-seqs {inputs.max_num_seqs}. "
        f"Past that, requests wait in the queue or are preempted and recomputed. To admit only what fits, set "
        f"--max-num-seqs {max(fit, 1)}; to hold more, "
        f"{_memory_flag(plan, inputs.max_num_seqs * average_tokens)}, or lower --max-model-len."
    )
