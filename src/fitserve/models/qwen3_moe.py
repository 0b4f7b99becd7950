"""Qwen3-MoE (`Qwen3MoeForCausalLM`, Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention (q and k
RMSNorm per head) and a Mixture-of-Experts MLP (layers/moe.py).

Each expert layer's `mlp` holds a router (`mlp.gate`) and `num_experts` SiLU-gated MLPs
(`mlp.experts.{e}.gate_proj`, `up_proj`, `down_proj`) of `moe_intermediate_size` columns; each
token goes to its `num_experts_per_tok` best experts, whose weights are renormalised to sum to 1
only when `norm_topk_prob` says so. Layers listed in `mlp_only_layers`, or off every
`decoder_sparse_step`, keep a dense MLP of `intermediate_size` (real checkpoints have none).
"""

from __future__ import annotations

from fitserve.models.mixtral import ExpertNames, MoeCausalLM
from fitserve.models.qwen3 import Qwen3Attention, qwen3_tensor_shapes


class Qwen3MoeForCausalLM(MoeCausalLM):
    attention_class = Qwen3Attention
    expert_names = ExpertNames("mlp", "gate_proj", "up_proj", "down_proj")

    def dense_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return qwen3_tensor_shapes(self.full_arch)
