"""Gemma 2 and Gemma 3 (text, and the text tower of image-text checkpoints) match transformers on tiny
random checkpoints (float32, CPU), and the planner counts what the models allocate.

Each checkpoint is written by transformers' own class: local and global layers with a sliding window
(5 tokens) shorter than every prompt, so the window changes the numbers; Gemma 2 with its attention and
final soft-caps; Gemma 3 with q/k norms, its local rope base and linear rope scaling of the global
layers. Norm weights are drawn at random (transformers starts Gemma's at zero, which would hide a
missing norm or a norm of the wrong form).
"""

from __future__ import annotations

import json
from dataclasses import replace as dataclasses_replace

import pytest
import torch
import transformers

from fitserve.arch_config import ArchConfig, LinearRopeScaling
from fitserve.config import ConfigError, EngineConfig
from fitserve.plan.shapes import counts_from_arch, model_param_counts, weight_bytes
from fitserve.weights.source import resolve_model_source
from hf_compare_helpers import check_engine_greedy, check_prefill_and_decode, load_ours, save_random_checkpoint

WINDOW = 5  # shorter than every prompt of hf_compare_helpers (7, 19 and 12 tokens)
TINY = dict(vocab_size=311, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            sliding_window=WINDOW, query_pre_attn_scalar=24, rms_norm_eps=1e-6)
GEMMA3_LAYERS = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]


def gemma2_config(tied: bool = True) -> transformers.Gemma2Config:
    """3 layers alternating local, global, local (Gemma 2's pattern, from the config's defaults)."""
    return transformers.Gemma2Config(**TINY, num_hidden_layers=3, tie_word_embeddings=tied,
                                     attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def gemma3_config(tied: bool = True) -> transformers.Gemma3TextConfig:
    return transformers.Gemma3TextConfig(
        **TINY, num_hidden_layers=4, layer_types=GEMMA3_LAYERS, tie_word_embeddings=tied,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})


def gemma3_image_text_config() -> transformers.Gemma3Config:
    vision = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    return transformers.Gemma3Config(text_config=gemma3_config().to_dict(), vision_config=vision,
                                     mm_tokens_per_image=4, image_token_index=310, boi_token_index=308,
                                     eoi_token_index=309, eos_token_id=[2, 3])


MODELS = {"gemma2": (gemma2_config, transformers.Gemma2ForCausalLM),
          "gemma3": (gemma3_config, transformers.Gemma3ForCausalLM)}


def write_checkpoint(folder, name: str, tied: bool = True):
    make_config, model_class = MODELS[name]
    torch.manual_seed(0)
    return save_random_checkpoint(folder, model_class(make_config(tied)).eval())


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("name", list(MODELS))
def test_batched_prefill_and_decode_match_hf(tmp_path, name, tied):
    """Three prompts longer than the window prefilled in one batch, then decoded together through the
    paged cache; every step's logits equal transformers' on the whole sequence."""
    hf = write_checkpoint(tmp_path, name, tied)
    source, ours = load_ours(tmp_path)
    assert type(ours).__name__ == hf.config.architectures[0] and source.arch.tie_word_embeddings == tied
    check_prefill_and_decode(ours, hf)


def test_the_window_and_the_soft_caps_change_the_output(tmp_path):
    """The comparison above can fail: without the window or a soft-cap the logits move past its tolerance."""
    import dataclasses
    hf = write_checkpoint(tmp_path, "gemma2")
    source, _ = load_ours(tmp_path)
    for change in ({"sliding_window": None}, {"attn_logit_softcap": None}, {"final_logit_softcap": None}):
        wrong = dataclasses.replace(source, arch=dataclasses.replace(source.arch, **change))
        from fitserve.models.loader import load_model
        ours = load_model(wrong, torch.float32, torch.device("cpu"), progress=False)
        with pytest.raises(AssertionError):
            check_prefill_and_decode(ours, hf, num_decode_steps=0)


def test_the_text_tower_of_an_image_text_checkpoint_matches_hf(tmp_path):
    """Gemma3ForConditionalGeneration: text_config gives the shapes, model.language_model.* the weights,
    the vision tower is skipped; a text prompt's logits equal transformers' whole model's."""
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(gemma3_image_text_config()).eval()
    save_random_checkpoint(tmp_path, hf)
    source, ours = load_ours(tmp_path)
    assert source.arch.architecture == "Gemma3ForConditionalGeneration" and source.eos_token_ids[:2] == (2, 3)
    assert source.arch.layer_types == tuple(GEMMA3_LAYERS) and isinstance(source.arch.rope_scaling, LinearRopeScaling)
    check_prefill_and_decode(ours, hf, num_decode_steps=2)


