"""The floors benchmarks/gpu_bench.py measures against (benchmarks/bench_floors.py), on the CPU: figures from
fitserve's own plan for the model configs under configs/, the MoE expected-experts formula, windowed KV,
and the fp8 weight-only switch."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_floors  # noqa: E402  (beside gpu_bench.py)
from bench_floors import (  # noqa: E402
    WORKLOADS,
    FiguresUnavailable,
    expected_distinct_experts,
    floor_report,
    floor_s,
    model_figures,
    token_floor_ms,
)

CONFIGS = ROOT / "configs"
LLAMA = CONFIGS / "llama-3-8b-instruct"
# BENCHMARKS.md's ceilings on the lent H200
CEILINGS = {"copy_bytes_per_s": 4.23e12, "bf16_flops_per_s": 749e12, "fp8_flops_per_s": 1392e12}


def llama_figures_before(quantized: bool) -> dict:
    """gpu_bench.py's Llama-only formula before the figures came from the plan (the numbers to keep)."""
    h, i, layers, vocab, kv = 4096, 14336, 32, 128256, 8 * 128
    linear = layers * (h * (h + 2 * kv) + h * h + 3 * h * i)
    params = linear + layers * 2 * h + 2 * vocab * h + h
    return {"params": params, "linear_params": linear if quantized else 0,
            "weight_bytes": 2 * params - (1 if quantized else 0) * linear,
            "kv_bytes_per_token": 2 * layers * kv * (1 if quantized else 2)}


