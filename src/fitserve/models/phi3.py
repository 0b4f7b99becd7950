"""Phi-3 (`Phi3ForCausalLM`): Llama's blocks, with q, k, v and gate, up fused in the checkpoint.

transformers' Phi-3 stores `self_attn.qkv_proj.weight` ([q rows | k rows | v rows], hidden) and
`mlp.gate_up_proj.weight` ([gate rows | up rows], hidden), the same row order as Llama's merged
layers here. At load each fused tensor is split into its parts and handed on under Llama's names
(q_proj, k_proj, v_proj, gate_proj, up_proj), so the weight format and the tensor-parallel slicing
see what they see for Llama; under tensor parallelism a fused tensor is read whole (a rank's rows
of q, k and v are not one contiguous slice) and each part is narrowed to the rank's rows.

LongRoPE ("longrope" / "su" rope scaling: Phi-3-mini-128k, Phi-3.5-mini, Phi-3-medium-128k, Phi-4-mini) is
served with one factor list per server, chosen by --max-model-len (longrope.py): the long factors when it is
above original_max_position_embeddings, else the short ones, so a server at --max-model-len 4096 or
less equals transformers on every sequence, and one with a longer context equals it on sequences
longer than 4096 tokens (shorter ones rotate with the long factors, as in llama.cpp). The start-up
log names the list.

A partial rotary factor (Phi-4-mini: the first 96 of each head's 128 dims rotate, as pairs (i, i + 48),
the rest pass through) is served without a kernel of its own: at load each q and k head's rows are
reordered (layers/rotary.partial_rotary_order) so that the rotated pairs sit where the rotary table
and kernels pair dims, (i, i + 64), and the pass-through dims where the table holds cos 1, sin 0.
q and k reordered alike give the same q.k, so the same attention. A sliding window (Phi-3-mini-4k:
2047 tokens) is attended as transformers does. An fp8 checkpoint's scales of a fused tensor are refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace

import torch

from fitserve.arch_config import ArchConfig
from fitserve.layers.parallel import TensorShard
from fitserve.layers.rotary import partial_rotary_order
from fitserve.models.llama import LlamaForCausalLM, hf_tensor_shapes, layer_projection_shapes
from fitserve.weights.gguf_packed import PackedGgufTensor

# fused checkpoint projection -> (its block, the Llama projections it holds, in row order)
_FUSED = {"qkv_proj": ("self_attn", ("q_proj", "k_proj", "v_proj")),
          "gate_up_proj": ("mlp", ("gate_proj", "up_proj"))}


def phi3_tensor_shapes(arch: ArchConfig) -> dict[str, tuple[int, ...]]:
    """Llama's tensors with each layer's q, k, v and gate, up projections fused."""
    shapes = {name: shape for name, shape in hf_tensor_shapes(arch).items()
              if name.split(".")[-2] not in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")}
    parts = layer_projection_shapes(arch)
    for i in range(arch.num_hidden_layers):
        for fused, (block, projections) in _FUSED.items():
            rows = sum(parts[f"{block}.{p}"][0] for p in projections)
            shapes[f"model.layers.{i}.{block}.{fused}.weight"] = (rows, arch.hidden_size)
    return shapes


class Phi3ForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM that splits Phi-3's fused qkv_proj and gate_up_proj tensors at load."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        fused_names: dict[str, str] = {}  # a part's Llama name -> the fused checkpoint name it came from

        def split() -> Iterator[tuple[str, torch.Tensor]]:
            for hf_name, tensor in weights:
                prefix, _, piece = hf_name.rpartition(".")
                owner_prefix, _, owner = prefix.rpartition(".")
                if owner not in _FUSED:
                    yield hf_name, tensor
                    continue
                if piece != "weight":
                    raise ValueError(f"{hf_name}: fitserve reads no fp8 scales of Phi-3's fused projections")
                for name, part in self._split_fused(owner_prefix, owner, hf_name, tensor):
                    fused_names[name] = hf_name
                    yield name, part

        loaded = super().load_weights(split())
        return {fused_names.get(name, name) for name in loaded}

    def _split_fused(self, owner_prefix: str, owner: str, hf_name: str,
                     tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """The whole fused tensor's row blocks, each under its Llama projection's name (a GGUF file's packed
        blocks, --quantization gguf, are cut into whole rows)."""
        block, projections = _FUSED[owner]
        shapes = layer_projection_shapes(self.full_arch)
        rows = [shapes[f"{block}.{p}"][0] for p in projections]
        if tensor.shape[0] != sum(rows):
            raise ValueError(f"{hf_name}: expected {sum(rows)} rows, got {tuple(tensor.shape)}")
        parts = tensor.split_rows(rows) if isinstance(tensor, PackedGgufTensor) else tensor.split(rows, dim=0)
        for projection, part in zip(projections, parts):
            if projection in ("q_proj", "k_proj") and self.full_arch.rotary_dim is not None:
                part = self._partial_rotary_rows(part)
            yield f"{owner_prefix}.{projection}.weight", part

    def _partial_rotary_rows(self, part: torch.Tensor | PackedGgufTensor) -> torch.Tensor | PackedGgufTensor:
        """q or k rows [heads * D, ...] with each head's dims in layers/rotary.partial_rotary_order (whole
        packed rows move as dense ones)."""
        arch = self.full_arch
        order = torch.tensor(partial_rotary_order(arch.head_dim, arch.rotated_dims))
        rows = part.data if isinstance(part, PackedGgufTensor) else part
        moved = rows.reshape(-1, arch.head_dim, *rows.shape[1:])[:, order].reshape(rows.shape)
        return replace(part, data=moved) if isinstance(part, PackedGgufTensor) else moved

    def checkpoint_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return phi3_tensor_shapes(self.full_arch)

    def checkpoint_slice(self, hf_name: str) -> TensorShard | None:
        """A fused tensor is read whole (load_weights narrows each part); the rest as Llama."""
        if hf_name.rpartition(".")[0].rpartition(".")[2] in _FUSED:
            return None
        return super().checkpoint_slice(hf_name)

    def expected_weight_names(self) -> set[str]:
        return set(phi3_tensor_shapes(self.full_arch))