@pytest.mark.parametrize("name", list(MODELS))
def test_the_engine_generates_transformers_greedy_tokens(tmp_path, name):
    check_engine_greedy(tmp_path, write_checkpoint(tmp_path, name))


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("name", list(MODELS))
def test_plan_weight_bytes_are_the_models_bytes(tmp_path, name, tied):
    """`fitserve plan`'s weight bytes, from config.json and from the safetensors headers, equal what
    the loaded model holds: 4 norms a layer, Gemma 3's q/k norms and its second rotary table."""
    write_checkpoint(tmp_path, name, tied)
    source, ours = load_ours(tmp_path)
    held_bytes = sum(t.numel() * t.element_size() for t in [*ours.parameters(), *ours.buffers()]
                     if t is not ours.embed_scale)
    from_config = weight_bytes(counts_from_arch(source.arch), "float32", None)
    from_headers = weight_bytes(model_param_counts(source.arch, str(tmp_path)), "float32", None)
    assert from_config.total_bytes == from_headers.total_bytes == held_bytes
    norms = sum(p.numel() * 4 for n, p in ours.named_parameters() if n.endswith("norm.weight"))
    assert from_config.norm_bytes == norms


def test_plan_counts_the_image_text_checkpoints_text_tower_only(tmp_path):
    torch.manual_seed(0)
    transformers.Gemma3ForConditionalGeneration(gemma3_image_text_config()).save_pretrained(tmp_path)
    source, ours = load_ours(tmp_path)
    from_headers = model_param_counts(source.arch, str(tmp_path))
    assert from_headers.num_params == counts_from_arch(source.arch).num_params
    assert from_headers.num_params == sum(p.numel() for p in ours.parameters())


