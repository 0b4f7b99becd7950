"""Mixtral and Qwen3-MoE match transformers on the same tiny random checkpoints (float32, CPU): the
router's top-k choice, the experts, the dense layers of Qwen3-MoE; and the planner counts them."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch
import transformers

from fitserve.arch_config import ArchConfig
from fitserve.config import ConfigError, EngineConfig
from fitserve.kernels import moe_reference
from fitserve.layers.moe import MoE
from fitserve.models.mixtral import MixtralForCausalLM
from fitserve.models.qwen3_moe import Qwen3MoeForCausalLM
from fitserve.plan.estimates import MOE_ROUTING_BYTES_PER_CHOICE, forward_peak_bytes
from fitserve.plan.shapes import counts_from_arch, model_param_counts, weight_bytes
from fitserve.weights.source import resolve_model_source
from hf_compare_helpers import check_engine_greedy, check_prefill_and_decode, load_ours
from moe_helpers import MODELS, write_moe_checkpoint

CASES = {"mixtral": ("mixtral", {}),
         "qwen3_moe": ("qwen3_moe", {}),
         "qwen3_moe_unnormalised": ("qwen3_moe", {"norm_topk_prob": False, "mlp_only_layers": []})}


@pytest.mark.parametrize("case", list(CASES))
def test_batched_prefill_and_decode_match_hf(tmp_path, case):
    name, overrides = CASES[case]
    hf = write_moe_checkpoint(tmp_path, name, **overrides)
    source, ours = load_ours(tmp_path)
    assert type(ours).__name__ == hf.config.architectures[0]
    assert [isinstance(layer.mlp, MoE) for layer in ours.layers] == [
        True, name == "mixtral" or not overrides.get("mlp_only_layers", [1])]
    check_prefill_and_decode(ours, hf)


@pytest.mark.parametrize("name", list(MODELS))
def test_the_engine_generates_transformers_greedy_tokens(tmp_path, name):
    check_engine_greedy(tmp_path, write_moe_checkpoint(tmp_path, name))


def test_the_config_gives_the_experts(tmp_path):
    write_moe_checkpoint(tmp_path / "m", "mixtral")
    write_moe_checkpoint(tmp_path / "q", "qwen3_moe", norm_topk_prob=False)
    m = resolve_model_source(EngineConfig(model=str(tmp_path / "m"))).arch
    q = resolve_model_source(EngineConfig(model=str(tmp_path / "q"))).arch
    assert (m.num_experts, m.num_experts_per_tok, m.moe_intermediate_size, m.norm_topk_prob, m.dense_mlp_layers) == (
        6, 2, 96, True, ())
    assert (q.num_experts, q.num_experts_per_tok, q.moe_intermediate_size, q.norm_topk_prob, q.dense_mlp_layers) == (
        8, 2, 48, False, (1,))
    assert q.qk_norm and not m.qk_norm
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert "num_local_experts" in config  # transformers 5 writes Qwen3-MoE's num_experts under Mixtral's key
    sparse_step = {**config, "mlp_only_layers": [], "decoder_sparse_step": 2, "num_hidden_layers": 4}
    assert ArchConfig.from_hf_config(sparse_step).dense_mlp_layers == (0, 2)  # experts on layers 1 and 3


def test_routing_renormalises_only_when_asked():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 3.5, 0.0]])
    weights, ids = moe_reference.route(logits, 2, renormalize=False)
    assert ids.tolist() == [[0, 1], [2, 1]]
    torch.testing.assert_close(weights, torch.softmax(logits, -1).topk(2).values)
    normed, _ = moe_reference.route(logits, 2, renormalize=True)
    torch.testing.assert_close(normed.sum(-1), torch.ones(2))
    assert normed[0, 0] > weights[0, 0]


def test_a_wrong_expert_tensor_is_refused_with_its_name(tmp_path):
    write_moe_checkpoint(tmp_path, "mixtral")
    source, ours = load_ours(tmp_path)
    bad = "model.layers.1.block_sparse_moe.experts.2.w2.weight"
    with pytest.raises(ValueError, match=f"{bad}: expert 2 down: expected"):
        ours.load_weights([(bad, torch.zeros(96, 64))])
    with pytest.raises(ValueError, match="expert 9 of a layer of 6"):
        ours.load_weights([("model.layers.0.block_sparse_moe.experts.9.w1.weight", torch.zeros(96, 64))])
    with pytest.raises(ValueError, match="fp8 MoE checkpoint"):
        ours.load_weights([("model.layers.0.block_sparse_moe.experts.0.w1.weight_scale", torch.ones(1))])
    with pytest.raises(ValueError, match="stored in fp8"):
        ours.load_weights([("model.layers.0.block_sparse_moe.experts.0.w1.weight",
                            torch.zeros(96, 64, dtype=torch.float8_e4m3fn))])


def test_fp8_quantizes_attention_and_keeps_the_experts_in_the_serving_dtype(tmp_path):
    write_moe_checkpoint(tmp_path, "qwen3_moe")
    source = resolve_model_source(EngineConfig(model=str(tmp_path)))
    model = Qwen3MoeForCausalLM(source.arch, torch.bfloat16, torch.device("cpu"), quantization="fp8")
    moe, dense = model.layers[0].mlp, model.layers[1].mlp
    assert moe.w13.dtype == moe.w2.dtype == moe.router.dtype == torch.bfloat16
    assert model.layers[0].self_attn.qkv_proj.weight.dtype == dense.down_proj.weight.dtype == torch.float8_e4m3fn
    assert not model.layers[0].fp8_mlp_input and model.layers[1].fp8_mlp_input


def test_a_model_built_without_experts_has_none():
    arch = ArchConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=16, architecture="MixtralForCausalLM", num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=16)
    model = MixtralForCausalLM(arch, torch.float32, torch.device("cpu"))
    assert all(layer.mlp.w13.shape == (4, 32, 32) and layer.mlp.w2.shape == (4, 32, 16) for layer in model.layers)
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        ArchConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=5)


@pytest.mark.parametrize("case", list(CASES))
def test_plan_weight_bytes_are_the_models_bytes(tmp_path, case):
    """`fitserve plan`'s weight bytes, from config.json and from the safetensors headers, equal what the
    loaded model holds (parameters, experts and routers included, and the rotary tables)."""
    name, overrides = CASES[case]
    write_moe_checkpoint(tmp_path, name, **overrides)
    source, ours = load_ours(tmp_path)
    held_bytes = sum(t.numel() * t.element_size() for t in [*ours.parameters(), *ours.buffers()])
    from_config = weight_bytes(counts_from_arch(source.arch), "float32", None)
    from_headers = weight_bytes(model_param_counts(source.arch, str(tmp_path)), "float32", None)
    assert from_config == from_headers  # every field, not only the total
    assert from_config.total_bytes == held_bytes
    moe_bytes = sum(p.numel() * 4 for layer in ours.layers if isinstance(layer.mlp, MoE) for p in layer.mlp.parameters())
    assert from_config.expert_bytes == moe_bytes > 0


def test_fp8_plans_the_experts_in_the_serving_dtype():
    arch = ArchConfig.from_hf_config({**MIXTRAL_8X7B, "num_hidden_layers": 2})
    bf16, fp8 = (weight_bytes(counts_from_arch(arch), "bfloat16", q) for q in (None, "fp8"))
    assert fp8.expert_bytes == bf16.expert_bytes == 2 * (8 * 3 * 14336 * 4096 + 8 * 4096) * 2
    assert fp8.linear_bytes == bf16.linear_bytes // 2  # attention only: 2 linear layers a layer
    assert fp8.scale_bytes == 2 * 2 * 4
    per_rank = counts_from_arch(arch).per_rank(2)
    assert per_rank.expert_params == counts_from_arch(arch).expert_params // 2
    assert per_rank.router_params == counts_from_arch(arch).router_params


# config.json of mistralai/Mixtral-8x7B-v0.1 and Qwen/Qwen3-30B-A3B (the keys the count reads)
MIXTRAL_8X7B = {"architectures": ["MixtralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
                "num_experts_per_tok": 2, "vocab_size": 32000, "max_position_embeddings": 32768, "rope_theta": 1e6,
                "sliding_window": None, "tie_word_embeddings": False}
QWEN3_30B_A3B = {"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 2048, "intermediate_size": 6144,
                 "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
                 "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
                 "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 151936,
                 "max_position_embeddings": 40960, "tie_word_embeddings": False, "use_sliding_window": False}
PUBLISHED = [(MIXTRAL_8X7B, transformers.MixtralConfig, transformers.MixtralForCausalLM, 46_702_792_704),
             (QWEN3_30B_A3B, transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, 30_532_122_624)]


@pytest.mark.parametrize("config,config_class,model_class,published", PUBLISHED, ids=["mixtral-8x7b", "qwen3-30b-a3b"])
def test_plan_counts_the_published_parameters_of_real_configs(config, config_class, model_class, published):
    """The published totals, which transformers' own model built on the meta device (no memory) agrees with."""
    assert counts_from_arch(ArchConfig.from_hf_config(config)).num_params == published
    with torch.device("meta"):
        hf = model_class(config_class(**{k: v for k, v in config.items() if k != "architectures"}))
    assert sum(p.numel() for p in hf.parameters()) == published


