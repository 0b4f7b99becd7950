"""`--load-format dummy` with a packed `--quantization`: random weights in GPTQ, AWQ, compressed-tensors
or llama.cpp's Q4_K_M layout, built from config.json alone, finite through the engine, and planned to
the byte."""

from __future__ import annotations

import json

import pytest
import torch
from paged_helpers import PagedDriver
from plan_helpers import LLAMA_3_8B, llama_8b_arch, write_model_folder

from fitserve.arch_config import ArchConfig
from fitserve.config import CacheConfig, ConfigError, EngineConfig, SchedulerConfig
from fitserve.kernels import gguf as gguf_kernels
from fitserve.kernels import int_quant
from fitserve.layers.formats.gguf import GgufLinear
from fitserve.layers.formats.int_quant import IntQuantFormat, IntQuantLinear
from fitserve.models.loader import load_model
from fitserve.plan.shapes import weight_bytes
from fitserve.weights.dummy_gguf import encode_k_scales, random_blocks
from fitserve.weights.dummy_layouts import (
    BLOCK_SIZES,
    DENSE,
    DUMMY_INIT_STD,
    DUMMY_INT_SCHEMES,
    BlockProjection,
    block_projections,
    q4_k_m_type,
    use_more_bits,
)
from fitserve.weights.dummy_quant import GGML_TYPE_IDS, int_pieces
from fitserve.weights.source import resolve_model_source

PACKED = ("gptq", "awq", "compressed-tensors", "gguf")
# a Llama whose rows are whole 256-element blocks (K-quants) and whole groups of 128, 8 layers
TINY_PACKED = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=384)


def test_q4_k_m_gives_attn_v_and_ffn_down_more_bits_on_llama_cpps_layers():
    arch = llama_8b_arch()  # 32 layers: the first and last 4, and every third from layer 6
    more_bits = [layer for layer in range(32) if use_more_bits(layer, 32)]
    assert more_bits == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    types = {(p.layer, p.name): q4_k_m_type(p, arch) for p in block_projections(arch)}
    for (layer, name), ggml_type in types.items():
        assert ggml_type == ("Q6_K" if name in ("v_proj", "down_proj") and layer in more_bits else "Q4_K")


def test_q4_k_m_falls_back_as_llama_cpp_does_for_rows_of_other_lengths():
    arch = ArchConfig(vocab_size=64, hidden_size=576, intermediate_size=1536, num_hidden_layers=80,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64)
    assert q4_k_m_type(BlockProjection(0, "q_proj", 576, 576), arch) == "Q5_0"  # 576 = 2.25 K-blocks
    assert q4_k_m_type(BlockProjection(0, "down_proj", 576, 1536), arch) == "Q6_K"
    assert q4_k_m_type(BlockProjection(0, "v_proj", 192, 576), arch) == "Q8_0"  # Q6_K's fallback
    assert q4_k_m_type(BlockProjection(40, "v_proj", 192, 512), arch) == "Q5_K"  # an 80-layer GQA model: 70B
    assert q4_k_m_type(BlockProjection(40, "v_proj", 192, 576), arch) == DENSE  # Q5_K -> Q5_1, not kept packed
    assert q4_k_m_type(BlockProjection(0, "q_proj", 48, 48), arch) == DENSE  # not whole 32-element blocks


def test_block_sizes_are_the_kernels():
    for name, (elements, block_bytes) in BLOCK_SIZES.items():
        block = gguf_kernels.BLOCK_TYPES[GGML_TYPE_IDS[name]]
        assert (block.name, block.block_elements, block.block_bytes) == (name, elements, block_bytes)


def test_k_scales_encode_to_what_the_kernel_decodes():
    generator = torch.Generator().manual_seed(1)
    sc, mn = (torch.randint(0, 64, (50, 8), generator=generator) for _ in range(2))
    decoded_sc, decoded_mn = gguf_kernels._k_scale_min(encode_k_scales(sc, mn))
    assert torch.equal(decoded_sc.long(), sc) and torch.equal(decoded_mn.long(), mn)


