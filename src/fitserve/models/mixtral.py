"""Mixtral (`MixtralForCausalLM`): Llama's attention, and in every layer a Mixture-of-Experts MLP.

Each layer's `block_sparse_moe` holds a router (`gate`, [num_experts, hidden]) and
`num_local_experts` SiLU-gated MLPs (`experts.{e}.w1` gate, `w3` up, `w2` down; each of
intermediate_size columns); every token goes to its top 2 experts, their weights renormalised to
sum to 1 (layers/moe.py). The checkpoint's per-expert tensors (what the hub holds, and what
transformers 5's save_pretrained writes, though it keeps them fused in memory) are loaded into
the layer's stacked expert weights. A sliding window in config.json is not applied (as Mistral).

`MoeCausalLM` is the machinery Qwen3-MoE shares (models/qwen3_moe.py): which layers hold experts,
how the per-expert checkpoint tensors are named, split over tensor-parallel ranks, and loaded.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from fitserve.arch_config import ArchConfig
from fitserve.layers.moe import DOWN, GATE, UP, MoE
from fitserve.layers.parallel import TensorShard
from fitserve.models.base import LayerBuild
from fitserve.models.llama import LlamaForCausalLM, hf_tensor_shapes


@dataclass(frozen=True, slots=True)
class ExpertNames:
    """How a checkpoint names a layer's MoE tensors: model.layers.{i}.{block}.gate.weight (the router)
    and model.layers.{i}.{block}.experts.{e}.{gate|up|down}.weight."""

    block: str
    gate: str
    up: str
    down: str

    def projection(self, name: str) -> str | None:
        return {self.gate: GATE, self.up: UP, self.down: DOWN}.get(name)


def moe_tensor_shapes(arch: ArchConfig, names: ExpertNames, dense_shapes: dict[str, tuple[int, ...]]
                      ) -> dict[str, tuple[int, ...]]:
    """`dense_shapes` (every layer with a dense MLP) with each expert layer's MLP replaced by its
    router [E, H] and each expert's gate, up [I, H] and down [H, I] (I: moe_intermediate_size)."""
    hidden, inter = arch.hidden_size, arch.moe_intermediate_size
    shapes = dict(dense_shapes)
    for i in range(arch.num_hidden_layers):
        if not arch.is_moe_layer(i):
            continue
        for proj in ("gate_proj", "up_proj", "down_proj"):
            del shapes[f"model.layers.{i}.mlp.{proj}.weight"]
        block = f"model.layers.{i}.{names.block}"
        shapes[f"{block}.gate.weight"] = (arch.num_experts, hidden)
        for e in range(arch.num_experts):
            shapes.update({f"{block}.experts.{e}.{names.gate}.weight": (inter, hidden),
                           f"{block}.experts.{e}.{names.up}.weight": (inter, hidden),
                           f"{block}.experts.{e}.{names.down}.weight": (hidden, inter)})
    return shapes


class MoeCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM whose expert layers (ArchConfig.is_moe_layer) hold a layers/moe.py MoE."""

    expert_names = ExpertNames("block_sparse_moe", "w1", "w3", "w2")

    def build_mlp(self, layer_index: int, arch: ArchConfig, build: LayerBuild) -> nn.Module | None:
        if not arch.is_moe_layer(layer_index):
            return None
        return MoE(arch.hidden_size, arch.moe_intermediate_size, arch.num_experts, arch.num_experts_per_tok,
                   arch.norm_topk_prob, build.dtype, build.device, build.tp)

    def dense_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """The checkpoint's tensors as if every layer had a dense MLP."""
        return hf_tensor_shapes(self.full_arch)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The routers and experts here; everything else as Llama."""
        taken: set[str] = set()

        def without_experts() -> Iterator[tuple[str, torch.Tensor]]:
            for hf_name, tensor in weights:
                if self._load_moe_tensor(hf_name, tensor):
                    taken.add(hf_name)
                else:
                    yield hf_name, tensor

        return super().load_weights(without_experts()) | taken

    def _parse(self, hf_name: str) -> tuple[int, int | None, str | None, str] | None:
        """(layer, expert or None for the router, projection, last part) of an MoE tensor's name, else None."""
        parts = hf_name.split(".")
        if len(parts) < 6 or parts[:2] != ["model", "layers"] or parts[3] != self.expert_names.block:
            return None
        if len(parts) == 6 and parts[4] == "gate" and parts[2].isdigit():
            return int(parts[2]), None, None, parts[5]
        if len(parts) == 8 and parts[4] == "experts" and parts[2].isdigit() and parts[5].isdigit():
            projection = self.expert_names.projection(parts[6])
            if projection is not None:
                return int(parts[2]), int(parts[5]), projection, parts[7]
        return None

    def _load_moe_tensor(self, hf_name: str, tensor: torch.Tensor) -> bool:
        """Load a router or expert tensor (whole, or already this rank's slice); False for any other."""
        parsed = self._parse(hf_name)
        if parsed is None:
            return False
        layer, expert, projection, piece = parsed
        if piece != "weight":
            raise ValueError(f"{hf_name}: fitserve reads expert and router weights unquantized only "
                             "(an fp8 MoE checkpoint is not supported)")
        moe = self.layers[layer].mlp if layer < len(self.layers) else None
        if not isinstance(moe, MoE):
            raise ValueError(f"unexpected checkpoint tensor {hf_name!r} (layer {layer} has no experts)")
        try:
            if expert is None:
                moe.load_router(tensor)
            else:
                shard = self.checkpoint_slice(hf_name)
                if shard is not None and tensor.shape[shard.dim] != shard.length:
                    tensor = tensor.narrow(shard.dim, shard.start, shard.length)
                moe.load_expert(expert, projection, tensor)
        except ValueError as exc:
            raise ValueError(f"{hf_name}: {exc}") from None
        return True

    def checkpoint_slice(self, hf_name: str) -> TensorShard | None:
        """An expert's gate and up are split by rows, its down by columns (I/N each); the router is whole."""
        parsed = self._parse(hf_name)
        if parsed is None:
            return super().checkpoint_slice(hf_name)
        if self.tp.size == 1 or parsed[1] is None:
            return None
        length = self.arch.moe_intermediate_size  # this rank's columns of each expert
        return TensorShard(1 if parsed[2] == DOWN else 0, self.tp.rank * length, length)

    def checkpoint_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return moe_tensor_shapes(self.full_arch, self.expert_names, self.dense_tensor_shapes())

    def expected_weight_names(self) -> set[str]:
        return set(self.checkpoint_tensor_shapes())


class MixtralForCausalLM(MoeCausalLM):
    """Mixtral 8x7B, 8x22B: Llama attention, every layer's MLP a block_sparse_moe of top-2 experts."""
