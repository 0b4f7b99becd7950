"""The planner's arithmetic: weights, KV bytes, cards, and plans that equal what the engine allocates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from plan_helpers import LLAMA_3_8B, RTX_4000_ADA_BYTES, llama_8b_arch, llama_8b_inputs, write_model_folder
from safetensors.torch import save_file

from fitserve.cli import main
from fitserve.config import CacheConfig, ConfigError, EngineConfig, SchedulerConfig
from fitserve.startup import build_engine
from fitserve.plan.gpus import find_gpu
from fitserve.plan.planner import kv_blocks_for_budget, plan_memory
from fitserve.plan.shapes import counts_from_arch, kv_bytes_per_token, model_param_counts, weight_bytes

GIB = 2**30


def test_llama_3_8b_weights_match_the_reference_shapes():
    counts = counts_from_arch(llama_8b_arch())
    assert counts.num_params == 8_030_261_248  # BENCHMARKS.md: 8.03 B parameters
    bf16 = weight_bytes(counts, "bfloat16", None)
    assert bf16.linear_bytes + bf16.embedding_bytes + bf16.norm_bytes == pytest.approx(16.06e9, rel=1e-3)
    fp8 = weight_bytes(counts, "bfloat16", "fp8")
    assert fp8.linear_dtype == "fp8" and fp8.linear_bytes == counts.linear_params
    assert fp8.embedding_bytes == bf16.embedding_bytes  # embeddings and lm_head stay bf16
    assert fp8.total_bytes / GIB == pytest.approx(8.47, abs=0.01)  # "about 8.5 GB with fp8 linear layers"
    assert bf16.rotary_bytes == 2 * 8192 * 128 * 4  # float32 cos and sin tables


def test_kv_bytes_per_token():
    arch = llama_8b_arch()
    assert kv_bytes_per_token(arch, "bfloat16") == 128 * 1024
    assert kv_bytes_per_token(arch, "fp8") == 64 * 1024


def test_gpu_table_lookup():
    assert find_gpu("RTX 4000 Ada").total_bytes == RTX_4000_ADA_BYTES
    assert find_gpu("nvidia h100 80gb hbm3").total_mib == 81559
    assert find_gpu("H200").seen
    with pytest.raises(ConfigError, match="--gpu-memory"):
        find_gpu("Voodoo 3")


def test_kv_blocks_are_whole_blocks_of_what_is_left():
    assert kv_blocks_for_budget(10 * 2048 + 2047, 2048) == 10
    assert kv_blocks_for_budget(-5, 2048) == 0


def test_gpu_plan_adds_up_to_the_budget():
    plan = plan_memory(llama_8b_inputs(0.95, max_num_seqs=64))
    assert plan.fits
    assert plan.budget_bytes == int(RTX_4000_ADA_BYTES * 0.95)
    used = plan.breakdown.non_kv_bytes + plan.kv_cache_bytes
    assert 0 <= plan.budget_bytes - used < plan.kv_block_bytes  # the KV cache takes all whole blocks left
    assert plan.headroom_bytes == RTX_4000_ADA_BYTES - plan.outside_budget_bytes - used


def test_fp8_holds_more_than_bf16():
    bf16 = plan_memory(llama_8b_inputs(0.9, max_num_seqs=32))
    fp8_weights = plan_memory(llama_8b_inputs(0.9, max_num_seqs=32, quantization="fp8"))
    fp8_kv = plan_memory(llama_8b_inputs(0.9, max_num_seqs=32, kv_cache_dtype="fp8"))
    assert fp8_weights.kv_tokens > bf16.kv_tokens
    assert fp8_kv.kv_tokens == pytest.approx(2 * bf16.kv_tokens, rel=0.01)


def test_safetensors_headers_give_the_counts(tmp_path):
    folder = write_model_folder(tmp_path / "ckpt")
    arch_counts = model_param_counts(llama_8b_arch(), None)
    assert arch_counts.source == "config.json"
    from fitserve.arch_config import ArchConfig
    arch = ArchConfig.from_hf_config(json.loads((folder / "config.json").read_text()))
    h, i, v = 64, 160, 512
    tensors = {"model.embed_tokens.weight": torch.zeros(v, h, dtype=torch.bfloat16),
               "lm_head.weight": torch.zeros(v, h, dtype=torch.bfloat16),
               "model.norm.weight": torch.zeros(h, dtype=torch.bfloat16)}
    for layer in range(2):
        prefix = f"model.layers.{layer}."
        for name, shape in {"self_attn.q_proj": (h, h), "self_attn.k_proj": (32, h), "self_attn.v_proj": (32, h),
                            "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h),
                            "mlp.down_proj": (h, i), "input_layernorm": (h,), "post_attention_layernorm": (h,)}.items():
            tensors[f"{prefix}{name}.weight"] = torch.zeros(shape, dtype=torch.bfloat16)
    save_file(tensors, str(folder / "model.safetensors"))
    from_headers = model_param_counts(arch, str(folder))
    assert from_headers.source == "safetensors headers"
    assert from_headers == counts_from_arch(arch).__class__(**{**_fields(counts_from_arch(arch)),
                                                                "source": "safetensors headers"})


def _fields(counts) -> dict:
    return {name: getattr(counts, name) for name in counts.__slots__}


def _plan_json(argv: list[str], capsys) -> dict:
    assert main(["plan", *argv, "--json"]) in (0, 1)
    return json.loads(capsys.readouterr().out)


CPU_CASES = [
    ([], {}),
    (["--kv-cache-memory-bytes", "3MiB", "--block-size", "8"], {"kv_cache_memory_bytes": 3 * 2**20, "block_size": 8}),
    (["--num-gpu-blocks-override", "37"], {"num_gpu_blocks_override": 37}),
    (["--kv-cache-memory-bytes", "10000000", "--block-size", "32"], {"kv_cache_memory_bytes": 10_000_000,
                                                                      "block_size": 32}),
]


@pytest.mark.parametrize("flags,cache_fields", CPU_CASES)
@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True, "num_key_value_heads": 4, "head_dim": 32}])
def test_cpu_plan_equals_what_the_engine_allocates(tmp_path, capsys, flags, cache_fields, overrides):
    folder = write_model_folder(tmp_path / "tiny", **overrides)
    planned = _plan_json(["--model", str(folder), "--max-model-len", "128", *flags], capsys)
    config = EngineConfig(model=str(folder), load_format="dummy", device="cpu", dtype="bfloat16",
                          cache=CacheConfig(**cache_fields), scheduler=SchedulerConfig(max_model_len=128))
    built = build_engine(config, progress=False)
    allocated = built.engine.kv_cache.pool.num_blocks
    assert planned["num_kv_blocks"] == allocated == built.memory.planned.num_kv_blocks
    runner_cache = built.engine.runner.kv_caches[0][0]  # [num_blocks, block_size, kv_heads, head_dim]
    assert runner_cache.shape[0] == allocated and runner_cache.shape[1] == planned["settings"]["block_size"]
    assert planned["kv_block_bytes"] * allocated == sum(k.nbytes + v.nbytes for k, v in built.engine.runner.kv_caches)


def test_llama_3_8b_config_plans_without_weights(capsys):
    out = _plan_json(["--model", str(LLAMA_3_8B), "--gpu", "h100", "--gpu-memory-utilization", "0.9"], capsys)
    assert out["fits"] and out["gpu"] == "NVIDIA H100 80GB HBM3"
    assert out["num_kv_blocks"] * out["kv_block_bytes"] == out["kv_cache_bytes"]
    assert out["weights"]["total_bytes"] / GIB == pytest.approx(14.97, abs=0.01)
    assert set(out["concurrency"]) == {"512", "1024", "2048", "4096", "8192"}


def test_plan_takes_the_positional_model_and_gpu_memory(capsys):
    out = _plan_json([str(LLAMA_3_8B), "--gpu-memory", "24GiB", "--max-num-seqs", "16"], capsys)
    assert out["device_total_bytes"] == 24 * GIB and out["settings"]["max_num_seqs"] == 16


def test_plan_reads_no_weights_and_imports_no_torch():
    import subprocess
    import sys
    code = ("import sys; from fitserve.cli import main; "
            f"rc = main(['plan', '--model', {str(LLAMA_3_8B)!r}, '--gpu', 'h100']); "
            "assert 'torch' not in sys.modules, 'fitserve plan imported torch'; sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert "Verdict: fits." in result.stdout


@pytest.mark.parametrize("min_rows", [None, 256])
def test_an_integer_checkpoint_plans_the_dequantized_scratch_of_its_largest_projection(monkeypatch, min_rows):
    """kernels/triton_int_quant.py dequant_mm: from DEQUANT_MATMUL_MIN_ROWS rows a projection is dequantized
    into one bf16 scratch, the largest projection's size (Llama-3-8B: gate_up, 28672 x 4096), and only when
    a step can hold that many tokens; none while the path is off (None)."""
    from fitserve.plan import estimates
    from fitserve.weights.int_checkpoint import IntQuantScheme, int_param_counts

    monkeypatch.setattr(estimates, "DEQUANT_MATMUL_MIN_ROWS", min_rows)
    arch = llama_8b_arch()
    gptq = int_param_counts(arch, IntQuantScheme("gptq", 4, 128, True, False))

    def activation(counts, budget):
        return plan_memory(llama_8b_inputs(param_counts=counts, max_num_batched_tokens=budget,
                                           max_num_seqs=min(budget, 256))).breakdown.activation_peak_bytes

    gate_up_bf16 = 2 * 14336 * 4096 * 2 if min_rows is not None else 0
    assert activation(gptq, 2048) - activation(counts_from_arch(arch), 2048) == gate_up_bf16
    assert activation(gptq, 255) == activation(counts_from_arch(arch), 255)


def test_gguf_blocks_plan_the_dequantized_scratch_from_a_few_rows():
    """kernels/triton_gguf.py dequant_mm: from GGUF_DEQUANT_MIN_ROWS (16) rows the layer is dequantized into
    the same scratch, so any step budget of 16 tokens or more holds the largest projection in bf16."""
    from fitserve.plan import estimates

    def activation(quantization, budget):
        return plan_memory(llama_8b_inputs(quantization=quantization, max_num_batched_tokens=budget,
                                           max_num_seqs=min(budget, 256))).breakdown.activation_peak_bytes

    assert estimates.GGUF_DEQUANT_MIN_ROWS == 16
    assert activation("gguf", 2048) - activation(None, 2048) == 2 * 14336 * 4096 * 2
    assert activation("gguf", 16) - activation(None, 16) == 2 * 14336 * 4096 * 2
    assert activation("gguf", 15) == activation(None, 15)