def test_an_fp8_moe_checkpoint_is_refused_before_loading(tmp_path):
    write_moe_checkpoint(tmp_path, "mixtral")
    config = json.loads((tmp_path / "config.json").read_text())
    fp8 = {**config, "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"}}
    (tmp_path / "config.json").write_text(json.dumps(fp8))
    with pytest.raises(ConfigError, match="quantized checkpoint of a Mixture-of-Experts model"):
        resolve_model_source(EngineConfig(model=str(tmp_path)))


def test_the_activation_estimate_counts_every_tokens_k_expert_rows():
    """Mixtral-8x7B: each token's 2 choices hold gate_up, the SiLU output and the down output."""
    arch = ArchConfig.from_hf_config(MIXTRAL_8X7B)
    per_token = forward_peak_bytes(arch, 1, 2)
    assert per_token == 2 * 6 * 4096 + 2 * (2 * (3 * 14336 + 4096) + MOE_ROUTING_BYTES_PER_CHOICE)
    assert per_token > forward_peak_bytes(replace(arch, num_experts=0), 1, 2)  # the dense MLP of one expert


def test_fitserve_plan_shows_the_experts_row_and_json(tmp_path, capsys):
    from fitserve.cli import main
    (tmp_path / "config.json").write_text(json.dumps(MIXTRAL_8X7B))
    assert main(["plan", "--model", str(tmp_path), "--gpu", "h200", "--quantization", "fp8"]) == 0
    out = capsys.readouterr().out
    assert "46.70 B parameters" in out
    assert re.search(r"weights: MoE experts \+ routers \(bfloat16\) +84\.00 GiB", out)  # fp8 leaves them alone
    assert main(["plan", "--model", str(tmp_path), "--gpu", "h200", "--json"]) == 0
    weights = json.loads(capsys.readouterr().out)["weights"]
    assert weights["expert_bytes"] == 32 * (8 * 3 * 14336 * 4096 + 8 * 4096) * 2


def test_a_moe_model_that_does_not_fit_names_its_experts(tmp_path, capsys):
    from fitserve.cli import main
    (tmp_path / "config.json").write_text(json.dumps(MIXTRAL_8X7B))
    assert main(["plan", "--model", str(tmp_path), "--gpu", "RTX 4000 Ada"]) == 1
    assert "84.00 GiB of MoE experts in bfloat16" in capsys.readouterr().out.replace("\n", " ")
