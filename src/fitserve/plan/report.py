"""`fitserve plan`'s output: a table for people, a dict for `--json`."""

from __future__ import annotations

import textwrap
from typing import Any

from fitserve.kv_groups import kv_layout
from fitserve.plan.memory_plan import blocks_for_tokens, request_blocks
from fitserve.plan.planner import MemoryPlan, concurrency_contexts
from fitserve.plan.units import GIB, MIB

WRAP_COLUMNS = 100
LABEL_WIDTH = 46


def _row(label: str, num_bytes: int | None, total: int | None = None, note: str = "") -> str:
    if num_bytes is None:
        return f"  {label}"
    share = f"{100 * num_bytes / total:6.1f}%" if total else "       "
    text = f"  {label:<{LABEL_WIDTH}}{num_bytes / GIB:8.2f} GiB {share}"
    return f"{text}  {note}" if note else text.rstrip()


def _header(plan: MemoryPlan) -> list[str]:
    i = plan.inputs
    counts = i.param_counts
    quant = i.quantization or (f"none ({counts.packed_format} checkpoint)" if counts.packed_always else "none")
    where = (f"{i.gpu_name or 'GPU'} ({i.device_total_bytes // MIB} MiB = {i.device_total_bytes / GIB:.2f} GiB)"
             if i.device_total_bytes is not None else "the CPU")
    if i.tensor_parallel_size > 1:
        where = f"{i.tensor_parallel_size} x {where}, tensor parallel; every figure below is per GPU"
    budget = f"--gpu-memory-utilization {i.gpu_memory_utilization:.2f}" if i.on_gpu else \
        f"--kv-cache-memory-bytes {plan.budget_bytes}"
    settings = (f"--dtype {i.dtype}, --quantization {quant}, --kv-cache-dtype {i.kv_cache_dtype} "
                f"(KV {plan.kv_dtype}, {plan.kv_bytes_per_token / 1024:.1f} KiB per token), "
                f"{budget}, --max-model-len {i.max_model_len}, "
                f"--max-num-seqs {i.max_num_seqs}, --max-num-batched-tokens {i.max_num_batched_tokens}, "
                f"--block-size {i.block_size}{'' if i.cuda_graphs else ', --enforce-eager'}")
    lines = [f"fitserve plan: {i.model_name} ({i.param_counts.num_params / 1e9:.2f} B parameters, "
             f"from {i.param_counts.source}) on {where}"]
    return lines + textwrap.wrap(settings, WRAP_COLUMNS, initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False)


def _memory_rows(plan: MemoryPlan) -> list[str]:
    i, w, b = plan.inputs, plan.weights, plan.breakdown
    total = i.device_total_bytes
    rows = ["", "Memory"]
    if total is not None:
        rows.append(_row("card total", total, total))
        rows.append(_row(f"budget ({i.gpu_memory_utilization:.2f} x total)", plan.budget_bytes, total))
    else:
        rows.append(_row("KV cache budget (--kv-cache-memory-bytes)", plan.budget_bytes))
        rows.append("  in RAM, beside the budget:")
    rows += [
        _row(f"  weights: linear layers ({w.linear_dtype})", w.linear_bytes, total),
        _row(f"  weights: embeddings{'' if i.arch.tie_word_embeddings else ' + lm_head'} ({w.other_dtype})",
             w.embedding_bytes, total),
        _row("  weights: norms, biases, rotary, fp8 scales",
             w.norm_bytes + w.bias_bytes + w.rotary_bytes + w.scale_bytes, total),
    ]
    if w.expert_bytes:
        rows.insert(-1, _row(f"  weights: MoE experts + routers ({w.other_dtype})", w.expert_bytes, total))
    if total is not None:
        rows += [
            _row(f"  activation peak ({i.max_num_batched_tokens} tokens, "
                 f"{min(i.max_num_seqs, i.max_num_batched_tokens)} sampled)", b.activation_peak_bytes, total),
            _row("  runtime memory outside torch", b.runtime_non_torch_bytes, total),
            _row("  CUDA-graph pool (decode graphs)", b.cuda_graph_bytes, total,
                 "" if i.cuda_graphs else "--enforce-eager"),
        ]
    rows.append(_row("  KV cache", plan.kv_cache_bytes, total))
    if total is not None:
        rows.append("  outside the budget:")
        rows.append(_row("  CUDA context (and other processes)", plan.outside_budget_bytes, total))
        headroom = plan.headroom_bytes
        if headroom is not None and headroom >= 0:
            rows.append(_row("  headroom", headroom, total))
    return rows


def _concurrency_rows(plan: MemoryPlan) -> list[str]:
    i = plan.inputs
    contexts = concurrency_contexts(i.max_model_len)
    size = f"{plan.num_kv_blocks:,} blocks of {i.block_size} tokens"
    if len(i.kv_windows) > 1:  # a block holds one group's layers: the pool's tokens are no request's
        size += f" of one KV cache group's {kv_layout(i.arch.layer_windows).num_layers_per_block} layers"
    rows = [
        "",
        f"KV cache: {size} ({plan.kv_cache_bytes / GIB:.2f} GiB)" if len(i.kv_windows) > 1 else
        f"KV cache: {plan.kv_tokens:,} tokens = {size} ({plan.kv_cache_bytes / GIB:.2f} GiB)",
        *_uniform_window_rows(plan),
        f"Concurrent requests it holds, each at its full context (at most --max-num-seqs {i.max_num_seqs}):",
        "  context tokens " + "".join(f"{c:>9}" for c in contexts),
        "  requests       " + "".join(f"{min(plan.requests_at(c), i.max_num_seqs):>9}" for c in contexts),
    ]
    return rows + _mixed_window_rows(plan)


