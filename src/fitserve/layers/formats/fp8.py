"""The fp8 weight formats: linear layers quantized online while the checkpoint loads (`--quantization fp8`).

`fp8`: e4m3 weights with one float32 scale per output channel, activations quantized per
token at run time (dynamic scales). `fp8_per_tensor`: one scale for the whole weight and a
static one for each layer's input, calibrated once at start-up (`observe_activations`,
runner/calibration.py: the largest |x| a layer saw over built-in text, mapped onto +-448);
larger inputs saturate. Until calibrated, a per-tensor layer takes its scale from each batch
(dynamic), which makes a request's activations depend on its batch neighbours.

Quantization happens as each checkpoint tensor arrives (`load_shard`), so the bf16 copy of
the model never exists: with per-channel scales a shard (q, k, v, gate, up) is quantized
alone, since each of its rows has its own scale; with a per-tensor scale the merged
projection's shards wait in a staging buffer of the serving dtype, one projection at a time,
and are quantized together once the last one lands. A checkpoint stored in fp8
(weights/fp8_checkpoint.py) hands in e4m3 shards with their scales instead (`load_fp8_piece`):
they are placed as they are, except that a per-tensor merged projection takes its shards'
largest scale and requantizes the others onto it.

On CUDA the per-token quantization is a Triton kernel and the GEMM whichever measured faster
on the H200 (benchmarks/fp8_gemm_bench.py, docs/quantization.md): with per-channel scales the
Triton GEMM up to 16 batch rows (torch's row-wise _scaled_mm is slow there) and
torch._scaled_mm with row-wise scales above, except where kernels/triton_fp8_small.py's table
takes the product first (a one-row GEMV; split-K up to 32 rows for the narrow layers); with per-tensor scales torch._scaled_mm
(cuBLASLt) at every size. Elsewhere the pure-torch reference of kernels/fp8.py, which is the
specification.

A GPU without fp8 tensor cores (compute capability below 8.9: A100, A10, RTX 30xx) gets the same
weights, scales and checkpoints in the weight-only form (`Fp8Format.for_device`): activations stay
in the model dtype and kernels/triton_w8a16.py widens the e4m3 bytes in registers, so the weights
take fp8's memory while the arithmetic is 16-bit (docs/quantization.md).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn

from fitserve.kernels import fp8
from fitserve.kernels.dispatch import triton_fp8, triton_fp8_small, triton_w8a16
from fitserve.layers.weight_format import (
    INPUT_SCALE,
    WEIGHT,
    WEIGHT_SCALE,
    LinearLayer,
    QuantizedRows,
    WeightFormat,
    WeightSpec,
)

GEMM_ALIGNMENT = 16  # fp8 tensor-core GEMMs need K and N in multiples of 16
# Per-channel scales: batch rows from which torch._scaled_mm (CUTLASS, row-wise scales) beat
# the Triton GEMM on the H200 (benchmarks/fp8_gemm_bench.py, docs/quantization.md).
SCALED_MM_MIN_ROWS = 17
# Row-wise _scaled_mm with fast accumulation (partial sums in the tensor cores' reduced
# precision, about 1e-3 relative): 5-10% faster at prefill sizes, far below fp8's own rounding.
ROW_WISE_FAST_ACCUM = True
FP8_TENSOR_CORES = (8, 9)  # the first compute capability with fp8 tensor cores (Ada, Hopper and later)
MIXED_SHARDS = "fp8_per_tensor needs every shard of a layer in fp8 with one weight_scale each, or none in fp8"


class Fp8Linear(LinearLayer):
    """y = x @ W.T with W stored as e4m3 [out_features, in_features] plus float32 scales
    (Fp8Format.weight_specs). A merged projection is filled from separate checkpoint tensors,
    which arrive in the serving dtype (quantized here) or, from an fp8 checkpoint, in e4m3 with
    their scales.
    """

    def __init__(self, in_features: int, out_features: int | tuple[int, ...], dtype: torch.dtype,
                 device: torch.device, per_tensor: bool = False, weight_only: bool = False) -> None:
        super().__init__(FP8_PER_TENSOR if per_tensor else FP8, in_features, out_features, dtype, device)
        self.per_tensor = per_tensor
        self.weight_only = weight_only  # W8A16: activations are not quantized (Fp8Format.for_device)
        self.weight_scale.data.fill_(1.0)
        self._staging: torch.Tensor | None = None  # per-tensor only: [N, K] serving dtype while shards arrive
        self._pending: set[int] = set(range(len(self.shard_sizes)))
        # An fp8 checkpoint's shards (load_fp8_piece): its weight and weight_scale, until both
        # arrived; per-tensor, the placed shards (q, scale) until the last one lands; input scales.
        self._fp8_pieces: dict[int, dict[str, torch.Tensor]] = {}
        self._fp8_shards: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._checkpoint_input_scales: dict[int, torch.Tensor] = {}
        # Per-tensor only: the static input scale ([] float32) once calibrated, and while
        # observe_activations runs, the largest |x| seen so far.
        self.input_scale: torch.Tensor | None = None
        self._observed_amax: torch.Tensor | None = None

    @property
    def is_loaded(self) -> bool:
        return not self._pending

    def load(self, shard_index: int, piece: str, tensor: torch.Tensor) -> None:
        if piece == WEIGHT:
            self._load_weight(shard_index, tensor)
        else:
            self.load_fp8_piece(shard_index, piece, tensor)

    @torch.no_grad()
    def _load_weight(self, shard_index: int, loaded: torch.Tensor) -> None:
        """Quantize one checkpoint tensor [shard_rows, in_features] into its row range (an fp8
        tensor is already quantized: it waits for its weight_scale, load_fp8_piece)."""
        start, rows = self.shard_rows(shard_index)
        self.check_shard_shape(shard_index, loaded)
        if fp8.is_fp8(loaded.dtype):
            self.load_fp8_piece(shard_index, WEIGHT, loaded)
            return
        if loaded.dtype.itemsize == 1:
            raise ValueError(f"shard {shard_index} is {loaded.dtype}: fitserve reads fp8 checkpoints in e4m3 "
                             "(float8_e4m3fn) only")
        # Round to the serving dtype first: the fp8 model is the bf16 model, quantized.
        weight = loaded.to(device=self.weight.device, dtype=self.dtype)
        if not self.per_tensor:
            q, scale = fp8.quantize_per_row(weight)
            self.weight.data[start:start + rows].copy_(q)
            self.weight_scale.data[0, start:start + rows].copy_(scale[:, 0])
        else:
            if self._fp8_shards:
                raise ValueError(MIXED_SHARDS)
            if self._staging is None:
                self._staging = torch.empty(self.out_features, self.in_features, dtype=self.dtype,
                                            device=self.weight.device)
            self._staging[start:start + rows].copy_(weight)
        self._pending.discard(shard_index)
        if self.per_tensor and not self._pending:
            q, scale = fp8.quantize_per_tensor(self._staging)
            self.weight.data.copy_(q)
            self.weight_scale.data.copy_(scale)
            self._staging = None

    @torch.no_grad()
    def load_fp8_piece(self, shard_index: int, kind: str, tensor: torch.Tensor) -> None:
        """A piece of an fp8 checkpoint's shard (weights/fp8_checkpoint.py): its e4m3 "weight",
        its "weight_scale" (one, or one per row) or its static "input_scale" (one)."""
        if kind == INPUT_SCALE:
            if tensor.numel() != 1:
                raise ValueError(f"shard {shard_index}: input_scale must hold one value, got shape {tuple(tensor.shape)}")
            self._checkpoint_input_scales[shard_index] = _checked_scale(tensor, INPUT_SCALE).reshape(())
            return
        pieces = self._fp8_pieces.setdefault(shard_index, {})
        pieces[kind] = tensor
        if WEIGHT in pieces and WEIGHT_SCALE in pieces:
            del self._fp8_pieces[shard_index]
            self._place_fp8_shard(shard_index, pieces[WEIGHT], pieces[WEIGHT_SCALE])

    def _place_fp8_shard(self, shard_index: int, q: torch.Tensor, scale: torch.Tensor) -> None:
        start, rows = sum(self.shard_sizes[:shard_index]), self.shard_sizes[shard_index]
        scale = _checked_scale(scale, "weight_scale", allow_zero=True).reshape(-1)  # [1] per tensor or [rows] per channel
        if scale.numel() not in (1, rows):
            raise ValueError(f"shard {shard_index}: weight_scale must hold 1 or {rows} values, got {scale.numel()}")
        q = q.to(self.weight.device)
        self._pending.discard(shard_index)
        if not self.per_tensor:  # a per-tensor scale repeats down the rows: exact
            self.weight.data[start:start + rows].copy_(q)
            self.weight_scale.data[0, start:start + rows].copy_(scale.to(self.weight.device).expand(rows))
            return
        if scale.numel() != 1 or self._staging is not None:
            raise ValueError(MIXED_SHARDS)
        self._fp8_shards[shard_index] = (q, scale.reshape(()).to(self.weight.device))
        if not self._pending:
            self._merge_fp8_shards()

    def _merge_fp8_shards(self) -> None:
        """One scale for the merged weight: the largest of its shards'. A shard with a smaller
        scale is requantized onto it (values shrink, none saturates), as vLLM does."""
        largest = torch.stack([scale for _, scale in self._fp8_shards.values()]).amax()
        for index, (q, scale) in sorted(self._fp8_shards.items()):
            start, rows = sum(self.shard_sizes[:index]), self.shard_sizes[index]
            self.weight.data[start:start + rows].copy_(
                q if bool(scale == largest) else fp8.quantize(q.float() * scale, largest))
        self.weight_scale.data.copy_(largest)
        self._fp8_shards.clear()

    def finish_loading(self) -> None:
        """After the checkpoint: every shard arrived whole, and (per-tensor) the checkpoint's input
        scales, one per shard, become the layer's static scale, the largest of them."""
        if self._pending or self._fp8_pieces:
            missing = sorted(self._pending | set(self._fp8_pieces))
            raise ValueError(f"shards {missing} incomplete (an fp8 weight without its weight_scale, or none at all)")
        scales = self._checkpoint_input_scales
        if self.per_tensor and scales:
            if len(scales) != len(self.shard_sizes):
                raise ValueError(f"input_scale for {len(scales)} of {len(self.shard_sizes)} shards")
            self.input_scale = torch.stack(list(scales.values())).amax().to(self.weight.device)
        scales.clear()

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        """x [T, in_features] (or its per-token quantization) -> [T, out_features] in the model dtype."""
        if self.weight_only:
            assert isinstance(x, torch.Tensor), "a weight-only layer takes no QuantizedRows"
            if x.is_cuda and triton_w8a16 is not None and x.dtype != torch.float32:
                return triton_w8a16.weight_only_mm(x, self.weight, self.weight_scale)
            return fp8.weight_only_mm_reference(x, self.weight, self.weight_scale)
        fast = x.is_cuda and triton_fp8 is not None and self._fits_gpu_gemm()
        if isinstance(x, QuantizedRows):
            assert not self.per_tensor, "fused kernels quantize per token"
            qx, x_scale, out_dtype = x.q, x.scale, x.dtype
        elif self.per_tensor:
            (qx, x_scale), out_dtype = self._quantize_per_tensor(x), x.dtype
        elif fast:
            (qx, x_scale), out_dtype = triton_fp8.quantize_per_token(x), x.dtype
        else:
            (qx, x_scale), out_dtype = fp8.quantize_per_row(x), x.dtype
        if not fast:
            return fp8.scaled_mm_reference(qx, x_scale, self.weight, self.weight_scale, out_dtype)
        return self._gemm_cuda(qx, x_scale, out_dtype)

    def _quantize_per_tensor(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._observed_amax is not None:  # calibrating: note the range, quantize as dynamic
            self._observed_amax = torch.maximum(self._observed_amax, x.abs().amax().float())
        elif self.input_scale is not None:
            if x.is_cuda and triton_fp8 is not None and x.is_contiguous():
                return triton_fp8.quantize_static(x, self.input_scale), self.input_scale
            return fp8.quantize(x, self.input_scale), self.input_scale
        return fp8.quantize_per_tensor(x)

    def _fits_gpu_gemm(self) -> bool:
        return self.in_features % GEMM_ALIGNMENT == 0 and self.out_features % GEMM_ALIGNMENT == 0

    def _gemm_cuda(self, qx: torch.Tensor, x_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        assert triton_fp8 is not None and triton_fp8_small is not None
        row_wise = not self.per_tensor
        if row_wise:  # decode batches first ask triton_fp8_small.SMALL_M_TABLE, which may decline
            choice = triton_fp8_small.plan(qx.shape[0], self.out_features, self.in_features,
                                           triton_fp8_small.num_sms(qx.device))
            if choice is not None:
                return triton_fp8_small.run(choice, qx, x_scale, self.weight, self.weight_scale, out_dtype)
        if (self.per_tensor or qx.shape[0] >= SCALED_MM_MIN_ROWS) and scaled_mm_works(qx.device, row_wise, out_dtype):
            return fp8.scaled_mm_torch(qx, x_scale, self.weight, self.weight_scale, out_dtype,
                                       use_fast_accum=row_wise and ROW_WISE_FAST_ACCUM)
        return triton_fp8.scaled_mm(qx, x_scale, self.weight, self.weight_scale, out_dtype)


def _checked_scale(tensor: torch.Tensor, name: str, allow_zero: bool = False) -> torch.Tensor:
    """A checkpoint's scale as float32, finite and positive (`allow_zero`: a weight row of zeros
    may have scale 0)."""
    scale = tensor.detach().to(torch.float32)
    floor_ok = (scale >= 0) if allow_zero else (scale > 0)
    if not bool(torch.isfinite(scale).all()) or not bool(floor_ok.all()):
        raise ValueError(f"{name} must be finite and positive")
    return scale


@contextlib.contextmanager
def observe_activations(model: nn.Module) -> Iterator[int]:
    """Calibrate the static input scales of `model`'s per-tensor fp8 layers: inside the block each
    notes the largest |x| of its inputs (quantizing them dynamically meanwhile); on leaving, its
    input_scale becomes that maximum over 448. Yields how many layers it calibrates."""
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear) and m.per_tensor and not m.weight_only]
    for layer in layers:
        layer.input_scale = None
        layer._observed_amax = torch.zeros((), dtype=torch.float32, device=layer.weight.device)
    try:
        yield len(layers)
        for layer in layers:
            assert layer._observed_amax is not None
            layer.input_scale = fp8.scale_from_amax(layer._observed_amax)
    finally:
        for layer in layers:
            layer._observed_amax = None


