"""`fitserve plan --users N --context T`: the smallest utilization, and the quantization,
that hold N requests of T tokens at once on the card, or why nothing does (torch-free).

Each option is planned with `--max-model-len T` and `--max-num-seqs N` (so the sampler and
CUDA-graph reserves are sized for N requests, not the default 256).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from fitserve.plan.memory_plan import request_blocks
from fitserve.plan.planner import MemoryPlan, PlanInputs, plan_memory
from fitserve.plan.units import gib

# (quantization, kv cache dtype), in the order we recommend them: full precision first.
OPTIONS = ((None, "auto"), (None, "fp8"), ("fp8", "auto"), ("fp8", "fp8"))
MAX_SEARCH_STEPS = 5  # rounding can put the first guess a step or two low


@dataclass(frozen=True, slots=True)
class FitOption:
    quantization: str | None
    kv_cache_dtype: str
    utilization: float | None  # the smallest that holds the load; None: none does
    plan: MemoryPlan  # at that utilization, or at the largest usable one when none does
    reason: str  # why none does ("" when it fits)

    @property
    def flags(self) -> str:
        parts = [f"--quantization {self.quantization}"] if self.quantization else []
        if self.kv_cache_dtype != "auto":
            parts.append(f"--kv-cache-dtype {self.kv_cache_dtype}")
        return " ".join(parts) or "(no quantization)"


def _search_one(inputs: PlanInputs, num_users: int, context_tokens: int) -> FitOption:
    need_tokens = num_users * request_blocks(inputs, context_tokens) * inputs.block_size
    probe = plan_memory(replace(inputs, gpu_memory_utilization=1.0))
    max_util = probe.max_usable_utilization
    guess = probe.utilization_for_kv_tokens(need_tokens)
    assert max_util is not None and guess is not None
    util = max(guess, 0.01)
    for _ in range(MAX_SEARCH_STEPS):
        if util > max_util:
            break
        plan = plan_memory(replace(inputs, gpu_memory_utilization=util))
        if plan.fits and plan.requests_at(context_tokens) >= num_users:
            return FitOption(inputs.quantization, inputs.kv_cache_dtype, util, plan, "")
        util = round(util + 0.01, 2)
    best = plan_memory(replace(inputs, gpu_memory_utilization=max(max_util, 0.01)))
    need_bytes = best.breakdown.non_kv_bytes + need_tokens * best.kv_block_bytes // inputs.block_size
    reason = (f"needs {gib(need_bytes)} ({gib(best.breakdown.non_kv_bytes)} besides {need_tokens:,} tokens of KV "
              f"cache), {guess:.2f} of the card; at most {max_util:.2f} can be had")
    return FitOption(inputs.quantization, inputs.kv_cache_dtype, None, best, reason)


def search_fit(inputs: PlanInputs, num_users: int, context_tokens: int,
               weights_fixed: bool = False) -> list[FitOption]:
    """Every option in OPTIONS, planned for the load; with `weights_fixed` (an fp8 checkpoint)
    only inputs.quantization, with each KV cache dtype."""
    base = replace(inputs, max_model_len=context_tokens, max_num_seqs=num_users)
    options = [(inputs.quantization, kv) for kv in ("auto", "fp8")] if weights_fixed else OPTIONS
    return [_search_one(replace(base, quantization=q, kv_cache_dtype=kv), num_users, context_tokens)
            for q, kv in options]


def recommended(options: list[FitOption]) -> FitOption | None:
    return next((o for o in options if o.utilization is not None), None)


def format_fit(inputs: PlanInputs, num_users: int, context_tokens: int, options: list[FitOption]) -> str:
    card = f"{inputs.gpu_name or 'the card'} ({gib(inputs.device_total_bytes or 0)})"
    lines = [f"fitserve plan: {num_users} concurrent requests of {context_tokens} tokens with "
             f"{inputs.model_name} on {card}", ""]
    for option in options:
        if option.utilization is None:
            lines.append(f"  {option.flags:<45} does not fit: {option.reason}")
        else:
            lines.append(f"  {option.flags:<45} from --gpu-memory-utilization {option.utilization:.2f} "
                         f"({option.plan.kv_tokens:,} KV tokens)")
    best = recommended(options)
    lines.append("")
    if best is None:
        lines.append(f"Verdict: no setting holds {num_users} x {context_tokens} tokens on this card. Fewer users, "
                     "shorter contexts or a card with more memory would.")
    else:
        flags = f"--gpu-memory-utilization {best.utilization:.2f} --max-model-len {context_tokens} " \
                f"--max-num-seqs {num_users}" + ("" if best.flags.startswith("(") else f" {best.flags}")
        lines.append(f"Verdict: fits with {flags}.")
    return "\n".join(lines)


def fit_to_json(options: list[FitOption], num_users: int, context_tokens: int) -> dict[str, Any]:
    best = recommended(options)
    return {
        "users": num_users,
        "context_tokens": context_tokens,
        "options": [
            {"quantization": o.quantization, "kv_cache_dtype": o.kv_cache_dtype, "utilization": o.utilization,
             "kv_tokens": o.plan.kv_tokens if o.utilization is not None else None, "reason": o.reason or None}
            for o in options
        ],
        "recommended": None if best is None else {
            "quantization": best.quantization, "kv_cache_dtype": best.kv_cache_dtype, "utilization": best.utilization,
        },
    }
