"""GGUF files of Mixture-of-Experts models, as llama.cpp's converter writes them (torch-free): Mixtral
(architecture `llama` with `llama.expert_count`) and Qwen3-MoE (`qwen3moe`).

Each expert layer holds a router `blk.N.ffn_gate_inp.weight` [E, H] and its experts stacked in three
3-D tensors, `ffn_gate_exps` and `ffn_up_exps` [E, I, H] and `ffn_down_exps` [E, H, I] (numpy order).
Their HF names hold EXPERT_PLACEHOLDER; per_expert hands each expert's slice on under its own name
(`...experts.3.w1.weight`), as a safetensors checkpoint names it. Older Mixtral files hold one tensor
per expert (`blk.N.ffn_gate.3.weight`), which map one to one.

What llama.cpp fixes rather than writing to the file: Mixtral renormalises its top-k routing weights;
Qwen3-MoE does too unless the file says otherwise (`qwen3moe.expert_weights_norm`; Qwen3-30B-A3B's
config.json has norm_topk_prob true), and every Qwen3-MoE layer holds experts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace
from typing import TypeVar

from gguf import GGUFReader

from fitserve.arch_config import ArchConfig
from fitserve.weights import gguf_file, gguf_qwen

QWEN3_MOE_GGUF_ARCH = "qwen3moe"
EXPERT_PLACEHOLDER = "{expert}"  # in an HF name: the stacked tensor holds every expert along its first axis
_ROUTER = "ffn_gate_inp"
_STACKED = {"ffn_gate_exps": "gate", "ffn_up_exps": "up", "ffn_down_exps": "down"}
_PER_EXPERT = {"ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down"}  # older files: blk.N.ffn_gate.E.weight
# (the layer's block, its gate, up and down names) as the architecture's safetensors checkpoint has them
_MIXTRAL_NAMES = ("block_sparse_moe", {"gate": "w1", "up": "w3", "down": "w2"})
_QWEN3_MOE_NAMES = ("mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"})
_STACKED_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")
_PER_EXPERT_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(\d+)\.weight$")

Stacked = TypeVar("Stacked")  # a numpy array or a torch tensor, indexed along its first axis


def per_expert(hf_name: str, values: Stacked) -> Iterator[tuple[str, Stacked]]:
    """(name, tensor) as it stands, or for a stacked experts tensor [E, ...] each expert's [...] slice."""
    if EXPERT_PLACEHOLDER not in hf_name:
        yield hf_name, values
        return
    for expert in range(values.shape[0]):  # type: ignore[attr-defined]
        yield hf_name.replace(EXPERT_PLACEHOLDER, str(expert)), values[expert]  # type: ignore[index]


def _expert_tensor_name(gguf_name: str, names: tuple[str, dict[str, str]]) -> str | None:
    """The HF name of a router or expert tensor, or None for any other tensor."""
    block, projections = names
    match = _STACKED_RE.match(gguf_name)
    if match and match.group(2) == _ROUTER:
        return f"model.layers.{match.group(1)}.{block}.gate.weight"
    if match and match.group(2) in _STACKED:
        return f"model.layers.{match.group(1)}.{block}.experts.{EXPERT_PLACEHOLDER}." \
               f"{projections[_STACKED[match.group(2)]]}.weight"
    match = _PER_EXPERT_RE.match(gguf_name)
    if match and match.group(2) in _PER_EXPERT:
        layer, part, expert = match.groups()
        return f"model.layers.{layer}.{block}.experts.{expert}.{projections[_PER_EXPERT[part]]}.weight"
    return None


def mixtral_hf_tensor_name(gguf_name: str) -> str | None:
    """'blk.3.ffn_up_exps.weight' -> 'model.layers.3.block_sparse_moe.experts.{expert}.w3.weight'; Llama's
    names for the rest."""
    return _expert_tensor_name(gguf_name, _MIXTRAL_NAMES) or gguf_file.hf_tensor_name(gguf_name)


def qwen3moe_hf_tensor_name(gguf_name: str) -> str | None:
    """'blk.3.ffn_gate_inp.weight' -> 'model.layers.3.mlp.gate.weight'; Qwen3's names for the rest."""
    return _expert_tensor_name(gguf_name, _QWEN3_MOE_NAMES) or gguf_qwen.qwen_hf_tensor_name(gguf_name)


def with_llama_experts(reader: GGUFReader, arch: ArchConfig) -> ArchConfig:
    """A `llama` file with experts is Mixtral's: every layer's MLP is `llama.expert_count` experts of
    feed_forward_length columns, each token routed to `llama.expert_used_count` of them."""
    num_experts = int(gguf_file.field_value(reader, "llama.expert_count", 0))
    if not num_experts:
        return arch
    key = gguf_file.metadata_key(reader, "llama")
    return replace(arch, architecture="MixtralForCausalLM", num_experts=num_experts,
                   num_experts_per_tok=int(key("expert_used_count")),
                   moe_intermediate_size=arch.intermediate_size, norm_topk_prob=True)


def qwen3moe_arch_from_gguf(reader: GGUFReader) -> ArchConfig:
    """ArchConfig from `qwen3moe.*` metadata: Qwen3's attention, experts of expert_feed_forward_length columns."""
    key = gguf_file.metadata_key(reader, QWEN3_MOE_GGUF_ARCH)
    arch = gguf_qwen.qwen_arch_from_gguf(reader, QWEN3_MOE_GGUF_ARCH)
    return replace(arch, num_experts=int(key("expert_count")), num_experts_per_tok=int(key("expert_used_count")),
                   moe_intermediate_size=int(key("expert_feed_forward_length")),
                   norm_topk_prob=bool(key("expert_weights_norm", True)))