def _mixed_window_rows(plan: MemoryPlan) -> list[str]:
    """Models mixing windowed and full layers (Gemma 2/3): their KV cache groups (kv_groups.py), and what
    the windowed groups save against every layer caching the whole context. (A window on every layer:
    _uniform_window_rows.)"""
    inputs, arch, context = plan.inputs, plan.inputs.arch, plan.inputs.max_model_len
    windows = inputs.kv_windows
    local = [w for w in arch.layer_windows if w is not None]
    if len(windows) == 1 or context <= 0:
        return []
    layout = kv_layout(arch.layer_windows)
    held_layer_blocks = request_blocks(inputs, context) * layout.num_layers_per_block
    whole_layer_blocks = blocks_for_tokens(context, inputs.block_size) * arch.num_hidden_layers
    widest = max(w for w in windows if w is not None)
    return textwrap.wrap(
        f"{len(local)} of {arch.num_hidden_layers} layers attend over a sliding window of {local[0]:,} tokens: "
        f"{len(windows)} KV cache groups of up to {layout.num_layers_per_block} layers, one block table each; a "
        f"windowed group holds at most {blocks_for_tokens(widest, inputs.block_size) + 1} blocks per request, so a "
        f"request at {context:,} tokens holds {1 - held_layer_blocks / whole_layer_blocks:.0%} fewer KV bytes "
        f"than if every layer cached its whole context.",
        WRAP_COLUMNS, break_on_hyphens=False)


def _uniform_window_rows(plan: MemoryPlan) -> list[str]:
    window = plan.inputs.arch.uniform_sliding_window
    if window is None:
        return []
    return [f"Sliding window of {window:,} tokens on every layer: a decoding request holds at most "
            f"{request_blocks(plan.inputs, plan.inputs.max_model_len)} blocks, whatever its context"]


def _verdict_rows(plan: MemoryPlan) -> list[str]:
    fatal = [p for p in plan.problems if p.fatal]
    warnings = [p for p in plan.problems if not p.fatal]
    rows = ["", "Verdict: fits." if not fatal else "Verdict: does not fit."]
    for problem in fatal + warnings:
        prefix = "  error: " if problem.fatal else "  warning: "
        rows += textwrap.wrap(problem.message, WRAP_COLUMNS, initial_indent=prefix, subsequent_indent="    ",
                              break_on_hyphens=False)
    return rows


def format_plan(plan: MemoryPlan) -> str:
    lines = _header(plan) + _memory_rows(plan)
    if plan.fits or plan.num_kv_blocks > 0:
        lines += _concurrency_rows(plan)
    return "\n".join(lines + _verdict_rows(plan))


def plan_to_json(plan: MemoryPlan) -> dict[str, Any]:
    i, w, b = plan.inputs, plan.weights, plan.breakdown
    contexts = concurrency_contexts(i.max_model_len)
    return {
        "model": i.model_name,
        "num_params": i.param_counts.num_params,
        "param_counts_from": i.param_counts.source,
        "gpu": i.gpu_name,
        "device_total_bytes": i.device_total_bytes,
        "settings": {
            "dtype": i.dtype, "quantization": i.quantization, "kv_cache_dtype": i.kv_cache_dtype,
            "gpu_memory_utilization": i.gpu_memory_utilization, "max_model_len": i.max_model_len,
            "max_num_seqs": i.max_num_seqs, "max_num_batched_tokens": i.max_num_batched_tokens,
            "block_size": i.block_size, "cuda_graphs": i.cuda_graphs,
            "kv_cache_memory_bytes": i.kv_cache_memory_bytes, "num_gpu_blocks_override": i.num_gpu_blocks_override,
            "tensor_parallel_size": i.tensor_parallel_size,
        },
        "per_gpu": i.tensor_parallel_size > 1,  # weights, activations and KV bytes below are one GPU's
        "budget_bytes": plan.budget_bytes,
        "weights": {
            "linear_dtype": w.linear_dtype, "linear_bytes": w.linear_bytes, "other_dtype": w.other_dtype,
            "embedding_bytes": w.embedding_bytes, "norm_bytes": w.norm_bytes, "bias_bytes": w.bias_bytes,
            "rotary_bytes": w.rotary_bytes, "expert_bytes": w.expert_bytes,
            "scale_bytes": w.scale_bytes, "total_bytes": w.total_bytes,
        },
        "activation_peak_bytes": b.activation_peak_bytes,
        "runtime_non_torch_bytes": b.runtime_non_torch_bytes,
        "cuda_graph_bytes": b.cuda_graph_bytes,
        "outside_budget_bytes": plan.outside_budget_bytes,
        "headroom_bytes": plan.headroom_bytes,
        "kv_dtype": plan.kv_dtype,
        "kv_block_bytes": plan.kv_block_bytes,
        "kv_cache_bytes": plan.kv_cache_bytes,
        "num_kv_blocks": plan.num_kv_blocks,
        "kv_tokens": plan.kv_tokens,
        "concurrency": {str(c): min(plan.requests_at(c), i.max_num_seqs) for c in contexts},
        "fits": plan.fits,
        "problems": [{"kind": p.kind, "fatal": p.fatal, "message": p.message} for p in plan.problems],
    }
