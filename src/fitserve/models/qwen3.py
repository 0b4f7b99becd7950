"""Qwen3 (`Qwen3ForCausalLM`): Llama's blocks with an RMSNorm on each q and k head, no biases.

transformers' Qwen3 normalises every head of q and of k over head_dim (`q_norm`, `k_norm`, one
[head_dim] weight each per layer) before the rotary embedding; head_dim comes from config.json
(128 on every size, not hidden_size / heads: Qwen3-0.6B has 16 heads of 128 over a hidden size of
1024). `attention_bias` and `use_sliding_window` stay off in real checkpoints; arch_config.ArchConfig
refuses a config that turns either on.

The norms run before PagedAttention, so on CUDA before its fused rotary + KV-store kernel, with the
same RMSNorm kernel as the blocks' norms (layers/norm.py HeadRMSNorm).
"""

from __future__ import annotations

import torch

from fitserve.arch_config import ArchConfig
from fitserve.forward_batch import ForwardBatch
from fitserve.layers.norm import HeadRMSNorm, norm_q_and_k
from fitserve.layers.rotary import RotaryEmbedding
from fitserve.layers.weight_format import QuantizedRows
from fitserve.models.base import LayerBuild
from fitserve.models.llama import LlamaAttention, LlamaForCausalLM, hf_tensor_shapes


def qwen3_tensor_shapes(arch: ArchConfig) -> dict[str, tuple[int, ...]]:
    """Llama's tensors plus each layer's self_attn.q_norm.weight and k_norm.weight [head_dim]."""
    shapes = hf_tensor_shapes(arch)
    for i in range(arch.num_hidden_layers):
        shapes.update({f"model.layers.{i}.self_attn.{norm}.weight": (arch.head_dim,) for norm in ("q_norm", "k_norm")})
    return shapes


class Qwen3Attention(LlamaAttention):
    """LlamaAttention with q_norm and k_norm (weights [head_dim], the same on every tensor-parallel rank)."""

    def __init__(self, arch: ArchConfig, rotary: RotaryEmbedding, build: LayerBuild) -> None:
        super().__init__(arch, rotary, build)
        self.q_norm = HeadRMSNorm(arch.head_dim, arch.rms_norm_eps, build.dtype, build.device)
        self.k_norm = HeadRMSNorm(arch.head_dim, arch.rms_norm_eps, build.dtype, build.device)

    def forward(self, hidden: torch.Tensor | QuantizedRows, batch: ForwardBatch) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split(self.qkv_sizes, dim=-1)
        # normed before rotary: PagedAttention rotates (on CUDA in its KV-store kernel) what it is given
        q, k = norm_q_and_k(q, k, self.q_norm, self.k_norm)
        return self.tp.all_reduce(self.o_proj(self.attn(q, k, v, batch)))


class Qwen3ForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM with Qwen3Attention; q_norm / k_norm load by name like the other norms."""

    attention_class = Qwen3Attention

    def checkpoint_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return qwen3_tensor_shapes(self.full_arch)

    def expected_weight_names(self) -> set[str]:
        return set(qwen3_tensor_shapes(self.full_arch))
