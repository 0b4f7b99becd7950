"""Group-quantized integer weights (GPTQ, AWQ, compressed-tensors pack-quantized): the one layout
fitserve holds them in, the conversions from each checkpoint's packing, and the dequantization
that is the specification of the Triton kernel (kernels/triton_int_quant.py).

The layout, for a weight W [N, K] of `bits` (4 or 8) in groups of `group_size` input columns:
- `qweight` uint8 [N, K * bits / 8]: 8 bits one byte a value; 4 bits two values a byte, column
  2j in the low nibble of byte j and 2j + 1 in the high one;
- `scales` float32 [N, G] and `zeros` uint8 [N, G], G = K / group_size (1 per output channel);
- `g_idx` int32 [K] or None: the group of each input column when the checkpoint quantized its
  columns out of order (GPTQ's act-order, `desc_act`); else column k is in group k // group_size.
W[n, k] = (q[n, k] - zeros[n, g(k)]) * scales[n, g(k)], q and zeros unsigned in [0, 2^bits).

The checkpoints pack values into int32 words, lowest bits first (`unpack_int32`):
- GPTQ: qweight [K * bits / 32, N] packed along K, qzeros [G, N * bits / 32] along N, scales
  [G, N], g_idx [K]. AutoGPTQ's format (`checkpoint_format` "gptq", the default) stores each zero
  minus one; "gptq_v2" (GPTQModel) stores it as it is.
- AWQ (GEMM version, 4 bits): qweight [K, N / 8] and qzeros [G, N / 8] packed along N, in the
  order 0, 2, 4, 6, 1, 3, 5, 7 within each word; scales [G, N]; always with zeros.
- compressed-tensors pack-quantized: weight_packed [N, K * bits / 32] along K, weight_scale [N, G],
  weight_zero_point [N * bits / 32, G] packed along N (asymmetric only), weight_g_idx [K]; values
  are signed and packed plus 2^(bits - 1), so the unsigned values above come out directly and a
  symmetric scheme's zero is 2^(bits - 1).

GGUF's Q4_K takes the same 4-bit qweight in a second form, its scales in two levels as the file
stores them (`supers`, the K-quant form; kernels/gguf.py q4_k_words_form): groups of 32, `scales`
and `zeros` uint8 [N, G] hold each group's 6-bit scale sc and min mn, and `supers` float16
[N, G / SUPER_GROUPS, 2] each super-block's d and dmin: W[n, k] = q * (d * sc) - dmin * mn, in
float32 with one rounding (d * sc and dmin * mn are exact), as kernels/gguf.py dequantizes the file.
"""

from __future__ import annotations

import torch

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column AWQ_PACK_ORDER[i]
SUPER_GROUPS = 8  # the K-quant form: groups of 32 in a super-block (Q4_K's block of 256)


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> their 32 / bits unsigned values each, lowest bits first, along `dim` (uint8)."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)  # [per_word]
    words = packed.to(torch.int32).movedim(dim, -1).unsqueeze(-1)  # [..., W, 1]
    values = (words >> shifts) & ((1 << bits) - 1)  # arithmetic shift; the mask drops the sign bits
    values = values.flatten(-2)  # [..., W * per_word]
    assert values.shape[-1] == packed.shape[dim] * per_word
    return values.to(torch.uint8).movedim(-1, dim)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 values [N, K] (< 16, K even) -> the layout's 4-bit bytes [N, K / 2]."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The layout's 4-bit bytes [N, K / 2] -> uint8 values [N, K]."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def store_values(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned values [N, K] -> the layout's qweight."""
    return pack_nibbles(q) if bits == 4 else q.to(torch.uint8)


def load_values(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_nibbles(qweight) if bits == 4 else qweight


def gptq_values(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """A GPTQ qweight [K * bits / 32, N] -> unsigned values [N, K]."""
    return unpack_int32(qweight, bits, dim=0).t().contiguous()


def gptq_zeros(qzeros: torch.Tensor, bits: int, stored_minus_one: bool) -> torch.Tensor:
    """A GPTQ qzeros [G, N * bits / 32] -> unsigned zeros [N, G] (AutoGPTQ's format adds the one back)."""
    zeros = unpack_int32(qzeros, bits, dim=1).t().to(torch.int32) + int(stored_minus_one)
    return (zeros & ((1 << bits) - 1)).to(torch.uint8).contiguous()


def awq_columns(packed: torch.Tensor) -> torch.Tensor:
    """An AWQ qweight [K, N / 8] or qzeros [G, N / 8] -> unsigned values [N, K] or [N, G] (4 bits)."""
    nibbles = unpack_int32(packed, 4, dim=1)  # [R, N], in packing order within each word of 8
    inverse = torch.tensor([AWQ_PACK_ORDER.index(column) for column in range(8)], device=packed.device)
    return nibbles.view(nibbles.shape[0], -1, 8)[:, :, inverse].flatten(1).t().contiguous()


def group_order(g_idx: torch.Tensor, num_groups: int) -> torch.Tensor | None:
    """The input columns in group order (a stable sort of g_idx, int64 [K]), or None where that order does
    not give each group the same number of columns one after another (then no reordering serves it).
    Weights with their columns taken in this order, multiplied by x's columns in this order, are an
    in-order layer of groups of K / num_groups: what an act-order (GPTQ desc_act) checkpoint becomes."""
    num_cols, groups = g_idx.shape[0], g_idx.long()
    if num_cols % num_groups:
        return None
    order = torch.argsort(groups, stable=True)
    in_order = torch.arange(num_cols, device=g_idx.device) // (num_cols // num_groups)
    return order if torch.equal(groups[order], in_order) else None


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor | None,
               bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The layout -> W [N, K] in `dtype` ((q - zero) * scale in float32, one rounding)."""
    q = load_values(qweight, bits)
    num_cols = q.shape[1]
    groups = g_idx.long() if g_idx is not None else torch.arange(num_cols, device=q.device) // (
        num_cols // scales.shape[1])
    return ((q.float() - zeros[:, groups].float()) * scales[:, groups]).to(dtype)


def dequantize_k(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, supers: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor:
    """The K-quant form -> W [N, K] in `dtype` (q * (d * sc) - dmin * mn in float32, one rounding)."""
    q = unpack_nibbles(qweight).float()
    per_value = q.shape[1] // scales.shape[1]
    d, dmin = (supers[..., i].float().repeat_interleave(SUPER_GROUPS, dim=1) for i in (0, 1))
    scale = (d * scales.float()).repeat_interleave(per_value, dim=1)
    offset = (dmin * mins.float()).repeat_interleave(per_value, dim=1)
    return (q * scale - offset).to(dtype)


def int_quant_mm_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                           g_idx: torch.Tensor | None, bits: int, supers: torch.Tensor | None = None
                           ) -> torch.Tensor:
    """x [T, K] -> x @ W.T [T, N] in x's dtype: W rounded to x's dtype, float32 sums (the kernel's numerics).
    supers: the K-quant form (zeros then hold the mins; 4 bits, no g_idx)."""
    weight = (dequantize(qweight, scales, zeros, g_idx, bits, x.dtype) if supers is None
              else dequantize_k(qweight, scales, zeros, supers, x.dtype))
    return (x.float() @ weight.float().t()).to(x.dtype)
