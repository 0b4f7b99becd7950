"""Pure-torch reference kernels: the specification the Triton kernels must match, and the CPU path.

KV cache layout (DESIGN.md): per layer, K and V each [num_blocks, block_size, num_kv_heads, head_dim];
a token's slot is block_id * block_size + offset; PAD_SLOT rows are skipped by the store.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fitserve.forward_batch import PAD_SLOT, ForwardBatch
from fitserve.kernels import fp8


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Write k, v [T, num_kv_heads, head_dim] into the caches at slot_mapping [T] int64, skipping PAD_SLOT.

    An fp8 cache stores k / k_scale and v / v_scale, saturated at +-448 (kernels/fp8.py).
    """
    if _store_kv_rows_cpu(k, v, k_cache, v_cache, slot_mapping):
        return
    keep = slot_mapping != PAD_SLOT  # [T] bool
    slots = slot_mapping[keep].long()
    for new, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        rows = fp8.store_to_cache(new[keep], cache.dtype, scale)  # [kept, Hkv, D] in the cache dtype
        flat = cache.view(-1, cache.shape[2], cache.shape[3])  # [num_slots, Hkv, D]
        if fp8.is_fp8(cache.dtype):  # index_copy_ has no float8 kernel on the CPU: copy the bytes
            flat, rows = flat.view(torch.uint8), rows.view(torch.uint8)
        flat.index_copy_(0, slots, rows)


