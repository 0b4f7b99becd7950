"""docs/memory.md's tables are `fitserve plan` output: regenerate them here and compare, so the
page cannot drift from the planner. On a failure, the expected table is in the assertion message."""

from __future__ import annotations

from pathlib import Path

import pytest
from plan_helpers import llama_8b_inputs

from fitserve.plan.planner import plan_memory

DOC = Path(__file__).resolve().parents[1] / "docs" / "memory.md"
GIB = 2**30
UTILIZATIONS = (0.50, 0.70, 0.90, 0.95, 1.00)
VERDICTS = {"weights": "weights do not fit", "no_kv": "no room for a KV cache", "free_memory": "more than is free",
            "max_model_len": "KV < one 8192-token request"}


def guide_table(quantization: str | None, max_num_seqs: int) -> str:
    """Llama-3-8B-Instruct on the guide's RTX 4000 Ada (20475 MiB), --max-model-len 8192."""
    rows = ["| utilization | budget | weights | activations + graphs + runtime | KV cache | requests of 640 tokens "
            "| of 4096 tokens | verdict |",
            "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for utilization in UTILIZATIONS:
        plan = plan_memory(llama_8b_inputs(utilization, quantization=quantization, max_num_seqs=max_num_seqs))
        b = plan.breakdown
        fatal = [p.kind for p in plan.problems if p.fatal]
        verdict = "; ".join(VERDICTS[k] for k in fatal) if fatal else "fits"
        kv = f"{plan.kv_cache_bytes / GIB:.2f} GiB ({plan.kv_tokens:,} tokens)"
        rows.append(
            f"| {utilization:.2f} | {plan.budget_bytes / GIB:.2f} GiB | {b.weights_bytes / GIB:.2f} GiB "
            f"| {(b.non_kv_bytes - b.weights_bytes) / GIB:.2f} GiB | {kv} "
            f"| {min(plan.requests_at(640), max_num_seqs)} | {min(plan.requests_at(4096), max_num_seqs)} | {verdict} |")
    return "\n".join(rows)


@pytest.mark.parametrize("quantization,max_num_seqs", [(None, 256), ("fp8", 256), (None, 32), ("fp8", 32)])
def test_guide_tables_in_the_docs_are_the_planners(quantization, max_num_seqs):
    table = guide_table(quantization, max_num_seqs)
    assert table in DOC.read_text(), f"docs/memory.md should contain:\n\n{table}\n"
