"""Fused element-wise Triton kernels: residual add + RMSNorm (Llama's and Gemma's (1 + w) form, over
rows or over each head of q/k), rotary embedding, SiLU- or GELU-tanh-and-multiply.

Each replaces a chain of 5 to 12 small torch kernels with one. At decode batch sizes these
chains cost more in launches than in bytes: measured on an H200 (Llama-3-8B shape, batch 1),
1,173 element-wise kernels took 1.8 ms of a 6.8 ms step. The torch versions in
kernels/reference.py are the specification and the CPU path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fitserve.kernels import pdl
from fitserve.kernels.pdl import begin


@triton.jit
def _scaled_norm(x, weight_ptr, eps, cols, mask, HIDDEN: tl.constexpr, WEIGHT_OFFSET: tl.constexpr):
    """x [BLOCK] of the model dtype (0 past the row) -> its RMSNorm times the weight, float32, in the order of
    kernels/reference.py: rms_norm's (WEIGHT_OFFSET 0: normalised, rounded to x's dtype, times weight) or
    gemma_rms_norm's (WEIGHT_OFFSET 1: normalised times (weight + 1) all in float32, rounded once later)."""
    x32 = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, axis=0) / HIDDEN + eps)
    normed = x32 * rstd
    if WEIGHT_OFFSET == 0.0:
        normed = normed.to(x.dtype).to(tl.float32)
    return normed * (tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32) + WEIGHT_OFFSET)


