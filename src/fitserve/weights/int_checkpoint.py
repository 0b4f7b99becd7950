"""Checkpoints of integer group-quantized weights: what config.json's `quantization_config` says
for GPTQ, AWQ and compressed-tensors pack-quantized (W4A16, W8A16) checkpoints (torch-free).

Each becomes an `IntQuantScheme`: bits, group size, whether zeros are stored (asymmetric), whether
columns are quantized out of order (`g_idx`), and how the checkpoint packs its tensors
(kernels/int_quant.py says each packing). Anything else of these methods (3-bit, Marlin-only
layouts, activation quantization) is a ConfigError before any weight is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fitserve.arch_config import ArchConfig
from fitserve.config import ConfigError
from fitserve.plan.shapes import ParamCounts, block_projections, counts_from_arch, with_packed_linears

SCALE_BYTES, ZERO_BYTES, G_IDX_BYTES = 4, 1, 4  # float32 scales, uint8 zeros, int32 input_order of an act-order layer (layers/formats/int_quant.py)

METHODS = ("gptq", "awq", "compressed-tensors")
BITS = (4, 8)


@dataclass(frozen=True, slots=True)
class IntQuantScheme:
    method: str  # "gptq", "awq" or "compressed-tensors"
    bits: int  # 4 or 8
    group_size: int  # input columns per scale; -1: one scale per output channel
    symmetric: bool  # no stored zeros: the zero is 2^(bits - 1)
    act_order: bool  # g_idx tensors give each input column's group (GPTQ desc_act)
    zeros_minus_one: bool = False  # AutoGPTQ's format stores each zero minus one

    def groups(self, in_features: int) -> int:
        if self.group_size == -1:
            return 1
        if in_features % self.group_size:
            raise ConfigError(f"{self.method}: {in_features} input columns are not whole groups of {self.group_size}.")
        return in_features // self.group_size

    def describe(self) -> str:
        groups = "per channel" if self.group_size == -1 else f"group {self.group_size}"
        zeros = "symmetric" if self.symmetric else "with zeros"
        order = ", act-order" if self.act_order else ""
        return f"{self.method} checkpoint: {self.bits}-bit integer weights, {groups}, {zeros}{order}"


def parse_int_quantization(qc: dict[str, Any]) -> IntQuantScheme | None:
    """A quantization_config -> its integer scheme; None when it is not one of these methods'
    integer formats (an fp8 compressed-tensors checkpoint, say)."""
    method = qc.get("quant_method")
    if method == "gptq":
        return _gptq(qc)
    if method == "awq":
        return _awq(qc)
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    return None


def _bits(method: str, bits: Any) -> int:
    if bits not in BITS:
        raise ConfigError(f"{method} checkpoint with {bits}-bit weights: fitserve reads 4 and 8 bits.")
    return int(bits)


def _gptq(qc: dict[str, Any]) -> IntQuantScheme:
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ConfigError(f"GPTQ checkpoint_format {fmt!r}: fitserve reads 'gptq' and 'gptq_v2'.")
    return IntQuantScheme("gptq", _bits("gptq", qc.get("bits")), int(qc.get("group_size", 128)),
                          symmetric=bool(qc.get("sym", True)), act_order=bool(qc.get("desc_act", False)),
                          zeros_minus_one=fmt == "gptq")


def _awq(qc: dict[str, Any]) -> IntQuantScheme:
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm" or not qc.get("zero_point", True):
        raise ConfigError(f"AWQ checkpoint of version {version!r}, zero_point {qc.get('zero_point')}: fitserve "
                          "reads the GEMM version with zero points (AutoAWQ's default).")
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        raise ConfigError(f"AWQ checkpoint with {bits}-bit weights: fitserve reads 4 bits.")
    return IntQuantScheme("awq", 4, int(qc.get("group_size", qc.get("q_group_size", 128))), symmetric=False,
                          act_order=False)


def _compressed_tensors(qc: dict[str, Any]) -> IntQuantScheme | None:
    groups = list((qc.get("config_groups") or {}).values())
    weights = (groups[0].get("weights") or {}) if len(groups) == 1 else {}
    if weights.get("type") != "int":
        return None  # fp8 (weights/fp8_checkpoint.py) or something that refuses there
    if qc.get("format", groups[0].get("format", "pack-quantized")) != "pack-quantized":
        raise ConfigError(f"compressed-tensors integer checkpoint in format {qc.get('format')!r}: fitserve reads "
                          "'pack-quantized'.")
    if qc.get("quantization_status", "compressed") != "compressed":
        raise ConfigError("compressed-tensors checkpoint that is not saved compressed: save it with "
                          "save_compressed=True.")
    if groups[0].get("input_activations"):
        raise ConfigError("compressed-tensors checkpoint that also quantizes activations (W4A8, W8A8 int): "
                          "fitserve reads integer weights with 16-bit activations (W4A16, W8A16).")
    strategy = weights.get("strategy")
    if strategy not in ("group", "channel"):
        raise ConfigError(f"compressed-tensors integer weights with {strategy!r} scales: fitserve reads "
                          "'group' and 'channel'.")
    act_order = weights.get("actorder") == "group"  # "weight" ordering keeps groups in column order: no g_idx
    return IntQuantScheme("compressed-tensors", _bits("compressed-tensors", weights.get("num_bits")),
                          int(weights.get("group_size") or -1) if strategy == "group" else -1,
                          symmetric=bool(weights.get("symmetric", True)), act_order=act_order)


def packed_linear_bytes(arch: ArchConfig, scheme: IntQuantScheme) -> tuple[int, int]:
    """(elements, bytes) of every block projection as fitserve holds an integer checkpoint's: the values,
    a scale and a zero per row and group, and an act-order layer's g_idx (formats/int_quant.py weight_specs)."""
    elements = num_bytes = 0
    for rows, in_features in block_projections(arch):
        elements += rows * in_features
        num_bytes += rows * in_features * scheme.bits // 8 + rows * scheme.groups(in_features) * (
            SCALE_BYTES + ZERO_BYTES) + (in_features * G_IDX_BYTES if scheme.act_order else 0)
    return elements * arch.num_hidden_layers, num_bytes * arch.num_hidden_layers


def int_param_counts(arch: ArchConfig, scheme: IntQuantScheme) -> ParamCounts:
    """An integer checkpoint's counts: the shapes from config.json (its safetensors hold packed tensors),
    its projections at their held bytes."""
    elements, num_bytes = packed_linear_bytes(arch, scheme)
    return with_packed_linears(counts_from_arch(arch), elements, num_bytes, scheme.method,
                               f"its {scheme.bits}-bit {scheme.method} layout", always=True)
