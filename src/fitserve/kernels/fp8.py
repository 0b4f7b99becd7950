"""FP8 (e4m3) quantization in pure torch: the specification the GPU kernels must match, and the
CPU path.

float8_e4m3fn holds values up to +-448 with 3 mantissa bits. A tensor x is stored as
q = round_to_nearest_even(clamp(x / s, -448, 448)) with a float32 scale s, and read as q * s:

- weights: one s per output channel (a row of W [N, K]), or one per tensor; fixed at load;
- activations: one s per token (a row of x [T, K]), or one per tensor; computed from each
  batch's absolute maximum (dynamic), s = max(amax * FP8_MAX_INV, MIN_SCALE);
- the KV cache: one s for K and one for V per layer (1.0 without calibration, as vLLM).

A scaled GEMM is y[t, n] = (sum_k qx[t, k] * qw[n, k]) * sx[t] * sw[n], accumulated in
float32, rounded once to the output dtype. The scale is a float32 product and x / s an IEEE
division by a tensor (torch's CUDA kernels turn a division by a Python number into a
multiplication by its reciprocal), so the Triton kernels, which multiply by the same float32
FP8_MAX_INV and divide with `div_rn`, produce the same bytes on the GPU as this code on the CPU.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
FP8_MAX_INV = float(torch.tensor(1.0 / FP8_MAX, dtype=torch.float32))  # 1/448 rounded to float32: exact everywhere
# The smallest scale handed out: an all-zero row still gets a finite positive scale, and
# x / s never overflows float32 (vLLM uses the same floor).
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == FP8_DTYPE


def quantize(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """x (any float dtype) / scale (float32, broadcastable) -> float8_e4m3fn, saturating at +-448."""
    if not isinstance(scale, torch.Tensor):  # a tensor divisor: IEEE division on every device
        scale = torch.tensor(scale, dtype=torch.float32, device=x.device)
    # One float32 temporary, divided and clamped in place (this runs on whole weights at load).
    return x.to(torch.float32, copy=True).div_(scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """Absolute maxima -> float32 scales that map them onto +-448."""
    return (amax.float() * FP8_MAX_INV).clamp(min=MIN_SCALE)


def quantize_per_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, C] -> (q [R, C] fp8, scale [R, 1] float32): per token, or per output channel of a weight."""
    scale = scale_from_amax(x.abs().amax(dim=-1, keepdim=True))
    return quantize(x, scale), scale


def quantize_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (q fp8 of x's shape, scale [] float32)."""
    scale = scale_from_amax(x.abs().amax())
    return quantize(x, scale), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


def scaled_mm_reference(qx: torch.Tensor, x_scale: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor,
                        out_dtype: torch.dtype) -> torch.Tensor:
    """qx [T, K] fp8 with x_scale [T, 1] or []; qw [N, K] fp8 with w_scale [1, N] or [] -> [T, N] out_dtype.

    Exact products (fp8 x fp8 fits float32), float32 sums, both scales, one rounding.
    """
    return ((qx.float() @ qw.float().t()) * x_scale * w_scale).to(out_dtype)


def weight_only_mm_reference(x: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x [T, K] in the model dtype; qw [N, K] fp8 with w_scale [1, N] or [] -> [T, N] in x's dtype.

    The weight-only form (W8A16, GPUs without fp8 tensor cores): x times the exact stored weight,
    float32 sums, the weight scale after the sum, one rounding (kernels/triton_w8a16.py)."""
    return ((x.float() @ qw.float().t()) * w_scale).to(x.dtype)


def scaled_mm_torch(qx: torch.Tensor, x_scale: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor,
                    out_dtype: torch.dtype, use_fast_accum: bool = False) -> torch.Tensor:
    """The same on CUDA through torch._scaled_mm (cuBLASLt for per-tensor, CUTLASS for row-wise scales).

    qw [N, K] row-major is the column-major [K, N] operand _scaled_mm wants; K and N must be
    multiples of 16, and row-wise scales need a bfloat16 output.
    """
    return torch._scaled_mm(qx, qw.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=out_dtype,
                            use_fast_accum=use_fast_accum)


def store_to_cache(x: torch.Tensor, cache_dtype: torch.dtype, scale: float) -> torch.Tensor:
    """Rows about to be written into a KV cache of `cache_dtype` (fp8: x / scale, saturated)."""
    if is_fp8(cache_dtype):
        return quantize(x, scale)
    return x.to(cache_dtype)


def load_from_cache(cached: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """Rows read from a KV cache, in the compute dtype (fp8: q * scale)."""
    if is_fp8(cached.dtype):
        return cached.to(dtype) if scale == 1.0 else (cached.float() * scale).to(dtype)
    return cached.to(dtype)