@pytest.mark.parametrize("type_name", sorted(BLOCK_SIZES))
def test_random_blocks_dequantize_to_small_centred_finite_weights(type_name):
    data = random_blocks(type_name, (64, 512), torch.Generator().manual_seed(0), torch.device("cpu"))
    weights = gguf_kernels.dequantize(data, GGML_TYPE_IDS[type_name])
    assert weights.shape == (64, 512) and torch.isfinite(weights).all()
    rms = weights.pow(2).mean().sqrt().item()
    assert 0.5 * DUMMY_INIT_STD < rms < 2 * DUMMY_INIT_STD
    assert abs(weights.mean().item()) < 0.1 * rms  # the mins cancel the values' mean


@pytest.mark.parametrize("method", sorted(DUMMY_INT_SCHEMES))
def test_integer_pieces_load_into_their_layer_with_valid_scales_and_zeros(method):
    scheme = DUMMY_INT_SCHEMES[method]
    layer = IntQuantFormat(scheme).create(256, (128, 64), torch.float32, torch.device("cpu"))
    for shard, rows in enumerate((128, 64)):
        pieces = int_pieces(scheme, BlockProjection(0, "q_proj", rows, 256), torch.Generator().manual_seed(shard),
                            torch.device("cpu"))
        for piece, tensor in pieces:
            layer.load(shard, piece, tensor)
    layer.finish_loading()
    assert torch.isfinite(layer.scales).all() and (layer.scales > 0).all() and layer.scales.max() < 1e-2
    assert ((layer.zeros >= 7) & (layer.zeros <= 8)).all()  # the middle of 4-bit values
    weights = int_quant.dequantize(layer.qweight, layer.scales, layer.zeros, None, 4, torch.float32)
    rms = weights.pow(2).mean().sqrt().item()
    assert 0.5 * DUMMY_INIT_STD < rms < 2 * DUMMY_INIT_STD


def cpu_dtype(quantization: str) -> torch.dtype:
    """float32 for gguf: a bf16 CPU layer holds its blocks as bf16 and int4 weights, not as the file's bytes
    (layers/formats/gguf.py), which the plan (the GPU's layout) counts."""
    return torch.float32 if quantization == "gguf" else torch.bfloat16


def _source(folder, quantization, **fields):
    return resolve_model_source(EngineConfig(model=str(folder), load_format="dummy", quantization=quantization,
                                             **fields))


@pytest.mark.parametrize("quantization", PACKED)
def test_dummy_model_is_packed_and_its_logits_finite(tmp_path, quantization):
    folder = write_model_folder(tmp_path / "m", **TINY_PACKED)
    source = _source(folder, quantization)
    model = load_model(source, cpu_dtype(quantization), torch.device("cpu"), progress=False, quantization=quantization)
    layers = [m for m in model.modules() if isinstance(m, (IntQuantLinear, GgufLinear))]
    assert len(layers) == 4 * 8
    if quantization == "gguf":
        types = {p.ggml_type for m in layers for p in m.parts}
        assert types == {GGML_TYPE_IDS["Q4_K"], GGML_TYPE_IDS["Q6_K"]}
    driver = PagedDriver(model, num_blocks=32)
    logits = driver.step([("a", list(range(1, 20))), ("b", [5, 6, 7])])
    assert torch.isfinite(logits).all() and logits.std() > 0
    decoded = driver.step([("a", [3]), ("b", [4])])
    assert torch.isfinite(decoded).all()


