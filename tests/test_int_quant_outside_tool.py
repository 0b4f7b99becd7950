"""Checkpoints quantized and written by outside tools, end to end. transformers runs each compressed
checkpoint (its compressed-tensors integration) and fitserve serves it: logits through prefill and
paged decode, and the engine's greedy tokens, must match.

- tests/data/llmcompressor_w4a16: llm-compressor 0.14.0.1's GPTQModifier (W4A16, 8 calibration samples)
  on a tiny random Llama saved by transformers, made by tests/data/make_llmcompressor_w4a16.py in a
  throwaway environment: llm-compressor pins transformers<=5.17, torch<=2.14 and compressed-tensors
  ==0.19.0, where the project runs 5.25, 2.13 and 0.20 (and GPTQModel 7.7.0 needs torch>=2.14.1), so it
  is no test dependency (docs/quantization.md).
- made here: compressed-tensors (the library llm-compressor quantizes and saves through) applies its
  W4A16 preset, takes min-max group scales as llm-compressor's plain QuantizationModifier does
  (`calculate_qparams`), and packs and saves with its own `ModelCompressor` (config.json's
  quantization_config is the library's, not this test's).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from pathlib import Path

from hf_compare_helpers import check_engine_greedy, check_prefill_and_decode, load_ours

from fitserve.layers.formats.int_quant import IntQuantLinear
from fitserve.weights.int_checkpoint import IntQuantScheme

compressed_tensors = pytest.importorskip("compressed_tensors")
LLMCOMPRESSOR_W4A16 = Path(__file__).parent / "data" / "llmcompressor_w4a16"


def test_llm_compressors_gptq_w4a16_checkpoint_matches_transformers_running_it():
    hf = transformers.AutoModelForCausalLM.from_pretrained(LLMCOMPRESSOR_W4A16, dtype=torch.float32).eval()
    assert hasattr(hf.model.layers[0].self_attn.q_proj, "weight_packed"), "transformers runs it compressed"
    source, ours = load_ours(LLMCOMPRESSOR_W4A16)
    # GPTQ's "static" activation ordering keeps groups in column order: no g_idx tensors
    assert source.checkpoint_int == IntQuantScheme("compressed-tensors", 4, 128, True, False)
    check_prefill_and_decode(ours, hf)
    check_engine_greedy(LLMCOMPRESSOR_W4A16, hf)


def quantize_with_compressed_tensors(folder, preset: str) -> None:
    """A tiny random Llama (rows of whole 128-column groups), quantized by `preset` and saved compressed."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams

    config = transformers.LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])}, ignore=["lm_head"]))
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None:
            continue
        weight = module.weight.data  # [N, K], groups of group_size columns
        grouped = weight.reshape(weight.shape[0], -1, scheme.weights.group_size)
        scale, zero_point = calculate_qparams(grouped.amin(-1), grouped.amax(-1), scheme.weights)
        module.weight_scale.data.copy_(scale.to(module.weight_scale.dtype))
        module.weight_zero_point.data.copy_(zero_point.to(module.weight_zero_point.dtype))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(str(folder))


def test_a_compressed_tensors_w4a16_checkpoint_matches_transformers_running_it(tmp_path):
    """W4A16 (symmetric; transformers 5.25 reloads W4A16_ASYM's packed zero points at the wrong shape and
    re-initializes them, so it cannot be the reference for the asymmetric preset)."""
    quantize_with_compressed_tensors(tmp_path, "W4A16")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert hasattr(hf.model.layers[0].self_attn.q_proj, "weight_packed"), "transformers runs it compressed"
    source, ours = load_ours(tmp_path)
    assert source.checkpoint_int == IntQuantScheme("compressed-tensors", 4, 128, True, False)
    assert sum(isinstance(m, IntQuantLinear) for m in ours.modules()) == 4 * 2
    check_prefill_and_decode(ours, hf)
    check_engine_greedy(tmp_path, hf)