@functools.cache
def scaled_mm_works(device: torch.device, row_wise: bool, out_dtype: torch.dtype) -> bool:
    """Whether this torch's _scaled_mm runs the form (row-wise or per-tensor scales, output
    dtype) on this device and agrees with the reference. Asked once per form, before any
    CUDA-graph capture (the profiling forward comes first)."""
    gen = torch.Generator(device=device).manual_seed(0)
    num_rows, inner, num_cols = 17, 64, 32  # an odd batch, as decode steps have
    x = torch.randn(num_rows, inner, device=device, generator=gen).to(out_dtype)
    w = torch.randn(num_cols, inner, device=device, generator=gen).to(out_dtype)
    qx, sx = fp8.quantize_per_row(x) if row_wise else fp8.quantize_per_tensor(x)
    qw, sw = fp8.quantize_per_row(w) if row_wise else fp8.quantize_per_tensor(w)
    sw = sw.reshape(1, -1) if row_wise else sw
    try:
        got = fp8.scaled_mm_torch(qx, sx, qw, sw, out_dtype).float()
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    expected = fp8.scaled_mm_reference(qx, sx, qw, sw, torch.float32)
    return bool(((got - expected).norm() / expected.norm()).item() < 1e-2)


@dataclass(frozen=True, slots=True)
class Fp8Format(WeightFormat):
    """`fp8`: per-channel weight scales [1, N] (the row-wise layout _scaled_mm reads), activations
    quantized per token, by the norm or SiLU before the layer where a fused kernel can;
    `fp8_per_tensor`: one weight scale [], static input scales."""

    name: str
    per_tensor: bool
    weight_only: bool = False  # W8A16, on GPUs without fp8 tensor cores (for_device)

    @property
    def fused_input_quantization(self) -> bool:  # type: ignore[override]
        return not self.per_tensor and not self.weight_only

    def describe(self) -> str:
        if self.weight_only:
            return (f"{self.name} weights, weight-only (W8A16): this GPU has no fp8 tensor cores (compute "
                    f"capability below {FP8_TENSOR_CORES[0]}.{FP8_TENSOR_CORES[1]}), so activations stay 16-bit")
        return f"{self.name} weights and activations (W8A8)"

    def for_device(self, device: torch.device) -> Fp8Format:
        """The weight-only form on a CUDA device without fp8 tensor cores (compute capability < 8.9)."""
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < FP8_TENSOR_CORES:
            return replace(self, weight_only=True)
        return self

    def weight_specs(self, in_features: int, shard_sizes: tuple[int, ...], dtype: torch.dtype
                     ) -> tuple[WeightSpec, ...]:
        out_features = sum(shard_sizes)
        scale_shape = () if self.per_tensor else (1, out_features)
        return (WeightSpec(WEIGHT, (out_features, in_features), fp8.FP8_DTYPE),
                WeightSpec(WEIGHT_SCALE, scale_shape, torch.float32))

    def create(self, in_features: int, out_features: int | tuple[int, ...], dtype: torch.dtype,
               device: torch.device) -> Fp8Linear:
        return Fp8Linear(in_features, out_features, dtype, device, per_tensor=self.per_tensor,
                         weight_only=self.weight_only)


FP8 = Fp8Format("fp8", per_tensor=False)
FP8_PER_TENSOR = Fp8Format("fp8_per_tensor", per_tensor=True)