@pytest.mark.parametrize("quantization", PACKED)
def test_the_engine_generates_from_a_config_only_folder(tmp_path, quantization):
    from fitserve.llm import build_engine
    from fitserve.sampling_params import SamplingParams

    folder = write_model_folder(tmp_path / "m", **TINY_PACKED)
    config = EngineConfig(model=str(folder), load_format="dummy", quantization=quantization, device="cpu",
                          dtype="bfloat16", cache=CacheConfig(num_gpu_blocks_override=32),
                          scheduler=SchedulerConfig(max_model_len=128, max_num_seqs=4))
    engine = build_engine(config, progress=False).engine
    engine.add_request(engine.make_request("r", [1, 2, 3, 4], SamplingParams(max_tokens=6, temperature=0,
                                                                           ignore_eos=True)))
    tokens = []
    while engine.has_unfinished:
        for out in engine.step():
            tokens += out.new_token_ids
    assert len(tokens) == 6 and all(0 <= t < TINY_PACKED["vocab_size"] for t in tokens)


@pytest.mark.parametrize("quantization", PACKED)
@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True, "hidden_size": 576, "intermediate_size": 1536,
                                            "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64}])
def test_plan_counts_the_bytes_the_dummy_model_holds(tmp_path, capsys, quantization, overrides):
    """`fitserve plan` and start-up's plan equal the loaded model's parameters and buffers, byte for byte
    (SmolLM2's 576-wide rows: Q5_0 and Q8_0 fallbacks in the GGUF mix; groups of 128 in 576 do not divide,
    so the integer layouts refuse it)."""
    from fitserve.cli import main

    folder = write_model_folder(tmp_path / "m", **{**TINY_PACKED, **overrides})
    dtype = cpu_dtype(quantization)
    flags = ["plan", "--model", str(folder), "--load-format", "dummy", "--quantization", quantization,
             "--dtype", str(dtype).removeprefix("torch."), "--max-model-len", "128", "--json"]
    if overrides and quantization != "gguf":
        assert main(flags) == 2
        assert "576 input columns are not whole groups of 128" in capsys.readouterr().err
        return
    assert main(flags) in (0, 1)
    planned = json.loads(capsys.readouterr().out)["weights"]
    source = _source(folder, quantization)
    model = load_model(source, dtype, torch.device("cpu"), progress=False, quantization=quantization)
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert planned["total_bytes"] == held
    assert planned["linear_dtype"] == quantization
    assert weight_bytes(source.param_counts(), str(dtype).removeprefix("torch."), quantization).total_bytes == held


def test_llama_3_8b_plans_at_its_packed_sizes(capsys):
    """The config-only Llama-3-8B folder on a GPU in bf16: Q4_K's 4.625 bits a projection weight as held (the
    K-quant form: the file's 4.5 and 4 bytes more a block of 256), Q6_K's 6.5625 for attn_v and ffn_down on 16 of
    the 32 layers: 4.90 bits (4.80 as stored: llama.cpp's Meta-Llama-3-8B-Instruct.Q4_K_M.gguf, about 4.92 GB,
    holds 4.19 GB of projections besides its Q4_K embeddings and Q6_K output: 4.80 too); GPTQ's 4 bits with a
    float32 scale and a zero byte per group of 128 (fitserve's layout): 4.3125."""
    from fitserve.cli import main

    bits = {}
    for quantization in PACKED:
        assert main(["plan", "--model", str(LLAMA_3_8B), "--load-format", "dummy", "--quantization", quantization,
                     "--gpu", "h100", "--json"]) == 0
        weights = json.loads(capsys.readouterr().out)["weights"]
        bits[quantization] = weights["linear_bytes"] * 8 / 6_979_321_856  # the projections' weights
    more_bits = 16 * (1024 * 4096 + 4096 * 14336) / 6_979_321_856  # v_proj, down_proj on 16 layers
    assert bits["gguf"] == pytest.approx(4.625 + more_bits * (6.5625 - 4.625)) == pytest.approx(4.904, abs=1e-3)
    assert bits["gptq"] == bits["awq"] == bits["compressed-tensors"] == pytest.approx(4 + 40 / 128)


def test_a_mixture_of_experts_model_is_refused(tmp_path):
    folder = write_model_folder(tmp_path / "m", architectures=["MixtralForCausalLM"], num_local_experts=4,
                                num_experts_per_tok=2)
    with pytest.raises(ConfigError, match="Mixture-of-Experts"):
        _source(folder, "gptq")