def floor_before(workload: str, model: dict, weight_bytes: int) -> float:
    """The earlier floor_s with the weight bytes a step reads given."""
    requests, concurrency, prompt, output = WORKLOADS[workload]
    steps = -(-requests // concurrency) * output
    step_bytes = weight_bytes + concurrency * (prompt + output / 2) * model["kv_bytes_per_token"]
    fp8 = model["linear_params"]
    return steps * step_bytes / CEILINGS["copy_bytes_per_s"] + requests * prompt * 2 * (
        (model["params"] - fp8) / CEILINGS["bf16_flops_per_s"] + fp8 / CEILINGS["fp8_flops_per_s"])


@pytest.mark.parametrize("variant,quantized", [("bf16", False), ("fp8", True)])
def test_llama_figures_equal_the_earlier_formula(variant, quantized):
    before = llama_figures_before(quantized)
    figures = model_figures(LLAMA, variant)
    assert figures.params == before["params"] == 8_030_261_248  # BENCHMARKS.md: 8.03 B
    assert figures.kv_bytes_per_token == before["kv_bytes_per_token"]
    assert figures.prefill_params == before["params"]
    assert figures.fp8_prefill_params == before["linear_params"]
    scale_bytes = 4 * 4 * 32 if quantized else 0  # a float32 scale per merged linear layer (plan/shapes.py)
    assert figures.resident_weight_bytes == before["weight_bytes"] + scale_bytes
    # a step reads all but the untied input table (B of its rows): 128256 x 4096 in bf16
    table = 128256 * 4096 * 2
    assert figures.input_embedding_bytes == table
    assert figures.weight_bytes_read(1) == figures.weight_bytes_read(256) == figures.resident_weight_bytes - table
    for workload in WORKLOADS:
        expected = floor_before(workload, before, before["weight_bytes"] + scale_bytes - table)
        assert floor_s(workload, CEILINGS, figures) == pytest.approx(expected, rel=1e-12)
    if not quantized:  # BENCHMARKS.md's W: 16.06 GB resident, 128 KiB of KV per token
        assert round(figures.resident_weight_bytes / 1e9, 2) == 16.06
        assert figures.kv_bytes_per_token == 128 * 1024


@pytest.mark.parametrize("folder,billions", [("qwen3-8b", 8.19), ("gemma-3-12b-it", 11.77),
                                             ("mistral-7b-v0.1", 7.24), ("mixtral-8x7b-v0.1", 46.70)])
def test_model_configs_plan_at_their_published_sizes(folder, billions):
    """Gemma 3 12B's 12.2 B includes its SigLIP vision tower; the text model fitserve serves is 11.77 B."""
    figures = model_figures(CONFIGS / folder, "bf16")
    assert round(figures.params / 1e9, 2) == billions


def test_expected_distinct_experts_limits():
    assert expected_distinct_experts(8, 2, 1) == pytest.approx(2)
    assert expected_distinct_experts(8, 2, 2) == pytest.approx(8 * (1 - 0.75**2))  # 3.5: some overlap
    assert expected_distinct_experts(8, 2, 1000) == pytest.approx(8)
    assert expected_distinct_experts(128, 8, 1) == pytest.approx(8)
    counts = [expected_distinct_experts(8, 2, rows) for rows in range(1, 50)]
    assert counts == sorted(counts) and all(2 <= c <= 8 for c in counts)


def test_mixtral_reads_the_experts_its_rows_route_to():
    figures = model_figures(CONFIGS / "mixtral-8x7b-v0.1", "bf16")
    assert (figures.num_moe_layers, figures.num_experts, figures.experts_per_token) == (32, 8, 2)
    assert figures.one_expert_bytes == 3 * 14336 * 4096 * 2
    assert figures.weight_bytes_read(1) == figures.dense_read_bytes + 32 * 2 * figures.one_expert_bytes
    everything = figures.resident_weight_bytes - figures.input_embedding_bytes
    assert figures.weight_bytes_read(10_000) == pytest.approx(everything)
    assert figures.weight_bytes_read(1) < figures.weight_bytes_read(20) < everything
    assert round(figures.prefill_params / 1e9, 1) == 12.9  # Mixtral's published active parameters
    # a W2 step (256 rows) reads every expert, a single stream a quarter of them
    mistral = model_figures(CONFIGS / "mistral-7b-v0.1", "bf16")  # Mixtral's attention, a dense MLP
    assert floor_s("W2", CEILINGS, figures) > floor_s("W2", CEILINGS, mistral)


def test_windowed_layers_read_at_most_their_window():
    mistral = model_figures(CONFIGS / "mistral-7b-v0.1", "bf16")
    per_layer = 2 * 8 * 128 * 2
    assert mistral.layer_windows == (4096,) * 32
    assert mistral.kv_bytes_read(1000) == 32 * per_layer * 1000
    assert mistral.kv_bytes_read(20_000) == mistral.kv_bytes_read(4096) == 32 * per_layer * 4096
    gemma = model_figures(CONFIGS / "gemma-3-12b-it", "bf16")
    assert gemma.layer_windows.count(1024) == 40 and gemma.layer_windows.count(None) == 8
    per_layer = 2 * 8 * 256 * 2
    assert gemma.kv_bytes_read(5000) == per_layer * (40 * 1024 + 8 * 5000)
    assert gemma.input_embedding_bytes == 0  # tied: the table is the lm_head, read whole each step
    assert token_floor_ms(CEILINGS, gemma, 5000) < token_floor_ms(CEILINGS, replace(gemma, layer_windows=(None,) * 48),
                                                                   5000)


def test_fp8_weight_only_prefills_at_the_bf16_rate():
    w8a8, w8a16 = model_figures(LLAMA, "fp8_weights"), model_figures(LLAMA, "fp8_w8a16")
    assert w8a16.weight_bytes_read(1) == w8a8.weight_bytes_read(1)
    assert w8a8.fp8_prefill_params > 0 and w8a16.fp8_prefill_params == 0
    assert floor_s("W2", CEILINGS, w8a16) > floor_s("W2", CEILINGS, w8a8)


def test_packed_variant_without_packed_counts_is_refused(monkeypatch):
    """A plan that holds the projections in bf16 for a packed variant would give a bf16 floor: refused."""
    inputs = bench_floors.planned_inputs(LLAMA, bench_floors.QUANT_VARIANTS["bf16"])
    monkeypatch.setattr(bench_floors, "planned_inputs", lambda folder, variant: replace(inputs, quantization="gguf"))
    with pytest.raises(FiguresUnavailable, match="no packed projections"):
        model_figures(LLAMA, "q4_k_m")
    assert "error" in floor_report(LLAMA, "q4_k_m", CEILINGS)


def packed_projection_bytes(variant: str) -> int:
    """Llama-3-8B's projections as fitserve holds them: GPTQ int4 group 128 with a float32 scale and a uint8
    zero per row and group (weights/int_checkpoint.py); Q4_K_M as llama.cpp assigns it, Q4_K (144 bytes per
    256 weights) and Q6_K (210) for attn_v and ffn_down on its "more bits" layers."""
    h, i, kv, layers = 4096, 14336, 1024, 32
    shapes = {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h), "gate": (i, h), "up": (i, h), "down": (h, i)}
    if variant == "gptq_int4":
        return layers * sum(rows * cols // 2 + rows * cols // 128 * (4 + 1) for rows, cols in shapes.values())

    def more_bits(layer: int) -> bool:
        return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2
    return sum(rows * cols // 256 * (210 if name in ("v", "down") and more_bits(layer) else 144)
               for layer in range(layers) for name, (rows, cols) in shapes.items())


@pytest.mark.parametrize("variant", ["gptq_int4", "q4_k_m"])
def test_packed_variants_read_their_packed_bytes_and_the_bf16_lm_head(variant):
    """#22: Llama-3-8B in int4 group 128 with a bf16 lm_head reads about 4.65 GB a step with BENCHMARKS.md's
    2-byte scales; fitserve's float32 scales and uint8 zeros make it 4.81 GB. Q4_K_M: 5.24 GB."""
    report = floor_report(LLAMA, variant, CEILINGS)
    if "error" in report:
        pytest.skip(f"dummy packed weights are not in this fitserve yet: {report['error'][:120]}")
    lm_head_and_norms = 128256 * 4096 * 2 + (2 * 32 + 1) * 4096 * 2
    read = report["model"]["weight_bytes_read_at_1"]
    assert read == packed_projection_bytes(variant) + lm_head_and_norms
    assert report["single_token_floor_ms"] == pytest.approx(1000 * (read + 640 * 128 * 1024) / 4.23e12)
    assert report["model"]["fp8_prefill_params"] == 0  # dequantized to bf16 for the prefill's matmuls


def test_floor_report_without_ceilings_keeps_the_figures():
    report = floor_report(LLAMA, "bf16", {"error": "timed out after 280 s"})
    assert report["model"]["params"] == 8_030_261_248 and "floors_s" not in report
    report = floor_report(LLAMA, "bf16", CEILINGS)
    assert report["floors_s"]["W1"] == pytest.approx(floor_s("W1", CEILINGS, model_figures(LLAMA, "bf16")))
    assert report["single_token_floor_ms"] == pytest.approx(1000 * (15_009_849_344 + 640 * 131072) / 4.23e12)


def test_fp8_weight_only_switch_takes_every_card_off_fp8_tensor_cores(monkeypatch):
    from fitserve.layers.formats import fp8

    monkeypatch.setattr(fp8, "FP8_TENSOR_CORES", fp8.FP8_TENSOR_CORES)  # restored after the test
    import gpu_bench

    gpu_bench.force_fp8_weight_only()
    assert fp8.FP8_TENSOR_CORES > (12, 0)  # above every card's compute capability (Blackwell: 10.x, 12.x)


@pytest.mark.gpu
def test_fp8_weight_only_switch_builds_w8a16_layers_on_this_card(monkeypatch):
    """On the device (an H200 has fp8 tensor cores): after the switch every fp8 layer is weight-only."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from fitserve.arch_config import ArchConfig
    from fitserve.layers.formats import fp8
    from fitserve.models.llama import LlamaForCausalLM

    monkeypatch.setattr(fp8, "FP8_TENSOR_CORES", fp8.FP8_TENSOR_CORES)
    import gpu_bench

    arch = ArchConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=32)
    cuda = torch.device("cuda")
    before = LlamaForCausalLM(arch, torch.bfloat16, cuda, quantization="fp8")
    gpu_bench.force_fp8_weight_only()
    after = LlamaForCausalLM(arch, torch.bfloat16, cuda, quantization="fp8")
    layers = [m for m in after.modules() if isinstance(m, fp8.Fp8Linear)]
    assert layers and all(m.weight_only for m in layers)
    if torch.cuda.get_device_capability(cuda) >= (8, 9):  # a card with fp8 tensor cores took W8A8 before
        assert not any(m.weight_only for m in before.modules() if isinstance(m, fp8.Fp8Linear))


def test_no_run_draws_the_prompts_of_another():
    """With one seed for every workload, W2 after W1 found W1's 100 prompts in the prefix cache and skipped
    a tenth of its prefill, and a repeat was served from the cache: each workload and each repeat of it
    now draws its own prompts, in-process (gpu_bench) and through HTTP (http_record's `fitserve bench`)."""
    from fitserve.bench.workloads import Workload, build_requests

    runs = [(name, repeat) for name in bench_floors.WORKLOADS for repeat in range(3)]
    seeds = [bench_floors.prompt_seed(name, repeat) for name, repeat in runs]
    assert len(set(seeds)) == len(runs)
    first_blocks = set()
    for seed in seeds:
        workload = Workload("custom", "", num_prompts=4, max_concurrency=None, input_len=32, output_len=1)
        requests = build_requests(workload, seed=seed, vocab_size=32000)
        first_blocks.update(tuple(r.prompt[:16]) for r in requests)
    assert len(first_blocks) == 4 * len(seeds)  # no 16-token first block (one KV block) in common
