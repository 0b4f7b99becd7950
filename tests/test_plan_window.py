"""`fitserve plan` with a sliding window on every layer (Mistral v0.1's 4096): a request's KV is bounded
by the window, so more full-context requests fit, and a context longer than the cache can still run."""

from __future__ import annotations

from dataclasses import replace

from plan_helpers import llama_8b_arch, llama_8b_inputs

from fitserve.plan.memory_plan import request_blocks, request_kv_tokens
from fitserve.plan.planner import plan_memory
from fitserve.plan.report import format_plan

WINDOW = 4096


def windowed(**fields):
    inputs = llama_8b_inputs(0.95, max_model_len=32768, max_num_seqs=256, **fields)
    return replace(inputs, arch=replace(llama_8b_arch(), sliding_window=WINDOW))


def test_a_full_context_request_holds_the_window_not_its_context():
    inputs = windowed()
    assert request_blocks(inputs, 32768) == WINDOW // 16 + 1
    assert request_blocks(inputs, 100) == 7  # shorter than the window: its context
    assert request_blocks(replace(inputs, arch=llama_8b_arch()), 32768) == 32768 // 16
    assert request_kv_tokens(inputs) == (-(-(WINDOW + inputs.max_num_batched_tokens) // 16) + 1) * 16


def test_more_users_fit_at_the_full_context_and_a_long_context_is_no_problem():
    full = plan_memory(replace(windowed(), arch=llama_8b_arch()))
    window = plan_memory(windowed())
    assert full.num_kv_blocks == window.num_kv_blocks  # the same memory, read differently
    assert window.kv_tokens < 32768, "the cache is shorter than one full-attention request"
    assert full.requests_at(32768) == 0 and not full.fits
    assert window.requests_at(32768) == window.num_kv_blocks // (WINDOW // 16 + 1) > 0
    assert window.fits and not any(p.kind == "max_model_len" for p in window.problems)
    text = format_plan(window)
    assert f"Sliding window of {WINDOW:,} tokens on every layer" in text
