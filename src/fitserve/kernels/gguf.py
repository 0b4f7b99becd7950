"""GGUF quantized blocks in torch: the block layouts of the GGML types fitserve keeps packed, their
dequantization, and the matmul through them (the CPU path and the specification of
kernels/triton_gguf.py).

A GGUF tensor [N, K] of a block type is N rows of K / block_elements blocks, each a fixed number
of bytes (`GgmlBlock`); rows are independent, so a linear layer keeps it as a uint8 tensor
[N, K / block_elements * block_bytes] and its rows can be permuted or sliced like a weight's.
Each function below is the `gguf` package's numpy `dequantize` for its type (gguf/quants.py),
written op for op in torch so that float32 results are bit-identical (tests compare): vectorised
over all blocks at once, on any device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fitserve.kernels import int_quant


@dataclass(frozen=True, slots=True)
class GgmlBlock:
    """One GGML block type: `block_elements` weights stored in `block_bytes` bytes."""

    name: str
    ggml_type: int  # gguf.GGMLQuantizationType value, as a GGUF header stores it
    block_elements: int
    block_bytes: int

    def row_bytes(self, in_features: int) -> int:
        """Bytes of one packed row of `in_features` weights (a multiple of block_elements)."""
        return in_features // self.block_elements * self.block_bytes


# The types kept packed (`--quantization gguf`): the embedded SmolLM2's Q4_1/Q8_0, and the mix in
# llama.cpp's Q4_K_M / Q5_K_M files (Q4_K, Q5_K, Q6_K, with Q5_0/Q8_0 in some). Values: gguf.constants.
BLOCK_TYPES: dict[int, GgmlBlock] = {b.ggml_type: b for b in (
    GgmlBlock("Q4_0", 2, 32, 18), GgmlBlock("Q4_1", 3, 32, 20), GgmlBlock("Q5_0", 6, 32, 22),
    GgmlBlock("Q8_0", 8, 32, 34), GgmlBlock("Q4_K", 12, 256, 144), GgmlBlock("Q5_K", 13, 256, 176),
    GgmlBlock("Q6_K", 14, 256, 210),
)}
Q4_K = 12  # BLOCK_TYPES' key of Q4_K
K_SCALE_BYTES = 12  # Q4_K / Q5_K: eight 6-bit scales and eight 6-bit mins in 12 bytes
# Rows dequantized at a time by `matmul_reference`: a bounded float32 scratch (16 MiB at K 4096)
CHUNK_ROWS = 1024


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """[B, 2] uint8 (little-endian float16) -> [B, 1] float32."""
    return raw.contiguous().view(torch.float16).to(torch.float32)


def _shifts(step: int, count: int, device: torch.device) -> torch.Tensor:
    """0, step, ..., (count - 1) * step as uint8, made on the device (no host copy: a CUDA graph may be
    capturing the decode step that dequantizes)."""
    return torch.arange(0, step * count, step, dtype=torch.uint8, device=device)


def _nibbles_32(qs: torch.Tensor) -> torch.Tensor:
    """Q4_0 / Q4_1: [B, 16] uint8 -> [B, 32] uint8, the low nibbles (values 0-15) then the high (16-31)."""
    return ((qs.reshape(-1, 1, 16) >> _shifts(4, 2, qs.device).reshape(1, 2, 1)) & 0x0F).reshape(-1, 32)


def _dequant_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d, qs = _f16(blocks[:, :2]), blocks[:, 2:]
    q = _nibbles_32(qs).to(torch.int8) - 8
    return d * q.to(torch.float32)


def _dequant_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m, qs = _f16(blocks[:, :2]), _f16(blocks[:, 2:4]), blocks[:, 4:]
    return d * _nibbles_32(qs).to(torch.float32) + m


def _dequant_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d, qh_bytes, qs = _f16(blocks[:, :2]), blocks[:, 2:6].to(torch.int64), blocks[:, 6:]
    qh = qh_bytes[:, 0] | (qh_bytes[:, 1] << 8) | (qh_bytes[:, 2] << 16) | (qh_bytes[:, 3] << 24)  # [B] uint32 value
    high = (qh[:, None] >> torch.arange(32, device=blocks.device)) & 1  # [B, 32]
    low = (qs.reshape(-1, 1, 16) >> _shifts(4, 2, blocks.device).reshape(1, 2, 1)) & 0x0F
    q = (low.reshape(-1, 32).to(torch.int64) | (high << 4)).to(torch.int8) - 16
    return d * q.to(torch.float32)


def _dequant_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d, qs = _f16(blocks[:, :2]), blocks[:, 2:].contiguous().view(torch.int8)
    return d * qs.to(torch.float32)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: [B, 12] uint8 -> the eight 6-bit scales and mins, each [B, 8] uint8."""
    scales = scales.reshape(-1, 3, 4)
    d, m, m_d = scales[:, 0], scales[:, 1], scales[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: (d, dmin float32 [B], the sub-blocks' 6-bit scales and mins uint8 [B, 8])."""
    sc, mn = _k_scale_min(blocks[:, 4:4 + K_SCALE_BYTES])
    return _f16(blocks[:, :2]), _f16(blocks[:, 2:4]), sc, mn


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Q4_K / Q5_K: 128 bytes of nibbles a block [B, 128] -> [B, 8, 32] (sub-block 2j in the low nibbles of
    bytes 32j..32j + 31, 2j + 1 in their high ones)."""
    return ((qs.reshape(-1, 4, 1, 32) >> _shifts(4, 2, qs.device).reshape(1, 1, 2, 1)) & 0x0F).reshape(-1, 8, 32)


def _q4_k_parts(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K: (q [B, 8, 32] uint8, d * sc [B, 8], dmin * mn [B, 8] float32): w = (d * sc) q - dmin * mn."""
    d, dmin, sc, mn = _k_scales(blocks)
    return _k_nibbles(blocks[:, 4 + K_SCALE_BYTES:]), d * sc.to(torch.float32), dmin * mn.to(torch.float32)


def _dequant_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    q, d, dm = _q4_k_parts(blocks)
    return (d.reshape(-1, 8, 1) * q.to(torch.float32) - dm.reshape(-1, 8, 1)).reshape(-1, 256)


def _dequant_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    d, dmin, sc, mn = _k_scales(blocks)
    qh, qs = blocks[:, 16:48], blocks[:, 48:]
    d = (d * sc.to(torch.float32)).reshape(-1, 8, 1)
    dm = (dmin * mn.to(torch.float32)).reshape(-1, 8, 1)
    high = (qh.reshape(-1, 1, 32) >> _shifts(1, 8, blocks.device).reshape(1, 8, 1)) & 0x01
    q = _k_nibbles(qs) | (high << 4)
    return (d * q.to(torch.float32) - dm).reshape(-1, 256)


def _dequant_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    ql, qh = blocks[:, :128], blocks[:, 128:192]
    scales = blocks[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = (_f16(blocks[:, 208:210]) * scales).reshape(-1, 16, 1)
    low = (ql.reshape(-1, 2, 1, 64) >> _shifts(4, 2, blocks.device).reshape(1, 1, 2, 1)) & 0x0F
    high = (qh.reshape(-1, 2, 1, 32) >> _shifts(2, 4, blocks.device).reshape(1, 1, 4, 1)) & 0x03
    q = (low.reshape(-1, 8, 32) | (high.reshape(-1, 8, 32) << 4)).to(torch.int8) - 32
    return (d * q.reshape(-1, 16, 16).to(torch.float32)).reshape(-1, 256)


_DEQUANTIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q4_0": _dequant_q4_0, "Q4_1": _dequant_q4_1, "Q5_0": _dequant_q5_0, "Q8_0": _dequant_q8_0,
    "Q4_K": _dequant_q4_k, "Q5_K": _dequant_q5_k, "Q6_K": _dequant_q6_k,
}


def nibbles_and_affine(blocks: torch.Tensor, ggml_type: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_1 / Q4_K blocks [B, block_bytes] -> (q [B, E] uint8 in 0..15, scale and offset
    [B, E / 32] float32) with each weight q * scale + offset of its group of 32 (kernels/cpu_int4.py)."""
    name = BLOCK_TYPES[ggml_type].name
    if name == "Q4_K":
        q, scale, min_ = _q4_k_parts(blocks)
        return q.reshape(blocks.shape[0], -1), scale, -min_
    d = _f16(blocks[:, :2])
    if name == "Q4_0":
        return _nibbles_32(blocks[:, 2:]), d, -8 * d
    if name == "Q4_1":
        return _nibbles_32(blocks[:, 4:]), d, _f16(blocks[:, 2:4])
    raise ValueError(f"{name} is not a 4-bit type with groups of 32")


def q4_k_words_form(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K rows [N, row_bytes] -> kernels/int_quant.py's K-quant form: (qweight uint8 [N, K / 2], each
    sub-block's scale sc and min mn uint8 [N, K / 32], supers float16 [N, K / 256, 2] (d, dmin)); the same
    weights bit for bit, 148 bytes a block of 256 against the file's 144."""
    num_rows = packed.shape[0]
    blocks = packed.reshape(-1, BLOCK_TYPES[Q4_K].block_bytes)
    _, _, sc, mn = _k_scales(blocks)
    q = _k_nibbles(blocks[:, 4 + K_SCALE_BYTES:]).reshape(num_rows, -1)
    supers = blocks[:, :4].contiguous().view(torch.float16).reshape(num_rows, -1, 2)  # d and dmin as stored
    return (int_quant.pack_nibbles(q).contiguous(), sc.reshape(num_rows, -1).contiguous(),
            mn.reshape(num_rows, -1).contiguous(), supers)


def block_type(ggml_type: int) -> GgmlBlock:
    """The layout of a packed type; KeyError for one fitserve does not keep packed."""
    return BLOCK_TYPES[ggml_type]


def dequantize(packed: torch.Tensor, ggml_type: int, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """packed [N, row_bytes] uint8 -> [N, K] in `out_dtype` (K = row_bytes / block_bytes * block_elements)."""
    block = BLOCK_TYPES[ggml_type]
    assert packed.dtype == torch.uint8 and packed.dim() == 2, "packed GGUF rows are a 2-D uint8 tensor"
    num_rows, row_bytes = packed.shape
    assert row_bytes % block.block_bytes == 0, f"{block.name}: a row of {row_bytes} bytes is not whole blocks"
    blocks = packed.reshape(-1, block.block_bytes)
    values = _DEQUANTIZERS[block.name](blocks)
    return values.reshape(num_rows, -1).to(out_dtype)


def matmul_reference(x: torch.Tensor, packed: torch.Tensor, ggml_type: int,
                     chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """x [T, K] @ dequantize(packed).T -> [T, N] in x's dtype. The weight is dequantized to x's dtype
    `chunk_rows` rows at a time (in float32 first, so a float32 model multiplies exactly the weights
    that dequantizing at load gives)."""
    num_rows = packed.shape[0]
    if num_rows <= chunk_rows:
        return torch.nn.functional.linear(x, dequantize(packed, ggml_type, x.dtype))
    out = torch.empty(*x.shape[:-1], num_rows, dtype=x.dtype, device=x.device)
    for start in range(0, num_rows, chunk_rows):
        rows = packed[start:start + chunk_rows]
        out[..., start:start + rows.shape[0]] = torch.nn.functional.linear(x, dequantize(rows, ggml_type, x.dtype))
    return out
