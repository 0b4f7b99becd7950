"""Integer group-quantized weights served as they are stored: GPTQ, AWQ and compressed-tensors
pack-quantized checkpoints (4 or 8 bits, 16-bit activations).

A layer holds the layout of kernels/int_quant.py (qweight, scales, zeros, and input_order for an
act-order checkpoint) and takes each checkpoint tensor by its name's last part (`qweight`,
`qzeros`, `scales`, `g_idx`; compressed-tensors' `weight_packed`, `weight_scale`,
`weight_zero_point`, `weight_g_idx`, `weight_shape`). A shard (q, k or v of the merged qkv) is
converted into its rows once all its tensors arrived. The product: on CUDA the Triton GEMM
(kernels/triton_int_quant.py, dequantizing in registers), elsewhere dequantize then matmul.

An act-order checkpoint (g_idx: each input column's group, in no order) is stored with its input
columns sorted by group (`input_order`, int_quant.group_order) once loaded, and each product takes x's
columns in that order: the layer is then an in-order grouped layer, which the fastest kernels take
(the words kernels need whole groups one after another), as vLLM's Marlin path sorts g_idx too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fitserve.kernels import int_quant
from fitserve.kernels.dispatch import triton_int_quant
from fitserve.layers.formats.unquantized import UNQUANTIZED
from fitserve.layers.weight_format import LinearLayer, QuantizedRows, WeightFormat, WeightSpec
from fitserve.weights.int_checkpoint import IntQuantScheme

G_IDX = "g_idx"
INPUT_ORDER = "input_order"  # an act-order layer's input columns in group order (int32 [K])
# each method's tensor names -> the part they are: packed values, scales, packed zeros, groups
PIECES = {
    "gptq": {"qweight": "values", "scales": "scales", "qzeros": "zeros", "g_idx": G_IDX},
    "awq": {"qweight": "values", "scales": "scales", "qzeros": "zeros"},
    "compressed-tensors": {"weight_packed": "values", "weight_scale": "scales", "weight_zero_point": "zeros",
                           "weight_g_idx": G_IDX, "weight_shape": "shape"},
}


class IntQuantLinear(LinearLayer):
    def __init__(self, weight_format: IntQuantFormat, in_features: int, out_features: int | tuple[int, ...],
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(weight_format, in_features, out_features, dtype, device)
        self.scheme = weight_format.scheme
        self.zeros.data.fill_(1 << (self.scheme.bits - 1))  # a symmetric checkpoint stores none
        self._pieces: dict[int, dict[str, torch.Tensor]] = {}
        self._pending: set[int] = set(range(len(self.shard_sizes)))
        self._g_idx: torch.Tensor | None = None  # an act-order checkpoint's, until finish_loading sorts by it

    def load(self, shard_index: int, piece: str, tensor: torch.Tensor) -> None:
        part = PIECES[self.scheme.method].get(piece)
        if part is None:
            raise ValueError(f"a {self.scheme.method} checkpoint has no {piece!r} tensor for a linear layer")
        if part not in self._needed_parts():
            return  # the shape, a symmetric scheme's zeros, the trivial g_idx of an in-order checkpoint
        pieces = self._pieces.setdefault(shard_index, {})
        pieces[part] = tensor
        if self._needed_parts() <= set(pieces):
            self._place_shard(shard_index, self._pieces.pop(shard_index))

    def _needed_parts(self) -> set[str]:
        return {"values", "scales"} | ({"zeros"} if not self.scheme.symmetric else set()) | (
            {G_IDX} if self.scheme.act_order else set())

    @torch.no_grad()
    def _place_shard(self, shard_index: int, pieces: dict[str, torch.Tensor]) -> None:
        start, rows = self.shard_rows(shard_index)
        values, zeros = self._values_and_zeros(pieces)
        scales = pieces["scales"].float()
        if self.scheme.method != "compressed-tensors":
            scales = scales.t()  # GPTQ and AWQ store [G, N]
        expected = (rows, self.in_features)
        if tuple(values.shape) != expected or tuple(scales.shape) != (rows, self.scales.shape[1]):
            raise ValueError(f"shard {shard_index}: values {tuple(values.shape)} and scales {tuple(scales.shape)}, "
                             f"expected {expected} and {(rows, self.scales.shape[1])}")
        self.qweight.data[start:start + rows].copy_(int_quant.store_values(values, self.scheme.bits))
        self.scales.data[start:start + rows].copy_(scales)
        if zeros is not None:
            self.zeros.data[start:start + rows].copy_(zeros)
        if self.scheme.act_order:
            self._place_g_idx(pieces[G_IDX])
        self._pending.discard(shard_index)

    def _values_and_zeros(self, pieces: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The shard's unsigned values [rows, K] and, when stored, zeros [rows, G]."""
        bits, method, packed_zeros = self.scheme.bits, self.scheme.method, pieces.get("zeros")
        if method == "gptq":
            zeros = None if packed_zeros is None else int_quant.gptq_zeros(packed_zeros, bits,
                                                                             self.scheme.zeros_minus_one)
            return int_quant.gptq_values(pieces["values"], bits), zeros
        if method == "awq":
            return int_quant.awq_columns(pieces["values"]), int_quant.awq_columns(pieces["zeros"])
        values = int_quant.unpack_int32(pieces["values"], bits, dim=1)[:, :self.in_features]
        zeros = None if packed_zeros is None else int_quant.unpack_int32(packed_zeros, bits, dim=0)
        return values, zeros

    def _place_g_idx(self, g_idx: torch.Tensor) -> None:
        """The merged layer's one g_idx: the first shard's, which every other shard must repeat."""
        g_idx = g_idx.to(device=self.qweight.device, dtype=torch.int32)
        if self._g_idx is None:
            self._g_idx = g_idx
        elif not torch.equal(self._g_idx, g_idx):
            raise ValueError("the parts of a merged projection have different g_idx (act-order column groups); "
                             "fitserve holds one per layer")

    def finish_loading(self) -> None:
        if self._pending:
            raise ValueError(f"shards {sorted(self._pending)} incomplete: a {self.scheme.method} layer needs "
                             f"{', '.join(PIECES[self.scheme.method])}")
        if self.scheme.act_order:
            self._sort_by_group()

    @torch.no_grad()
    def _sort_by_group(self) -> None:
        """Reorder the stored input columns by the checkpoint's g_idx; input_order says which x column each
        now multiplies."""
        assert self._g_idx is not None
        order = int_quant.group_order(self._g_idx, self.scales.shape[1])
        if order is None:
            raise ValueError(f"this {self.scheme.method} checkpoint's g_idx does not give each of its "
                             f"{self.scales.shape[1]} groups {self.in_features // self.scales.shape[1]} input "
                             "columns; fitserve serves act-order checkpoints whose groups are whole")
        values = int_quant.load_values(self.qweight.data, self.scheme.bits)[:, order]
        self.qweight.data.copy_(int_quant.store_values(values, self.scheme.bits))
        getattr(self, INPUT_ORDER).data.copy_(order.to(torch.int32))
        self._g_idx = None

    @torch.no_grad()
    def dequantized(self) -> LinearLayer:
        """An unquantized layer holding these weights dequantized to the serving dtype (kernels/int_quant.py
        dequantize: the specification the kernel must match; check-quant's reference for a packed checkpoint)."""
        layer = UNQUANTIZED.create(self.in_features, self.shard_sizes, self.dtype, self.qweight.device)
        weight = int_quant.dequantize(self.qweight, self.scales, self.zeros, None, self.scheme.bits, self.dtype)
        if self.scheme.act_order:  # back to the checkpoint's column order
            weight = torch.empty_like(weight).index_copy_(1, getattr(self, INPUT_ORDER).long(), weight)
        layer.weight.copy_(weight)
        return layer

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        assert isinstance(x, torch.Tensor), "integer weights take 16-bit activations"
        if self.scheme.act_order:
            x = x.index_select(-1, getattr(self, INPUT_ORDER))
        if x.is_cuda and triton_int_quant is not None and x.dtype != torch.float32:
            return triton_int_quant.int_quant_mm(x, self.qweight, self.scales, self.zeros, None, self.scheme.bits)
        return int_quant.int_quant_mm_reference(x, self.qweight, self.scales, self.zeros, None, self.scheme.bits)


@dataclass(frozen=True, slots=True)
class IntQuantFormat(WeightFormat):
    """One checkpoint's integer scheme (weights/int_checkpoint.py)."""

    scheme: IntQuantScheme
    fused_input_quantization: bool = False

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.scheme.method

    def describe(self) -> str:
        return self.scheme.describe() + ", activations in --dtype"

    def weight_specs(self, in_features: int, shard_sizes: tuple[int, ...], dtype: torch.dtype
                     ) -> tuple[WeightSpec, ...]:
        rows, groups = sum(shard_sizes), self.scheme.groups(in_features)
        specs = (WeightSpec("qweight", (rows, in_features * self.scheme.bits // 8), torch.uint8),
                 WeightSpec("scales", (rows, groups), torch.float32),
                 WeightSpec("zeros", (rows, groups), torch.uint8))
        if self.scheme.act_order:
            specs += (WeightSpec(INPUT_ORDER, (in_features,), torch.int32),)
        return specs

    def create(self, in_features: int, out_features: int | tuple[int, ...], dtype: torch.dtype,
               device: torch.device) -> IntQuantLinear:
        return IntQuantLinear(self, in_features, out_features, dtype, device)
