"""The Triton kernel modules when Triton is installed (CUDA builds of torch), else None.

Layers use a Triton kernel for CUDA tensors when its module is here, and the pure-torch
reference otherwise (the CPU path).
"""

from __future__ import annotations

from types import ModuleType

triton_attention: ModuleType | None
triton_decode: ModuleType | None
triton_fused: ModuleType | None
triton_fp8: ModuleType | None
triton_fp8_small: ModuleType | None
triton_gemv: ModuleType | None
triton_int_quant: ModuleType | None
triton_moe: ModuleType | None
triton_w8a16: ModuleType | None
try:
    from fitserve.kernels import (
        triton_attention,
        triton_decode,
        triton_fp8,
        triton_fp8_small,
        triton_fused,
        triton_gemv,
        triton_int_quant,
        triton_moe,
        triton_w8a16,
    )
except ImportError:  # CPU-only torch: no triton
    triton_attention = None
    triton_decode = None
    triton_fused = None
    triton_fp8 = None
    triton_fp8_small = None
    triton_gemv = None
    triton_int_quant = None
    triton_moe = None
    triton_w8a16 = None
