"""Start-up sizing: fails before any weight is read, in one paragraph, exit code 2; refuses the fp8
KV format it does not run (e5m2); sizes the KV cache with the planner's rule from measured figures."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from plan_helpers import llama_8b_inputs, write_model_folder

import fitserve.startup as startup
from fitserve.config import CacheConfig, ConfigError, EngineConfig, SchedulerConfig
from fitserve.plan.planner import plan_memory
from fitserve.runner.memory import DeviceMemory, StartupMemory

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


@pytest.fixture
def no_weight_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded although the plan cannot fit")
    monkeypatch.setattr(startup, "load_model", refuse)


def test_e5m2_kv_cache_is_refused_before_loading(no_weight_loading):
    with pytest.raises(ConfigError, match="fp8_e5m2 is not supported") as info:  # by the config itself
        startup.build_engine(EngineConfig(cache=CacheConfig(kv_cache_dtype="fp8_e5m2")), progress=False)
    assert "--kv-cache-dtype fp8" in str(info.value)


def test_a_cache_too_small_for_max_model_len_stops_before_loading(tmp_path, no_weight_loading):
    folder = write_model_folder(tmp_path / "tiny")
    config = EngineConfig(model=str(folder), load_format="dummy", device="cpu",
                          cache=CacheConfig(kv_cache_memory_bytes=64 * 1024), scheduler=SchedulerConfig(max_model_len=512))
    with pytest.raises(ConfigError, match=r"Set --max-model-len (\d+) or less") as info:
        startup.build_engine(config, progress=False)
    assert "--kv-cache-memory-bytes" in str(info.value)


def _serve(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fitserve", "serve", "--port", "0", *flags],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_serve_exits_2_with_the_paragraph_and_no_traceback(tmp_path):
    folder = write_model_folder(tmp_path / "tiny")
    result = _serve("--model", str(folder), "--load-format", "dummy", "--device", "cpu",
                    "--kv-cache-memory-bytes", "64KiB", "--max-model-len", "512")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "fitserve: The KV cache of" in result.stderr and "Set --max-model-len" in result.stderr


def test_serve_refuses_e5m2_kv_cache_with_exit_code_2():
    result = _serve("--kv-cache-dtype", "fp8_e5m2")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--kv-cache-dtype fp8_e5m2 is not supported" in result.stderr


def test_measured_figures_size_the_cache_with_the_planners_rule():
    planned = plan_memory(llama_8b_inputs(0.9, max_num_seqs=32, max_model_len=4096))
    memory = StartupMemory(planned=planned, start=DeviceMemory(planned.inputs.device_total_bytes, 0, 0, 0))
    memory.weights_bytes = planned.breakdown.weights_bytes
    memory.activation_peak_bytes = planned.breakdown.activation_peak_bytes - 100 * 2**20  # measured lower
    memory.runtime_non_torch_bytes = planned.breakdown.runtime_non_torch_bytes
    sized = memory.size_kv_cache()
    extra_blocks = (100 * 2**20) // planned.kv_block_bytes
    assert sized.num_kv_blocks in (planned.num_kv_blocks + extra_blocks, planned.num_kv_blocks + extra_blocks + 1)
    assert sized.breakdown.cuda_graph_bytes == planned.breakdown.cuda_graph_bytes  # reserved as planned
    table = memory.table()
    assert "planned" in table and "measured" in table and str(sized.num_kv_blocks) in table
    report = memory.to_json()
    assert report["measured"]["num_kv_blocks"] == sized.num_kv_blocks
    assert report["planned"]["num_kv_blocks"] == planned.num_kv_blocks


def test_measured_figures_that_leave_too_little_fail_like_the_plan():
    planned = plan_memory(llama_8b_inputs(0.9, max_num_seqs=32, max_model_len=4096))
    memory = StartupMemory(planned=planned)
    memory.weights_bytes = planned.breakdown.weights_bytes
    # far more than planned: the KV cache shrinks to 100 blocks, 1600 tokens, less than one 4096-token request
    memory.activation_peak_bytes = planned.breakdown.activation_peak_bytes + planned.kv_cache_bytes \
        - 100 * planned.kv_block_bytes
    memory.runtime_non_torch_bytes = planned.breakdown.runtime_non_torch_bytes
    with pytest.raises(ConfigError, match="Set --max-model-len 1600 or less"):
        memory.size_kv_cache()


def test_plan_inputs_from_the_engine_config_match_the_cli(tmp_path):
    folder = write_model_folder(tmp_path / "tiny")
    config = EngineConfig(model=str(folder), load_format="dummy", device="cpu")
    source = startup.resolve_model_source(config)
    inputs = startup.plan_inputs(config, source, 512, startup.torch.device("cpu"), None)
    assert inputs.on_gpu is False and inputs.cuda_graphs is False and inputs.dtype == "bfloat16"
    assert replace(inputs, model_name="x").max_num_seqs == 256


def test_a_head_dim_the_gpu_kernels_cannot_tile_is_refused_on_cuda_before_loading():
    """Phi-3-mini's head_dim 96 (3072 / 32 heads) is padded to 128 in the kernels and runs; an odd
    head_dim or one under 16 cannot (rotation in halves, tl.dot's inner dimension)."""
    from fitserve.arch_config import ArchConfig

    phi3_mini = ArchConfig(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, head_dim=96,
                           architecture="Phi3ForCausalLM")
    for head_dim in (96, 80, 128):
        startup.check_gpu_kernels(replace(phi3_mini, head_dim=head_dim), torch.device("cuda"))
    for head_dim in (8, 95):
        with pytest.raises(ConfigError, match=f"head_dim {head_dim}.*even.*--device cpu"):
            startup.check_gpu_kernels(replace(phi3_mini, head_dim=head_dim), torch.device("cuda"))
    startup.check_gpu_kernels(replace(phi3_mini, head_dim=95), torch.device("cpu"))  # the reference path takes any
