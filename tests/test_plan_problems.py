"""Every way a plan can fail, as the one-paragraph message a user reads, with the flag that fixes it."""

from __future__ import annotations

import re

import pytest
from plan_helpers import RTX_4000_ADA_BYTES, llama_8b_inputs

from fitserve.plan import estimates
from fitserve.plan.planner import plan_memory

GIB = 2**30


def _problem(plan, kind):
    matches = [p for p in plan.problems if p.kind == kind]
    assert matches, f"no {kind} problem in {[p.kind for p in plan.problems]}"
    return matches[0]


def _one_paragraph(message: str) -> None:
    assert "\n" not in message and message.endswith(".") and len(message) < 1200


def test_weights_larger_than_the_budget_the_guides_050_row():
    plan = plan_memory(llama_8b_inputs(0.50))
    problem = _problem(plan, "weights")
    assert problem.fatal and not plan.fits
    _one_paragraph(problem.message)
    assert "weights need 14.97 GiB" in problem.message and "budget of 10.00 GiB" in problem.message
    assert "--quantization fp8 (8.47 GiB of weights" in problem.message
    assert "--max-num-seqs" in problem.message  # the sampler and graph reserves are large at 256


def test_weights_message_names_the_smallest_utilization_that_works():
    plan = plan_memory(llama_8b_inputs(0.60, max_num_seqs=16, max_model_len=2048))
    message = _problem(plan, "weights").message
    util = float(re.search(r"Set --gpu-memory-utilization (\d\.\d\d) or more", message).group(1))
    assert plan_memory(llama_8b_inputs(util, max_num_seqs=16, max_model_len=2048)).fits
    assert not plan_memory(llama_8b_inputs(round(util - 0.01, 2), max_num_seqs=16, max_model_len=2048)).fits


def test_utilization_the_free_memory_cannot_give_the_guides_100_row():
    plan = plan_memory(llama_8b_inputs(1.00, max_num_seqs=16))
    problem = _problem(plan, "free_memory")
    assert problem.fatal
    _one_paragraph(problem.message)
    max_util = (RTX_4000_ADA_BYTES - estimates.CUDA_CONTEXT_BYTES) / RTX_4000_ADA_BYTES
    assert f"Set --gpu-memory-utilization {int(max_util * 100) / 100:.2f} or less" in problem.message
    assert "CUDA context" in problem.message


def test_free_memory_at_start_up_names_other_processes():
    held = 3 * GIB  # another process holds 3 GiB when fitserve starts
    plan = plan_memory(llama_8b_inputs(0.90, max_num_seqs=16, device_free_bytes=RTX_4000_ADA_BYTES - held))
    message = _problem(plan, "free_memory").message
    assert "3.00 GiB are held by this process's CUDA context and by any other process" in message
    assert "nvidia-smi" in message and "Set --gpu-memory-utilization 0.84 or less" in message  # 17403 of 20475 MiB


def test_no_memory_left_for_the_kv_cache():
    plan = plan_memory(llama_8b_inputs(0.80))  # bf16 at 256 sequences: reserves eat the rest of 16 GiB
    problem = _problem(plan, "no_kv")
    assert problem.fatal and plan.num_kv_blocks == 0
    _one_paragraph(problem.message)
    assert "leaves no memory for the KV cache" in problem.message
    assert "--max-num-seqs" in problem.message and "--quantization fp8" in problem.message


def test_max_model_len_no_request_could_fill_gives_the_largest_that_fits():
    plan = plan_memory(llama_8b_inputs(0.85))
    problem = _problem(plan, "max_model_len")
    assert problem.fatal
    _one_paragraph(problem.message)
    largest = int(re.search(r"Set --max-model-len (\d+) or less", problem.message).group(1))
    assert largest == plan.kv_tokens < 8192
    assert plan_memory(llama_8b_inputs(0.85, max_model_len=largest)).fits
    assert "--gpu-memory-utilization" in problem.message or "fp8" in problem.message


def test_kv_cache_too_small_for_max_num_seqs_is_a_warning_with_numbers():
    plan = plan_memory(llama_8b_inputs(0.90, max_num_seqs=32, max_model_len=4096))
    problem = _problem(plan, "concurrency")
    assert not problem.fatal and plan.fits
    fit = plan.requests_at(2048)
    assert f"{fit} requests of 2048 tokens" in problem.message
    assert f"set --max-num-seqs {fit}" in problem.message
    assert plan_memory(llama_8b_inputs(0.90, max_num_seqs=fit, max_model_len=4096)).problems == ()


def test_fixed_kv_cache_larger_than_the_card():
    plan = plan_memory(llama_8b_inputs(0.90, max_num_seqs=16, kv_cache_memory_bytes=8 * GIB))
    problem = _problem(plan, "kv_exceeds_free")
    assert problem.fatal
    assert "Ask for a KV cache of at most" in problem.message and "--kv-cache-memory-bytes" in problem.message


def test_cpu_plan_too_small_for_max_model_len():
    plan = plan_memory(llama_8b_inputs(device_total_bytes=None, kv_cache_memory_bytes=256 * 2**20))
    problem = _problem(plan, "max_model_len")
    assert "on the CPU holds 2048 tokens" in problem.message
    assert "Set --max-model-len 2048 or less" in problem.message and "--kv-cache-memory-bytes" in problem.message


def test_fitting_plans_raise_nothing():
    plan = plan_memory(llama_8b_inputs(0.90, quantization="fp8", max_num_seqs=64, max_model_len=4096))
    plan.raise_if_fatal()
    assert plan.fits


def test_raise_if_fatal_raises_the_first_fatal_message():
    from fitserve.config import ConfigError
    plan = plan_memory(llama_8b_inputs(0.50))
    with pytest.raises(ConfigError) as info:
        plan.raise_if_fatal()
    assert str(info.value) == _problem(plan, "weights").message