def test_older_configs_give_the_layer_pattern_and_rope_bases():
    """transformers 4 configs: no layer_types (Gemma 2 alternates from a local layer 0, Gemma 3 has one
    global layer in sliding_window_pattern), rope_theta / rope_local_base_freq / rope_scaling at the top."""
    base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=300, sliding_window=512)
    g2 = ArchConfig.from_hf_config({"architectures": ["Gemma2ForCausalLM"], **base})
    assert [g2.layer_window(i) for i in range(6)] == [512, None] * 3
    assert (g2.attn_logit_softcap, g2.final_logit_softcap, g2.query_pre_attn_scalar) == (50.0, 30.0, 256.0)
    g3 = ArchConfig.from_hf_config({"architectures": ["Gemma3ForCausalLM"], **base, "sliding_window_pattern": 3,
                                    "rope_theta": 1e6, "rope_local_base_freq": 1e4, "final_logit_softcapping": None,
                                    "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    assert [g3.layer_window(i) for i in range(6)] == [512, 512, None] * 2
    assert (g3.rope_theta, g3.rope_local_theta, g3.rope_scaling) == (1e6, 1e4, LinearRopeScaling(8.0))
    assert (g3.qk_norm, g3.final_logit_softcap, g3.sandwich_norms) == (True, None, True)


def test_gemma3_4b_config_gives_its_published_text_parameters():
    """google/gemma-3-4b-it's config.json (text_config of a few keys over transformers' defaults): the
    3,880,263,168 parameters of transformers' Gemma3ForCausalLM built from that text config (tied
    262,208 x 2560 embedding included; the 0.4 B of the vision tower are not served)."""
    arch = ArchConfig.from_hf_config({
        "architectures": ["Gemma3ForConditionalGeneration"], "eos_token_id": [1, 106],
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                        "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024}, "torch_dtype": "bfloat16"})
    assert (arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim, arch.vocab_size) == (8, 4, 256, 262208)
    assert arch.eos_token_ids == (1, 106) and arch.layer_types.count("full_attention") == 5
    assert counts_from_arch(arch).num_params == 3_880_263_168


@pytest.mark.parametrize("switch", [{"hidden_activation": "silu"}, {"attention_bias": True},
                                    {"use_bidirectional_attention": True}])
def test_switches_fitserve_does_not_implement_are_refused(tmp_path, switch):
    write_checkpoint(tmp_path, "gemma3")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **switch}))
    with pytest.raises(ConfigError, match=next(iter(switch))):
        resolve_model_source(EngineConfig(model=str(tmp_path)))


def test_an_image_text_config_without_a_text_model_is_refused():
    with pytest.raises(ConfigError, match="text_config"):
        ArchConfig.from_hf_config({"architectures": ["Gemma3ForConditionalGeneration"], "vision_config": {}})


def test_plan_says_what_the_windowed_groups_save():
    """Gemma 3 1B at 32,768 tokens: 22 of 26 layers (all but 5, 11, 17, 23) in 6 windowed groups of 4 (the
    last of 2), each holding 512 / 16 + 1 = 33 blocks: (2048 + 6 * 33) * 4 layer-blocks against 2048 * 26,
    83% fewer KV bytes; a model without windows has no such line."""
    from fitserve.plan.planner import PlanInputs, plan_memory
    from fitserve.plan.report import format_plan
    gemma3_1b = ArchConfig.from_hf_config({
        "architectures": ["Gemma3ForCausalLM"], "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144,
        "sliding_window": 512, "sliding_window_pattern": 6, "max_position_embeddings": 32768})
    text = " ".join(format_plan(plan_memory(PlanInputs(
        arch=gemma3_1b, model_name="gemma-3-1b", param_counts=counts_from_arch(gemma3_1b), max_model_len=32768,
        device_total_bytes=20 * 2**30, gpu_name="test card", gpu_memory_utilization=0.9))).split())
    assert "22 of 26 layers attend over a sliding window of 512 tokens: 7 KV cache groups of up to 4 layers" in text
    assert "holds at most 33 blocks per request, so a request at 32,768 tokens holds 83% fewer KV bytes" in text
    llama = dataclasses_replace(gemma3_1b, sliding_window=None)
    assert "sliding window" not in format_plan(plan_memory(PlanInputs(
        arch=llama, model_name="x", param_counts=counts_from_arch(llama), max_model_len=32768,
        device_total_bytes=20 * 2**30, gpu_name="test card", gpu_memory_utilization=0.9)))


def test_gemma3_gguf_tensors_take_gemmas_names_and_norms():
    """llama.cpp names Gemma's pre-feedforward norm `ffn_norm` (Llama's post-attention norm) and stores
    every norm weight as 1 + w; the projections keep their values (no q/k row permutation)."""
    import numpy as np

    from fitserve.weights.gguf_file import gemma3_hf_tensor_name, gemma3_norm_from_gguf, hf_tensor_name
    assert hf_tensor_name("blk.2.ffn_norm.weight") == "model.layers.2.post_attention_layernorm.weight"
    assert {g: gemma3_hf_tensor_name(f"blk.2.{g}.weight") for g in (
        "ffn_norm", "post_attention_norm", "post_ffw_norm", "attn_q_norm", "attn_norm")} == {
        "ffn_norm": "model.layers.2.pre_feedforward_layernorm.weight",
        "post_attention_norm": "model.layers.2.post_attention_layernorm.weight",
        "post_ffw_norm": "model.layers.2.post_feedforward_layernorm.weight",
        "attn_q_norm": "model.layers.2.self_attn.q_norm.weight", "attn_norm": "model.layers.2.input_layernorm.weight"}
    with pytest.raises(ConfigError, match="Gemma 3"):
        gemma3_hf_tensor_name("blk.0.ssm_conv1d.weight")
    values = np.array([1.5, 0.25], dtype=np.float32)
    np.testing.assert_array_equal(gemma3_norm_from_gguf("model.norm.weight", values), [0.5, -0.75])
    np.testing.assert_array_equal(gemma3_norm_from_gguf("model.layers.0.self_attn.q_proj.weight", values), values)


@pytest.mark.parametrize("name", list(MODELS))
def test_tp2_greedy_tokens_equal_tp1(tmp_path, name):
    """Two CPU ranks (gloo), each with half the heads and MLP columns and whole norms, give one rank's
    greedy tokens; prompts up to 29 tokens prefilled in 16-token chunks, so windows span chunks."""
    from tp_helpers import greedy_tokens, tiny_llm
    write_checkpoint(tmp_path, name)
    with tiny_llm(tmp_path, 1) as llm:
        tp1 = greedy_tokens(llm)
    with tiny_llm(tmp_path, 2) as llm:
        assert llm.engine.runner.model.arch.num_key_value_heads == 1
        assert greedy_tokens(llm) == tp1


def test_fp8_weights_stay_close_to_the_serving_dtype(tmp_path):
    """--quantization fp8 quantizes the blocks' projections (the norms and GELU hand them plain rows);
    the logits stay within 20% in relative norm of the unquantized model's (9% here; Qwen3's tiny model
    is 6% off. Gemma 3's tiny model is 45% off, 15% with its random q/k norm weights set to zero: the
    scaled-up q and k make its attention peaked, which amplifies the rounding; so it is not the one checked)."""
    from fitserve.models.loader import load_model
    from hf_compare_helpers import PROMPTS
    from paged_helpers import PagedDriver
    write_checkpoint(tmp_path, "gemma2")
    source, plain = load_ours(tmp_path)
    fp8 = load_model(source, torch.float32, torch.device("cpu"), progress=False, quantization="fp8")
    chunks = [(f"r{i}", p) for i, p in enumerate(PROMPTS)]
    want, got = PagedDriver(plain).step(chunks), PagedDriver(fp8).step(chunks)
    assert 0 < ((got - want).norm() / want.norm()).item() < 0.2


def test_image_text_tensor_names_of_both_layouts_map_to_the_text_model():
    """The hub's Gemma 3 4B+ files (transformers 4.50: language_model.model.*) and later saves
    (model.language_model.*) both give the text model's names; the vision tower's are skipped."""
    from fitserve.models.gemma3 import text_tensor_name
    assert text_tensor_name("language_model.model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert text_tensor_name("language_model.lm_head.weight") == "lm_head.weight"
    assert text_tensor_name("model.language_model.norm.weight") == "model.norm.weight"
    assert text_tensor_name("model.layers.3.self_attn.q_norm.weight") == "model.layers.3.self_attn.q_norm.weight"
    for vision in ("vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
                   "model.multi_modal_projector.mm_input_projection_weight"):
        assert text_tensor_name(vision) is None
