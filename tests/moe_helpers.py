"""Tiny random Mixtral and Qwen3-MoE checkpoints written by transformers' own classes."""

from __future__ import annotations

import torch
import transformers

from hf_compare_helpers import save_random_checkpoint

TINY_MOE = dict(vocab_size=311, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                num_experts_per_tok=2)
ROUTER_STD = 1.0  # transformers draws routers near zero; well-separated choices keep top-k stable under
# float32 rounding differences between fitserve's attention and transformers'


def mixtral_config(**overrides: object) -> transformers.MixtralConfig:
    return transformers.MixtralConfig(**{**TINY_MOE, "num_local_experts": 6, **overrides})


def qwen3_moe_config(**overrides: object) -> transformers.Qwen3MoeConfig:
    """8 experts of 48 columns; layer 1 a dense MLP of 96 columns (mlp_only_layers)."""
    return transformers.Qwen3MoeConfig(**{**TINY_MOE, "num_experts": 8, "moe_intermediate_size": 48, "head_dim": 32,
                                          "norm_topk_prob": True, "mlp_only_layers": [1], **overrides})


MODELS = {"mixtral": (mixtral_config, transformers.MixtralForCausalLM),
          "qwen3_moe": (qwen3_moe_config, transformers.Qwen3MoeForCausalLM)}


def write_moe_checkpoint(folder, name: str, **overrides: object):
    """transformers' model (eval, float32) with random norms and routers, saved as safetensors in `folder`."""
    make_config, model_class = MODELS[name]
    torch.manual_seed(0)
    hf = model_class(make_config(**overrides)).eval()
    with torch.no_grad():
        for param_name, param in hf.named_parameters():
            if param_name.endswith("mlp.gate.weight"):  # transformers 5 names the router mlp.gate in memory
                param.normal_(0.0, ROUTER_STD)
    return save_random_checkpoint(folder, hf)