def _store_kv_rows_cpu(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> bool:
    """store_kv's CPU path when no row is PAD_SLOT (a CPU batch has no graph padding) and the cache is
    not fp8: the rows copied straight in, two ops instead of store_kv's ten or so (its masks and
    boolean indexing cost a layer's decode step more than the copy itself; docs/benchmarks.md).
    Returns False, having written nothing, when it does not apply."""
    if slot_mapping.device.type != "cpu" or fp8.is_fp8(k_cache.dtype):
        return False
    # Compiled (runner/cpu_compile.py) the batch has no padding row, and a data-dependent branch would
    # break the graph; eager, the check costs one op
    if not torch.compiler.is_compiling() and not bool((slot_mapping >= 0).all()):
        return False
    slots = slot_mapping.long()
    for new, cache in ((k, k_cache), (v, v_cache)):
        cache.view(-1, cache.shape[2], cache.shape[3]).index_copy_(0, slots, new.to(cache.dtype))
    return True


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[num_blocks, BS, Hkv, D] cache, [nb] block ids -> [num_tokens, Hkv, D] in sequence order."""
    block_size = cache.shape[1]
    num_blocks = -(-num_tokens // block_size)
    blocks = cache.index_select(0, block_table[:num_blocks].long())  # [nb, BS, Hkv, D]
    return blocks.flatten(0, 1)[:num_tokens]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
          scale: float, is_causal: bool = False) -> torch.Tensor:
    """q [B, H, Lq, D], k/v [B, Hkv, Lk, D] (GQA when Hkv < H) -> [B, H, Lq, D]."""
    group_size = q.shape[1] // k.shape[1]
    if group_size > 1:
        k = k.repeat_interleave(group_size, dim=1)
        v = v.repeat_interleave(group_size, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap) (Gemma 2's attention scores and final logits), or x when there is no cap."""
    return x if cap is None else cap * torch.tanh(x / cap)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
            softcap: float | None, is_causal: bool = False) -> torch.Tensor:
    """_sdpa, or with a logit soft-cap (Gemma 2: scores = softcap * tanh(scores / softcap), before
    the mask) the same attention written out, softmax in float32; mask True = attend."""
    if softcap is None:
        return _sdpa(q, k, v, mask, scale, is_causal)
    group_size = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group_size, dim=1), v.repeat_interleave(group_size, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # [B, H, Lq, Lk]
    scores = soft_cap(scores, softcap)
    if is_causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


def attend_mask(key_pos: torch.Tensor, query_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """[..., Lq, L] bool, True = attend: causal, and within the window when there is one (a query at
    position p sees keys p - sliding_window < j <= p, transformers' convention)."""
    distance = query_pos[..., :, None] - key_pos[..., None, :]
    mask = distance >= 0
    return mask if sliding_window is None else mask & (distance < sliding_window)


def _zero_unseen(x: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """x with the keys no query sees set to zero (seen: bool, broadcast against x). The cache blocks
    before a sliding window are freed (core/kv_cache_manager.py) and may hold anything, NaN included,
    and a masked-out NaN would still poison the softmax's sum (0 * NaN is NaN): select, never multiply."""
    return torch.where(seen, x, torch.zeros((), dtype=x.dtype, device=x.device))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    batch: ForwardBatch, scale: float, k_scale: float = 1.0, v_scale: float = 1.0,
                    sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Attention of q [T, H, D] over each request's cached context (new tokens already stored).

    K and V are read as cache * k_scale and cache * v_scale (1.0 unless the cache is fp8).
    Request i's query rows are query_start_loc[i]:query_start_loc[i+1]; they sit at the end of
    its seq_lens[i] context, causal among themselves. With `sliding_window` a query sees only the
    last `sliding_window` positions up to its own (the cache blocks before them are never read for
    their values); with `softcap` the scores are soft-capped (_attend). Rows past the last request
    (CUDA-graph padding) get zeros. Returns [T, H, D] in q's dtype.
    """
    out = torch.zeros_like(q)
    if batch.num_seqs == 0:
        return out
    if batch.max_query_len == 1:
        # a compiled decode step (runner/cpu_compile.py) has no host-side lengths and no padding row
        num_rows = sum(batch.query_lens_cpu) if batch.query_lens_cpu else q.shape[0]
        out[:num_rows] = _decode_attention(q[:num_rows], k_cache, v_cache, batch, scale, k_scale, v_scale,
                                           sliding_window, softcap)
        return out
    row = 0
    for i, (query_len, seq_len) in enumerate(zip(batch.query_lens_cpu, batch.seq_lens_cpu)):
        if query_len == 0:
            continue
        k = fp8.load_from_cache(_gather_context(k_cache, batch.block_tables[i], seq_len), q.dtype, k_scale)
        v = fp8.load_from_cache(_gather_context(v_cache, batch.block_tables[i], seq_len), q.dtype, v_scale)
        k, v = k.transpose(0, 1), v.transpose(0, 1)  # [Hkv, L, D] in q's dtype
        q_i = q[row:row + query_len].transpose(0, 1)  # [H, Lq, D]
        num_cached = seq_len - query_len
        if num_cached == 0 and sliding_window is None:
            o = _attend(q_i[None], k[None], v[None], None, scale, softcap, is_causal=query_len > 1)
        else:
            key_pos = torch.arange(seq_len, device=q.device)  # [L]
            query_pos = num_cached + torch.arange(query_len, device=q.device)  # [Lq]
            mask = attend_mask(key_pos, query_pos, sliding_window)  # [Lq, L]
            if sliding_window is not None:  # only a window frees blocks (see _zero_unseen)
                k, v = _zero_unseen(k, mask.any(0)[None, :, None]), _zero_unseen(v, mask.any(0)[None, :, None])
            o = _attend(q_i[None], k[None], v[None], mask, scale, softcap)
        out[row:row + query_len] = o[0].transpose(0, 1)
        row += query_len
    return out


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: ForwardBatch,
                      scale: float, k_scale: float, v_scale: float, sliding_window: int | None,
                      softcap: float | None) -> torch.Tensor:
    """All requests feed one token: q [S, H, D]; one padded attention call over [S, max_seq_len]."""
    num_seqs, block_size = batch.num_seqs, k_cache.shape[1]
    num_blocks = -(-batch.max_seq_len // block_size)
    table = batch.block_tables[:, :num_blocks].long()  # [S, nb]
    if torch.compiler.is_compiling() and sliding_window is None and softcap is None and not fp8.is_fp8(k_cache.dtype):
        return _decode_attention_in_place(q, k_cache, v_cache, table, batch.seq_lens, scale)
    k = fp8.load_from_cache(k_cache[table].flatten(1, 2)[:, :batch.max_seq_len], q.dtype, k_scale)  # [S, L, Hkv, D]
    v = fp8.load_from_cache(v_cache[table].flatten(1, 2)[:, :batch.max_seq_len], q.dtype, v_scale)
    key_pos = torch.arange(batch.max_seq_len, device=q.device)[None, :]  # [1, L]
    query_pos = batch.seq_lens[:, None].to(q.device) - 1  # [S, 1]: the new token is the last one
    mask = attend_mask(key_pos, query_pos, sliding_window)  # [S, 1, L]
    if sliding_window is not None:  # only a window frees blocks: no copy of K and V per layer and step otherwise
        k, v = _zero_unseen(k, mask[:, 0, :, None, None]), _zero_unseen(v, mask[:, 0, :, None, None])
    if softcap is None:
        return _decode_sdpa_grouped(q, k.transpose(1, 2), v.transpose(1, 2), mask, scale)
    o = _attend(q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2), mask[:, None], scale, softcap)  # [S, H, 1, D]
    assert o.shape[0] == num_seqs
    return o[:, :, 0, :]


def _decode_attention_in_place(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                               seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """_decode_attention as a compiled step writes it (runner/cpu_compile.py): q [S, H, D], table [S, nb]
    -> [S, H, D]. The dot products and the weighted sum are written as broadcast products and sums, which
    inductor turns into loops that read each K and V row from its cache block in place: no gathered copy
    of the context per layer (eager, these broadcasts would be materialized: use _decode_sdpa_grouped)."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    k = k_cache[table].flatten(1, 2).transpose(1, 2)[:, :, None]  # [S, Hkv, 1, L, D], a view inductor fuses
    v = v_cache[table].flatten(1, 2).transpose(1, 2)[:, :, None]
    grouped = q.reshape(num_seqs, num_kv_heads, num_heads // num_kv_heads, 1, head_dim)  # [S, Hkv, G, 1, D]
    scores = (grouped.float() * k.float()).sum(-1) * scale  # [S, Hkv, G, L] float32
    key_pos = torch.arange(scores.shape[-1], device=q.device)
    scores = scores.masked_fill(key_pos >= seq_lens.to(q.device)[:, None, None, None], float("-inf"))
    weights = scores.softmax(-1)[..., None]  # [S, Hkv, G, L, 1]
    o = (weights * v.float()).sum(-2)  # [S, Hkv, G, D]
    return o.to(q.dtype).reshape(num_seqs, num_heads, head_dim)


def _decode_sdpa_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """One decode token per request: q [S, H, D], k/v [S, Hkv, L, D], mask [S, 1, L] -> [S, H, D].

    The H / Hkv query heads that share a KV head become that head's query rows ([S, Hkv, G, D]; head
    h reads KV head h // G, as repeat_interleave would give it), so K and V are never copied per
    group: on the CPU this was 5-10x faster at 16 streams than repeating them (docs/benchmarks.md)."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    grouped = q.reshape(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    o = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask[:, None], scale=scale)  # [S, Hkv, G, D]
    return o.reshape(num_seqs, num_heads, head_dim)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] (+ residual [T, H], summed in x's dtype) -> (normed [T, H], the sum [T, H]).

    Normalised in float32, rounded to x's dtype, then scaled by weight [H] (HF Llama's order).
    """
    if residual is not None:
        x = x + residual
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * normed, x


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                   residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gemma's RMSNorm: as rms_norm, but scaled by (1 + weight) in float32 before the rounding to x's
    dtype (transformers' Gemma2RMSNorm / Gemma3RMSNorm); weight [H] is the checkpoint's, centred on 0."""
    if residual is not None:
        x = x + residual
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight.float())
    return normed.to(x.dtype), x


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H*D], k [T, Hkv*D] rotated at positions [T] (rotate_half layout); cos/sin [P, D] float32."""
    cos_t = cos[positions].to(q.dtype)[:, None, :]  # [T, 1, D]
    sin_t = sin[positions].to(q.dtype)[:, None, :]
    half = head_dim // 2

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1, head_dim)  # [T, heads, D]
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return (x * cos_t + rotated * sin_t).flatten(1)

    return rotate(q), rotate(k)


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2*I] (gate first) -> gelu_tanh(gate) * up [T, I] (Gemma's gelu_pytorch_tanh MLP)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2*I] (gate first) -> silu(gate) * up [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