@triton.jit
def _add_rms_norm_row(x_ptr, residual_ptr, weight_ptr, x_weight_ptr, residual_out_ptr, eps, row, cols, mask,
                      stride_x, stride_residual, stride_residual_out, HIDDEN: tl.constexpr,
                      HAS_RESIDUAL: tl.constexpr, NORM_X: tl.constexpr, WEIGHT_OFFSET: tl.constexpr):
    """One row: x, first normed with x_weight when NORM_X (Gemma's post-attention norm, rounded as its own
    kernel would store it), plus residual stored at residual_out (with a residual); returns the row's
    _scaled_norm with weight."""
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if NORM_X:
        x = _scaled_norm(x, x_weight_ptr, eps, cols, mask, HIDDEN, WEIGHT_OFFSET).to(x.dtype)
    if HAS_RESIDUAL:
        # Round the sum to the storage dtype first, as the torch reference does.
        x = (x.to(tl.float32) + tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(residual_out_ptr + row * stride_residual_out + cols, x, mask=mask)
    return _scaled_norm(x, weight_ptr, eps, cols, mask, HIDDEN, WEIGHT_OFFSET)


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, x_weight_ptr, out_ptr, residual_out_ptr, eps,
    stride_x, stride_residual, stride_out, stride_residual_out,
    HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, NORM_X: tl.constexpr,
    WEIGHT_OFFSET: tl.constexpr, PDL: tl.constexpr,
):
    begin(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    y = _add_rms_norm_row(x_ptr, residual_ptr, weight_ptr, x_weight_ptr, residual_out_ptr, eps, row, cols, mask,
                          stride_x, stride_residual, stride_residual_out, HIDDEN, HAS_RESIDUAL, NORM_X, WEIGHT_OFFSET)
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


# Warps per row program of the row kernels. At decode sizes each row is one program whose time is
# latency: more warps keep more loads in flight. benchmarks/fused_quant_bench.py on the H200
# (results/fused_quant_h200_f5ec6d1.json, 32 calls in a CUDA graph, 20 rows of Llama-3-8B): RMSNorm
# with quantization 2.52 us per call at 8 warps, 2.10 at 16, 2.16 at 32; SiLU-and-multiply with
# quantization 6.13 us at 16 warps, 5.53 at 32; the same order at 1 and 64 rows.


def norm_warps(hidden: int) -> int:
    """Warps per row of the RMSNorm kernels, one per 256 elements of the row's power-of-two block, 4 to 16
    (Triton takes only powers of two: hidden 3072 (Llama 3.2 3B), 3584 (Qwen2.5 7B) or 3840 (Gemma 3 12B)
    by itself would give 12, 14 or 15); rms_norm and rms_norm_quant take the same (the order of the sum of
    squares, hence the bytes, follows it)."""
    return max(4, min(16, triton.next_power_of_2(hidden) // 256))


def silu_quant_warps(block: int) -> int:
    """Warps per row of silu_and_mul_quant: one per 512 elements of the row, 4 to 32."""
    return max(4, min(32, block // 512))


def _check_norm_inputs(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None,
                       x_weight: torch.Tensor | None) -> None:
    assert x.stride(1) == 1 and weight.shape == (x.shape[1],) and weight.is_contiguous()
    assert residual is None or (residual.shape == x.shape and residual.stride(1) == 1)
    # x normed first: the residual sum is what the kernel stores, so there must be a residual
    assert x_weight is None or (residual is not None and x_weight.shape == weight.shape and x_weight.is_contiguous())


def _check_offset(weight_offset: float) -> None:
    assert weight_offset in (0.0, 1.0), "0: Llama's rms_norm, 1: Gemma's (1 + weight) form"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             weight_offset: float = 0.0, x_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] (+ residual [T, H]) -> (normed [T, H], x + residual [T, H]); weight [H].

    weight_offset 0.0: reference.rms_norm; 1.0: reference.gemma_rms_norm (scaled by 1 + weight).
    x_weight [H]: x is first normed with it, of the same form (Gemma's post-attention norm before the
    residual add and the pre-feedforward norm: two norms in one kernel)."""
    num_rows, hidden = x.shape
    _check_norm_inputs(x, weight, residual, x_weight)
    _check_offset(weight_offset)
    out = torch.empty_like(x)
    residual_out = torch.empty_like(x) if residual is not None else x
    if num_rows == 0:
        return out, residual_out
    _rms_norm_kernel[(num_rows,)](
        x, residual if residual is not None else x, weight, x_weight if x_weight is not None else weight, out,
        residual_out, eps, x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
        residual_out.stride(0), HIDDEN=hidden, BLOCK=triton.next_power_of_2(hidden),
        HAS_RESIDUAL=residual is not None, NORM_X=x_weight is not None, WEIGHT_OFFSET=weight_offset,
        num_warps=norm_warps(hidden), **pdl.options(x.device),
    )
    return out, residual_out


@triton.jit
def _head_norm(x_ptr, weight_ptr, out_ptr, eps, row, head, stride_x, cols, mask, NUM_HEADS: tl.constexpr,
               HEAD_DIM: tl.constexpr, WEIGHT_OFFSET: tl.constexpr):
    """Head `head` of row `row` of x (row stride stride_x) normed into out, [T, NUM_HEADS * HEAD_DIM] contiguous."""
    y = _add_rms_norm_row(x_ptr + head * HEAD_DIM, x_ptr, weight_ptr, weight_ptr, x_ptr, eps, row, cols, mask,
                          stride_x, 0, 0, HEAD_DIM, False, False, WEIGHT_OFFSET)
    tl.store(out_ptr + row * (NUM_HEADS * HEAD_DIM) + head * HEAD_DIM + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_kernel(q_ptr, k_ptr, q_weight_ptr, k_weight_ptr, q_out_ptr, k_out_ptr, eps, stride_q, stride_k,
                    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK: tl.constexpr, WEIGHT_OFFSET: tl.constexpr, PDL: tl.constexpr):
    """Program (row, head): one head of q (head < NUM_Q_HEADS) or of k (the rest), each with its weight."""
    begin(PDL)
    row = tl.program_id(0)
    head = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    mask = cols < HEAD_DIM
    if head < NUM_Q_HEADS:
        _head_norm(q_ptr, q_weight_ptr, q_out_ptr, eps, row, head, stride_q, cols, mask, NUM_Q_HEADS, HEAD_DIM,
                   WEIGHT_OFFSET)
    else:
        _head_norm(k_ptr, k_weight_ptr, k_out_ptr, eps, row, head - NUM_Q_HEADS, stride_k, cols, mask, NUM_K_HEADS,
                   HEAD_DIM, WEIGHT_OFFSET)


def qk_rms_norm(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                weight_offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq * D], k [T, Hk * D] (column slices of qkv allowed: unit column stride) -> each head normed,
    ([T, Hq * D], [T, Hk * D]) contiguous, in one launch; q_weight, k_weight [D] shared by the heads
    (Qwen3's and, with weight_offset 1.0, Gemma 3's q/k norms). No copy of the strided slices first."""
    head_dim = q_weight.shape[0]
    assert q.stride(1) == 1 and k.stride(1) == 1 and q.shape[0] == k.shape[0]
    assert q_weight.shape == k_weight.shape == (head_dim,) and q_weight.is_contiguous() and k_weight.is_contiguous()
    assert q.shape[1] % head_dim == 0 and k.shape[1] % head_dim == 0
    _check_offset(weight_offset)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    num_q_heads, num_k_heads = q.shape[1] // head_dim, k.shape[1] // head_dim
    if q.shape[0] == 0 or num_q_heads + num_k_heads == 0:
        return q_out, k_out
    _qk_norm_kernel[(q.shape[0], num_q_heads + num_k_heads)](
        q, k, q_weight, k_weight, q_out, k_out, eps, q.stride(0), k.stride(0),
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=num_k_heads, HEAD_DIM=head_dim, BLOCK=triton.next_power_of_2(head_dim),
        WEIGHT_OFFSET=weight_offset, num_warps=norm_warps(head_dim), **pdl.options(q.device),
    )
    return q_out, k_out


def head_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0) -> torch.Tensor:
    """qk_rms_norm of x alone: x [T, heads * D] -> each head normed, [T, heads * D] contiguous; weight [D]."""
    return qk_rms_norm(x, x[:, :0], weight, weight, eps, weight_offset)[0]


@triton.jit
def _rope_halves(x1, x2, cos, sin):
    """Rotated halves (x1 cos - x2 sin, x2 cos + x1 sin), float32, each one explicit fma: every kernel
    that rotates (here and triton_attention.rotary_store_kv) rounds exactly alike."""
    return tl.fma(x1, cos, -(x2 * sin)), tl.fma(x2, cos, x1 * sin)


@triton.jit
def rope_table_row(cos_ptr, sin_ptr, positions_ptr, token, stride_table, HALF: tl.constexpr,
                   HALF_POW2: tl.constexpr):
    """(cos, sin) [1, HALF_POW2] float32 at this token's position (the tables' halves are equal); a
    half that is not a power of two (Phi-3's head_dim 96) is padded, the padding reads 0."""
    position = tl.load(positions_ptr + token)
    dims = tl.arange(0, HALF_POW2)
    cos = tl.load(cos_ptr + position * stride_table + dims, mask=dims < HALF, other=0.0)[None, :]
    sin = tl.load(sin_ptr + position * stride_table + dims, mask=dims < HALF, other=0.0)[None, :]
    return cos, sin


@triton.jit
def rotated_heads(base, cos, sin, NUM_HEADS: tl.constexpr, HEADS_POW2: tl.constexpr,
                  HALF: tl.constexpr, HALF_POW2: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Heads [NUM_HEADS, D] at base, rotated -> (offsets of the first halves, mask, first halves,
    second halves), the halves [HEADS_POW2, HALF_POW2] rounded to the tensor's dtype."""
    heads = tl.arange(0, HEADS_POW2)[:, None]
    dims = tl.arange(0, HALF_POW2)[None, :]
    mask = (heads < NUM_HEADS) & (dims < HALF)
    first = heads * HEAD_DIM + dims
    x1 = tl.load(base + first, mask=mask, other=0.0)
    x2 = tl.load(base + first + HALF, mask=mask, other=0.0)
    y1, y2 = _rope_halves(x1.to(tl.float32), x2.to(tl.float32), cos, sin)
    return first, mask, y1.to(x1.dtype), y2.to(x1.dtype)


@triton.jit
def rotate_heads_(base, cos, sin, NUM_HEADS: tl.constexpr, HEADS_POW2: tl.constexpr,
                  HALF: tl.constexpr, HALF_POW2: tl.constexpr, HEAD_DIM: tl.constexpr):
    first, mask, y1, y2 = rotated_heads(base, cos, sin, NUM_HEADS, HEADS_POW2, HALF, HALF_POW2, HEAD_DIM)
    tl.store(base + first, y1, mask=mask)
    tl.store(base + first + HALF, y2, mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, positions_ptr, cos_ptr, sin_ptr, stride_q, stride_k, stride_table,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HEADS_POW2: tl.constexpr,
    HALF: tl.constexpr, HALF_POW2: tl.constexpr, HEAD_DIM: tl.constexpr,
    PDL: tl.constexpr,
):
    begin(PDL)
    token = tl.program_id(0)
    cos, sin = rope_table_row(cos_ptr, sin_ptr, positions_ptr, token, stride_table, HALF, HALF_POW2)  # [1, D/2] f32
    rotate_heads_(q_ptr + token * stride_q, cos, sin, NUM_Q_HEADS, HEADS_POW2, HALF, HALF_POW2, HEAD_DIM)
    rotate_heads_(k_ptr + token * stride_k, cos, sin, NUM_K_HEADS, HEADS_POW2, HALF, HALF_POW2, HEAD_DIM)


def rotary_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
            cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> None:
    """In place: q [T, H*D], k [T, Hkv*D] (row-strided views allowed) rotated at positions [T].

    cos, sin: [max_positions, D] float32 tables whose two halves are equal (rotate_half layout).
    """
    num_tokens = q.shape[0]
    assert q.stride(1) == 1 and k.stride(1) == 1 and cos.is_contiguous() and sin.is_contiguous()
    assert q.shape[1] % head_dim == 0 and k.shape[1] % head_dim == 0 and positions.shape == (num_tokens,)
    if num_tokens == 0:
        return
    num_q_heads, num_k_heads = q.shape[1] // head_dim, k.shape[1] // head_dim
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos, sin, q.stride(0), k.stride(0), cos.stride(0),
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=num_k_heads,
        HEADS_POW2=triton.next_power_of_2(max(num_q_heads, num_k_heads)),
        HALF=head_dim // 2, HALF_POW2=triton.next_power_of_2(head_dim // 2), HEAD_DIM=head_dim, num_warps=4,
        **pdl.options(q.device),
    )


# torch's gelu(approximate="tanh") constants: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
GELU_TANH_BETA = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
GELU_TANH_KAPPA = tl.constexpr(0.044715)


@triton.jit
def _gate_times_up(gate, up, GELU_TANH: tl.constexpr):
    """act(gate) * up in float32 from gate, up of the model dtype. SiLU: one float32 expression (as
    before). GELU-tanh: torch's expression and order (reference.gelu_tanh_and_mul on CUDA): the GELU
    rounded to the model dtype, then times up; tanh(u) written as 2 sigmoid(2u) - 1 (no tanh in Triton's
    interpreter; exact at +-inf), so the float32 value may differ from torch's in the last bits."""
    gate32 = gate.to(tl.float32)
    up32 = up.to(tl.float32)
    if GELU_TANH:
        inner = GELU_TANH_BETA * (gate32 + GELU_TANH_KAPPA * (gate32 * gate32 * gate32))
        tanh = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0
        act = (0.5 * gate32 * (1.0 + tanh)).to(gate.dtype).to(tl.float32)
    else:
        act = gate32 / (1.0 + tl.exp(-gate32))
    return act * up32


@triton.jit
def _act_and_mul_kernel(gate_up_ptr, out_ptr, stride_in, stride_out, INTER: tl.constexpr, BLOCK: tl.constexpr,
                        GELU_TANH: tl.constexpr, PDL: tl.constexpr):
    begin(PDL)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * stride_in + INTER + cols, mask=mask, other=0.0)
    out = _gate_times_up(gate, up, GELU_TANH)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


SILU_BLOCK = 1024


def _act_and_mul(gate_up: torch.Tensor, gelu_tanh: bool) -> torch.Tensor:
    num_rows, double = gate_up.shape
    assert double % 2 == 0 and gate_up.stride(1) == 1
    inter = double // 2
    out = torch.empty(num_rows, inter, dtype=gate_up.dtype, device=gate_up.device)
    if num_rows == 0:
        return out
    _act_and_mul_kernel[(num_rows, triton.cdiv(inter, SILU_BLOCK))](
        gate_up, out, gate_up.stride(0), out.stride(0), INTER=inter, BLOCK=SILU_BLOCK, GELU_TANH=gelu_tanh,
        num_warps=4, **pdl.options(gate_up.device),
    )
    return out


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2*I] (gate first) -> silu(gate) * up [T, I]."""
    return _act_and_mul(gate_up, gelu_tanh=False)


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2*I] (gate first) -> gelu_tanh(gate) * up [T, I] (Gemma 2/3's MLP)."""
    return _act_and_mul(gate_up, gelu_tanh=True)


# -- the same, with the output quantized to fp8 per row for an fp8 linear layer (kernels/fp8.py) -----------
# The bf16 row is computed exactly as above, then its absolute maximum gives the row's scale and the
# row is stored as e4m3 only: the same bytes as rms_norm/silu_and_mul followed by
# triton_fp8.quantize_per_token, one kernel and one write fewer.


@triton.jit
def _quantize_row(y, mask, q_row_ptr, scale_ptr, row, cols, FP8_MAX: tl.constexpr, FP8_MAX_INV: tl.constexpr,
                  MIN_SCALE: tl.constexpr):
    """y [BLOCK] float32 holding values of the model dtype -> e4m3 at q_row_ptr + cols, scale at scale_ptr + row."""
    y = tl.where(mask, y, 0.0)
    scale = tl.maximum(tl.max(tl.abs(y), axis=0) * FP8_MAX_INV, MIN_SCALE)
    tl.store(scale_ptr + row, scale)
    q = tl.clamp(tl.math.div_rn(y, scale), -FP8_MAX, FP8_MAX)
    tl.store(q_row_ptr + cols, q.to(q_row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_quant_kernel(
    x_ptr, residual_ptr, weight_ptr, x_weight_ptr, q_ptr, scale_ptr, residual_out_ptr, eps,
    stride_x, stride_residual, stride_q, stride_residual_out,
    HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, NORM_X: tl.constexpr,
    WEIGHT_OFFSET: tl.constexpr,
    FP8_MAX: tl.constexpr, FP8_MAX_INV: tl.constexpr, MIN_SCALE: tl.constexpr,
    PDL: tl.constexpr,
):
    begin(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    y = _add_rms_norm_row(x_ptr, residual_ptr, weight_ptr, x_weight_ptr, residual_out_ptr, eps, row, cols, mask,
                          stride_x, stride_residual, stride_residual_out, HIDDEN, HAS_RESIDUAL, NORM_X, WEIGHT_OFFSET)
    out = y.to(x_ptr.dtype.element_ty).to(tl.float32)  # the value rms_norm would store
    _quantize_row(out, mask, q_ptr + row * stride_q, scale_ptr, row, cols, FP8_MAX, FP8_MAX_INV, MIN_SCALE)


def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                   weight_offset: float = 0.0, x_weight: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As rms_norm, with the normed output as (q [T, H] fp8, scale [T, 1] float32); then x + residual [T, H]."""
    from fitserve.kernels import fp8

    num_rows, hidden = x.shape
    _check_norm_inputs(x, weight, residual, x_weight)
    _check_offset(weight_offset)
    assert hidden <= FUSED_QUANT_MAX_COLS
    q = torch.empty(num_rows, hidden, dtype=fp8.FP8_DTYPE, device=x.device)
    scale = torch.empty(num_rows, 1, dtype=torch.float32, device=x.device)
    residual_out = torch.empty_like(x) if residual is not None else x
    if num_rows == 0:
        return q, scale, residual_out
    _rms_norm_quant_kernel[(num_rows,)](
        x, residual if residual is not None else x, weight, x_weight if x_weight is not None else weight, q, scale,
        residual_out, eps, x.stride(0), residual.stride(0) if residual is not None else 0, q.stride(0),
        residual_out.stride(0), HIDDEN=hidden, BLOCK=triton.next_power_of_2(hidden),
        HAS_RESIDUAL=residual is not None, NORM_X=x_weight is not None, WEIGHT_OFFSET=weight_offset,
        FP8_MAX=fp8.FP8_MAX, FP8_MAX_INV=fp8.FP8_MAX_INV, MIN_SCALE=fp8.MIN_SCALE,
        num_warps=norm_warps(hidden), **pdl.options(x.device),
    )
    return q, scale, residual_out


@triton.jit
def _act_and_mul_quant_kernel(
    gate_up_ptr, q_ptr, scale_ptr, stride_in, stride_q, INTER: tl.constexpr, BLOCK: tl.constexpr,
    GELU_TANH: tl.constexpr, FP8_MAX: tl.constexpr, FP8_MAX_INV: tl.constexpr, MIN_SCALE: tl.constexpr,
    PDL: tl.constexpr,
):
    begin(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)  # the whole row: its maximum sets the scale
    mask = cols < INTER
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * stride_in + INTER + cols, mask=mask, other=0.0)
    out = _gate_times_up(gate, up, GELU_TANH).to(gate.dtype).to(tl.float32)  # the value _act_and_mul would store
    _quantize_row(out, mask, q_ptr + row * stride_q, scale_ptr, row, cols, FP8_MAX, FP8_MAX_INV, MIN_SCALE)


FUSED_QUANT_MAX_COLS = 16384  # a row of the fused quantizing kernels stays in registers up to this width


def silu_and_mul_quant(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up [T, 2*I] -> silu(gate) * up as (q [T, I] fp8, scale [T, 1] float32)."""
    return _act_and_mul_quant(gate_up, gelu_tanh=False)


def gelu_tanh_and_mul_quant(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up [T, 2*I] -> gelu_tanh(gate) * up as (q [T, I] fp8, scale [T, 1] float32)."""
    return _act_and_mul_quant(gate_up, gelu_tanh=True)


def _act_and_mul_quant(gate_up: torch.Tensor, gelu_tanh: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from fitserve.kernels import fp8

    num_rows, double = gate_up.shape
    assert double % 2 == 0 and gate_up.stride(1) == 1
    inter = double // 2
    assert inter <= FUSED_QUANT_MAX_COLS
    q = torch.empty(num_rows, inter, dtype=fp8.FP8_DTYPE, device=gate_up.device)
    scale = torch.empty(num_rows, 1, dtype=torch.float32, device=gate_up.device)
    if num_rows == 0:
        return q, scale
    block = triton.next_power_of_2(inter)
    _act_and_mul_quant_kernel[(num_rows,)](
        gate_up, q, scale, gate_up.stride(0), q.stride(0), INTER=inter, BLOCK=block, GELU_TANH=gelu_tanh,
        FP8_MAX=fp8.FP8_MAX, FP8_MAX_INV=fp8.FP8_MAX_INV, MIN_SCALE=fp8.MIN_SCALE,
        num_warps=silu_quant_warps(block), **pdl.options(gate_up.device),
    )
    return q, scale
