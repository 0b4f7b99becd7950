"""The fused Mixture-of-Experts kernel: every token's k experts in two grouped GEMMs.

A token routed to experts (e1, e2) is two "choices", rows t*k + 0 and t*k + 1 of a flat list of
T*k. The align step (`align_to_experts`, torch, no host sync so it runs inside CUDA graphs)
sorts the choices by expert and pads each expert's run to a multiple of BLOCK_M, so that every
BLOCK_M-row block of the sorted list belongs to one expert (`block_experts`); pad entries hold
T*k and are masked. The grouped GEMM (`_moe_gemm_kernel`) gives each program one such block and
BLOCK_N output columns: it gathers its rows of A (x's row t for choice t*k + j in the first GEMM,
the choice's own row in the second), multiplies them by its expert's weight [N, K] and scatters
the result to the choices' rows, times the routing weight in the second GEMM. Then:

  x [T, H] --gemm(w13)--> gate_up [T*k, 2I] --silu*mul--> [T*k, I] --gemm(w2) * weight--> [T*k, H] --sum k--> [T, H]

The pure-torch reference (kernels/moe_reference.py `experts`) is the specification and the CPU
path; float32 runs with IEEE products (not TF32) so it matches it to rounding.
The tiles (BLOCK_M, and each GEMM's BLOCK_N, BLOCK_K, warps and stages) come from kernels/moe_tiles.py
by the mean rows per expert: a table measured by benchmarks/moe_tune.py.
Studied: vLLM's fused_moe (moe_align_block_size, a program per sorted block knowing its expert);
written smaller, without its quantized variants.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fitserve.kernels import reference, triton_fused
from fitserve.kernels.moe_tiles import GemmTile, MoeConfig, config_for

DOT_PRECISION = {torch.float32: "ieee", torch.bfloat16: "tf32", torch.float16: "tf32"}  # 16-bit: ignored


@triton.jit
def _moe_gemm_kernel(a_ptr, b_ptr, c_ptr, weights_ptr, sorted_ids_ptr, block_experts_ptr, num_padded_ptr,
                     N, K, num_choices, stride_am, stride_be, stride_bn, stride_bk, stride_cm,
                     A_ROW_DIVISOR: tl.constexpr, MUL_WEIGHT: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C[choice, n] = sum_k A[choice // A_ROW_DIVISOR, k] * B[expert, n, k] (* weight[choice]) for the
    BLOCK_M sorted choices of this program's block, all of one expert."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return  # a block past the last expert's padded run (the grid is sized for the worst case)
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    choices = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]
    valid = choices < num_choices  # pad entries hold num_choices
    a_rows = tl.where(valid, choices // A_ROW_DIVISOR, 0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + ks[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + expert * stride_be + cols[None, :] * stride_bn + ks[:, None] * stride_bk,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]: B[expert].T
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if MUL_WEIGHT:
        acc = acc * tl.load(weights_ptr + choices, mask=valid, other=0.0)[:, None]
    out_rows = tl.where(valid, choices, 0).to(tl.int64)
    tl.store(c_ptr + out_rows[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=valid[:, None] & col_ok[None, :])


@triton.jit
def _route_kernel(logits_ptr, weights_ptr, ids_ptr, stride_logits, NUM_EXPERTS: tl.constexpr,
                  BLOCK_E: tl.constexpr, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, RENORMALIZE: tl.constexpr):
    """One token: softmax over its expert logits in float32, the TOP_K largest (best first, the lowest
    expert index among equals), renormalized to sum 1 when asked."""
    token = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    valid = experts < NUM_EXPERTS
    logits = tl.load(logits_ptr + token * stride_logits + experts, mask=valid, other=-float("inf")).to(tl.float32)
    exps = tl.exp(logits - tl.max(logits, axis=0))
    left = tl.where(valid, exps / tl.sum(exps, axis=0), -1.0)  # probabilities are >= 0: -1 marks taken or absent
    ks = tl.arange(0, BLOCK_K)
    top_weights = tl.zeros([BLOCK_K], dtype=tl.float32)
    top_ids = tl.zeros([BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(left, axis=0)
        best_id = tl.min(tl.where(left == best, experts, BLOCK_E), axis=0)
        top_weights = tl.where(ks == j, best, top_weights)
        top_ids = tl.where(ks == j, best_id, top_ids)
        left = tl.where(experts == best_id, -1.0, left)
    if RENORMALIZE:
        top_weights = top_weights / tl.sum(top_weights, axis=0)  # the padding past TOP_K holds 0
    tl.store(weights_ptr + token * TOP_K + ks, top_weights, mask=ks < TOP_K)
    tl.store(ids_ptr + token * TOP_K + ks, top_ids.to(tl.int64), mask=ks < TOP_K)


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """moe_reference.route in one kernel: router_logits [T, E] -> (weights [T, k] float32, expert ids [T, k]
    int64), best expert first (in place of its 5 torch kernels: cast, softmax, top-k, sum, divide)."""
    num_tokens, num_experts = router_logits.shape
    assert router_logits.stride(1) == 1 and 0 < top_k <= num_experts
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=router_logits.device)
    if num_tokens > 0:
        _route_kernel[(num_tokens,)](router_logits, weights, ids, router_logits.stride(0), NUM_EXPERTS=num_experts,
                                     BLOCK_E=triton.next_power_of_2(num_experts), TOP_K=top_k,
                                     BLOCK_K=triton.next_power_of_2(top_k), RENORMALIZE=renormalize, num_warps=1)
    return weights, ids


def align_to_experts(topk_ids: torch.Tensor, num_experts: int, block_m: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] -> (sorted_ids [max_blocks * block_m] int32: the flat choices t*k + j grouped by
    expert, each expert's run padded with T*k to a multiple of block_m; block_experts [max_blocks]
    int32: each block's expert; num_padded [1] int32: the used length of sorted_ids).

    Fixed output sizes from T, k and E only (no host sync): at most min(E, T*k) experts are chosen,
    each wasting at most block_m - 1 pad entries."""
    flat = topk_ids.reshape(-1).long()
    num_choices = flat.numel()
    device = flat.device
    counts = torch.zeros(num_experts, dtype=torch.long, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded_end = torch.cumsum((counts + block_m - 1) // block_m * block_m, 0)  # [E]
    padded_start = padded_end - (counts + block_m - 1) // block_m * block_m
    order = torch.argsort(flat, stable=True)  # choices grouped by expert, in token order within one
    experts_sorted = flat[order]
    rank_in_expert = torch.arange(num_choices, device=device) - (torch.cumsum(counts, 0) - counts)[experts_sorted]
    max_blocks = triton.cdiv(num_choices + min(num_experts, num_choices) * (block_m - 1), block_m)
    sorted_ids = torch.full((max_blocks * block_m,), num_choices, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, padded_start[experts_sorted] + rank_in_expert, order.to(torch.int32))
    block_starts = torch.arange(max_blocks, device=device) * block_m
    block_experts = torch.searchsorted(padded_end, block_starts, right=True).clamp_(max=num_experts - 1)
    return sorted_ids, block_experts.to(torch.int32), padded_end[-1:].to(torch.int32)


def _check(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
           topk_ids: torch.Tensor) -> None:
    num_experts, two_inter, hidden = w13.shape
    assert x.dim() == 2 and x.shape[1] == hidden, f"x {tuple(x.shape)} against w13 {tuple(w13.shape)}"
    assert w2.shape == (num_experts, hidden, two_inter // 2), f"w2 {tuple(w2.shape)} against w13 {tuple(w13.shape)}"
    assert x.dtype == w13.dtype == w2.dtype and x.dtype in DOT_PRECISION, "x and the experts share a float dtype"
    assert x.is_contiguous() and w13.is_contiguous() and w2.is_contiguous(), "contiguous rows"
    assert topk_ids.shape == topk_weights.shape and topk_ids.shape[0] == x.shape[0], "one row of choices per token"
    assert topk_weights.dtype == torch.float32, "routing weights in float32"


def _gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, weights: torch.Tensor,
          aligned: tuple[torch.Tensor, torch.Tensor, torch.Tensor], a_row_divisor: int, mul_weight: bool,
          block_m: int, tile: GemmTile) -> None:
    """One grouped GEMM: c[choice] = a[choice // a_row_divisor] @ b[expert].T (* weights[choice])."""
    sorted_ids, block_experts, num_padded = aligned
    block_n, block_k, num_warps, num_stages = tile
    n, k = b.shape[1], b.shape[2]
    grid = (block_experts.shape[0], triton.cdiv(n, block_n))
    _moe_gemm_kernel[grid](a, b, c, weights, sorted_ids, block_experts, num_padded,
                           n, k, c.shape[0], a.stride(0), b.stride(0), b.stride(1), b.stride(2), c.stride(0),
                           A_ROW_DIVISOR=a_row_divisor, MUL_WEIGHT=mul_weight, PRECISION=DOT_PRECISION[a.dtype],
                           BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
                           num_stages=num_stages)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, config: MoeConfig | None = None) -> torch.Tensor:
    """x [T, H], w13 [E, 2*I, H] (gate rows, then up), w2 [E, H, I], topk_weights [T, k] float32,
    topk_ids [T, k] -> [T, H] in x's dtype: moe_reference.experts, in two grouped GEMMs, with the
    table's tiles (config_for) unless `config` names others (benchmarks/moe_tune.py)."""
    _check(x, w13, w2, topk_weights, topk_ids)
    num_tokens, top_k = topk_ids.shape
    num_choices = num_tokens * top_k
    config = config or config_for(num_choices, w13.shape[0], x.dtype)
    aligned = align_to_experts(topk_ids, w13.shape[0], config.block_m)
    weights = topk_weights.reshape(-1).contiguous()
    gate_up = torch.empty(num_choices, w13.shape[1], dtype=x.dtype, device=x.device)  # every row written once
    _gemm(x, w13, gate_up, weights, aligned, top_k, False, config.block_m, config.gate_up)
    hidden = silu_and_mul(gate_up)  # [T*k, I]
    down = torch.empty(num_choices, w2.shape[1], dtype=x.dtype, device=x.device)
    _gemm(hidden, w2, down, weights, aligned, 1, True, config.block_m, config.down)
    return down.view(num_tokens, top_k, -1).sum(dim=1)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """The fused element-wise kernel on CUDA, the torch reference elsewhere (the interpreter's checks)."""
    if gate_up.is_cuda:
        return triton_fused.silu_and_mul(gate_up)
    return reference.silu_and_mul(gate_up).contiguous()
