"""GGUF 4-bit blocks (Q4_0, Q4_1, Q4_K) multiplied on the CPU by torch's packed int4 matmul.

`torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, 32, scales_and_zeros)` multiplies bf16 rows
by 4-bit weights in groups of 32 along K, each weight read as (q - 8) * scale + zero, q in 0..15,
scale and zero bf16 per (group, output row); it reads the packed nibbles and never writes a dequantized
weight. Every group of 32 of these three GGML types is such a group:
- Q4_0: w = d * (q - 8): scale d, zero 0;
- Q4_1: w = d * q + m: scale d, zero m + 8d;
- Q4_K: sub-block j of a 256-block: w = (d * sc_j) * q - dmin * mn_j: scale d * sc_j, zero
  8 * d * sc_j - dmin * mn_j.
The scale and zero are computed in float32 from the file's float16 d and m and rounded to bf16 (the
op takes them in x's dtype): a relative error of at most 2^-9 in a group's scale, the size of the
rounding that dequantizing the weights to bf16 at load makes in each weight.

It pays for few rows on a CPU with bf16 units (AVX512_BF16 or AMX): on the project's 2-core AVX512
EPYC, 2 threads, a 1536 x 576 layer took 0.030 ms against bf16's 0.089 ms at one row and 0.175
against 0.156 at 16, the SmolLM2 lm_head shape 0.76 against 3.97 ms at one row (docs/benchmarks.md).
Its float32 path has no fast kernel (0.77 ms against 0.07 dense at one row): float32 activations take
kernels/gguf.py's reference instead.
"""

from __future__ import annotations

import torch

from fitserve.kernels import gguf

GROUP = 32  # inputs sharing one scale and zero
ROWS_MULTIPLE = 16  # torch's layout packs output rows in sixteens
INT4_TYPES = frozenset(t for t, block in gguf.BLOCK_TYPES.items() if block.name in ("Q4_0", "Q4_1", "Q4_K"))


def takes(ggml_type: int, num_rows: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a part of this type and output rows, served in `dtype` on `device`, is held in torch's int4
    CPU layout."""
    return (ggml_type in INT4_TYPES and num_rows % ROWS_MULTIPLE == 0 and dtype == torch.bfloat16
            and torch.device(device).type == "cpu")


def int4_form(packed: torch.Tensor, ggml_type: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF rows [N, row_bytes] -> (weight [N, K / 2] uint8 in torch's int4 CPU layout,
    scales_and_zeros [K / 32, N, 2] bf16)."""
    block = gguf.BLOCK_TYPES[ggml_type]
    num_rows = packed.shape[0]
    q, scale, offset = gguf.nibbles_and_affine(packed.reshape(-1, block.block_bytes), ggml_type)  # w = q*s + o
    q = q.reshape(num_rows, -1).to(torch.int32)
    scale, offset = scale.reshape(num_rows, -1), offset.reshape(num_rows, -1)
    scales_and_zeros = torch.stack([scale, offset + 8 * scale], dim=-1).transpose(0, 1)
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    return weight, scales_and_zeros.to(torch.bfloat16).contiguous()


def matmul(x: torch.Tensor, weight: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x [T, K] bf16 @ W.T -> [T, N] bf16, W in int4_form's layout."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, GROUP, scales_and_zeros)
