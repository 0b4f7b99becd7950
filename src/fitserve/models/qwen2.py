"""Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`): Llama's blocks with a bias on the q, k and v projections.

transformers' Qwen2 gives q_proj, k_proj and v_proj a bias (o_proj and the MLP none), ties the
embeddings when config.json says so (the small Qwen2.5 models), and has a sliding window that real
checkpoints leave off (`use_sliding_window: false`; arch_config.ArchConfig refuses one that turns it on).

The bias is added to the merged qkv projection's output, after the weight format's matmul, so it
works with every weight format (bf16, fp8) and on every device: one [q + 2 kv rows] vector in the
serving dtype per layer, split over tensor-parallel ranks like the q, k, v rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from fitserve.arch_config import ArchConfig
from fitserve.forward_batch import ForwardBatch
from fitserve.layers.parallel import TensorShard
from fitserve.layers.rotary import RotaryEmbedding
from fitserve.layers.weight_format import QuantizedRows
from fitserve.models.base import LayerBuild
from fitserve.models.llama import LlamaAttention, LlamaForCausalLM, hf_tensor_shapes

_BIASED_PROJECTIONS = ("q_proj", "k_proj", "v_proj")  # in the order of the merged qkv rows


def qkv_bias_rows(arch: ArchConfig) -> dict[str, int]:
    """q_proj, k_proj, v_proj -> the rows of its bias (arch: the whole model or one rank's shard)."""
    q_rows, kv_rows = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
    return {"q_proj": q_rows, "k_proj": kv_rows, "v_proj": kv_rows}


def qwen2_tensor_shapes(arch: ArchConfig) -> dict[str, tuple[int, ...]]:
    """Llama's tensors plus each layer's self_attn.{q,k,v}_proj.bias."""
    shapes = hf_tensor_shapes(arch)
    for i in range(arch.num_hidden_layers):
        shapes.update({f"model.layers.{i}.self_attn.{proj}.bias": (rows,)
                       for proj, rows in qkv_bias_rows(arch).items()})
    return shapes


class Qwen2Attention(LlamaAttention):
    """LlamaAttention plus qkv_bias [q + 2 kv rows of this rank] in the serving dtype."""

    def __init__(self, arch: ArchConfig, rotary: RotaryEmbedding, build: LayerBuild) -> None:
        super().__init__(arch, rotary, build)
        self.qkv_bias = nn.Parameter(torch.zeros(sum(self.qkv_sizes), dtype=build.dtype, device=build.device),
                                     requires_grad=False)

    def forward(self, hidden: torch.Tensor | QuantizedRows, batch: ForwardBatch) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)  # [T, q + 2 kv rows] in the serving dtype, whatever the weight format
        q, k, v = qkv.add_(self.qkv_bias).split(self.qkv_sizes, dim=-1)
        return self.tp.all_reduce(self.o_proj(self.attn(q, k, v, batch)))


class Qwen2ForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM with Qwen2Attention; loads the q, k, v biases (this rank's rows of each)."""

    attention_class = Qwen2Attention

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        biases: set[str] = set()

        def without_biases() -> Iterator[tuple[str, torch.Tensor]]:
            for hf_name, tensor in weights:
                if hf_name.endswith(".bias"):
                    self._load_bias(hf_name, tensor)
                    biases.add(hf_name)
                else:
                    yield hf_name, tensor

        return super().load_weights(without_biases()) | biases

    @torch.no_grad()
    def _load_bias(self, hf_name: str, tensor: torch.Tensor) -> None:
        """model.layers.i.self_attn.{q,k,v}_proj.bias, whole or already this rank's slice."""
        parts = hf_name.split(".")
        if (len(parts) != 6 or parts[:2] != ["model", "layers"] or not parts[2].isdigit()
                or int(parts[2]) >= len(self.layers) or parts[3] != "self_attn" or parts[4] not in _BIASED_PROJECTIONS):
            raise ValueError(f"unexpected checkpoint tensor {hf_name!r}")
        shard = self.checkpoint_slice(hf_name)
        if shard is not None and tensor.shape[0] != shard.length:
            tensor = tensor.narrow(0, shard.start, shard.length)
        rows = qkv_bias_rows(self.arch)
        if tuple(tensor.shape) != (rows[parts[4]],):
            raise ValueError(f"{hf_name}: expected ({rows[parts[4]]},), got {tuple(tensor.shape)}")
        start = sum(rows[p] for p in _BIASED_PROJECTIONS[:_BIASED_PROJECTIONS.index(parts[4])])
        bias = self.layers[int(parts[2])].self_attn.qkv_bias
        bias[start:start + tensor.shape[0]].copy_(tensor)

    def checkpoint_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return qwen2_tensor_shapes(self.full_arch)

    def checkpoint_slice(self, hf_name: str) -> TensorShard | None:
        """A bias is split like its projection's rows (column-parallel); the rest as Llama."""
        proj = hf_name.split(".")[-2] if hf_name.endswith(".bias") else None
        if proj not in _BIASED_PROJECTIONS or self.tp.size == 1:
            return super().checkpoint_slice(hf_name)
        length = qkv_bias_rows(self.full_arch)[proj] // self.tp.size
        return TensorShard(0, self.tp.rank * length, length)

    def expected_weight_names(self) -> set[str]:
        return set(qwen2_tensor_shapes(self.full_arch))
