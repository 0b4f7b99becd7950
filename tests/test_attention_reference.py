"""kernels.reference against naive dense attention on random inputs of awkward sizes."""

from __future__ import annotations

import random

import pytest
import torch

from fitserve.kernels.reference import paged_attention, store_kv
from fitserve.forward_batch import PAD_SLOT
from paged_helpers import make_batch


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_cached: int, scale: float,
                    window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """q [Lq, H, D], k/v [L, Hkv, D] of one request in float64 -> [Lq, H, D]; query r sits at num_cached + r
    and sees keys j <= its position, and with a window only those with position - j < window."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1).double()
    v = v.repeat_interleave(group, dim=1).double()
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale  # [H, Lq, L]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    distance = (num_cached + torch.arange(q.shape[0]))[:, None] - torch.arange(k.shape[0])[None, :]
    allowed = (distance >= 0) & (distance < (window or k.shape[0] + 1))
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def run_case(query_lens: list[int], seq_lens: list[int], num_heads: int, num_kv_heads: int,
             head_dim: int = 24, block_size: int = 4, num_pad_rows: int = 0, seed: int = 0,
             window: int | None = None, softcap: float | None = None, poison_freed: bool = False) -> None:
    """poison_freed: the blocks wholly before each request's (num_cached - window), which the cache
    manager frees, are filled with NaN (a freed block may hold anything) after the store."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    num_blocks = sum(-(-s // block_size) for s in seq_lens) + 3
    free = list(range(num_blocks))
    rng.shuffle(free)  # blocks in shuffled order
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=gen)  # garbage everywhere not written
    v_cache = torch.randn(cache_shape, generator=gen)
    full_k = [torch.randn(s, num_kv_heads, head_dim, generator=gen) for s in seq_lens]
    full_v = [torch.randn(s, num_kv_heads, head_dim, generator=gen) for s in seq_lens]
    tables, slots, positions, new_k, new_v = [], [], [], [], []
    for i, (q_len, s_len) in enumerate(zip(query_lens, seq_lens)):
        table = [free.pop() for _ in range(-(-s_len // block_size))]
        tables.append(table)
        all_slots = [table[p // block_size] * block_size + p % block_size for p in range(s_len)]
        num_cached = s_len - q_len
        for p in range(num_cached):  # the context cached by earlier steps
            k_cache.view(-1, num_kv_heads, head_dim)[all_slots[p]] = full_k[i][p]
            v_cache.view(-1, num_kv_heads, head_dim)[all_slots[p]] = full_v[i][p]
        slots += all_slots[num_cached:]
        positions += list(range(num_cached, s_len))
        new_k.append(full_k[i][num_cached:])
        new_v.append(full_v[i][num_cached:])
    num_tokens = sum(query_lens) + num_pad_rows
    batch = make_batch([0] * sum(query_lens), positions, slots, query_lens, seq_lens, tables, num_pad_rows)
    pad_k = torch.randn(num_pad_rows, num_kv_heads, head_dim, generator=gen)
    before = k_cache.clone()
    store_kv(torch.cat(new_k + [pad_k]), torch.cat(new_v + [pad_k]), k_cache, v_cache, batch.slot_mapping)
    assert batch.slot_mapping[-1].item() == PAD_SLOT or num_pad_rows == 0
    num_changed_slots = int((k_cache != before).any(-1).any(-1).sum())
    assert num_changed_slots == sum(query_lens), "exactly the fed, non-padding tokens are stored"
    for table, q_len, s_len in zip(tables, query_lens, seq_lens):
        if poison_freed and window is not None:
            for block in table[:max(0, (s_len - q_len - window) // block_size)]:
                k_cache[block], v_cache[block] = float("nan"), float("nan")
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen)
    scale = head_dim ** -0.5
    if softcap is not None:
        q = q * 8  # scores far past the cap, where capping changes them
    out = paged_attention(q, k_cache, v_cache, batch, scale, sliding_window=window, softcap=softcap)
    row = 0
    for i, (q_len, s_len) in enumerate(zip(query_lens, seq_lens)):
        ref = dense_attention(q[row:row + q_len], full_k[i], full_v[i], s_len - q_len, scale, window, softcap)
        torch.testing.assert_close(out[row:row + q_len].double(), ref, atol=1e-5, rtol=1e-5)
        row += q_len
    assert torch.all(out[row:] == 0), "padding rows must produce zeros"


@pytest.mark.parametrize("num_heads,num_kv_heads", [(6, 2), (4, 4), (9, 3)])
def test_mixed_prefill_and_decode(num_heads, num_kv_heads):
    # a fresh prefill, a chunk on top of cached context, a decode, a 1-token prefill, an exact block
    run_case([7, 5, 1, 1, 8], [7, 13, 10, 1, 16], num_heads, num_kv_heads, num_pad_rows=3)


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_decode_only_batch(block_size):
    run_case([1, 1, 1, 1], [1, 17, 5, 33], 8, 2, block_size=block_size, num_pad_rows=2, seed=1)


def test_single_long_chunk_after_context():
    run_case([31], [70], 4, 1, head_dim=64, block_size=16, seed=2)


@pytest.mark.parametrize("window", [1, 3, 6, 100])
def test_sliding_window_in_prefill_chunks_and_decode(window):
    run_case([7, 5, 1, 1, 8], [7, 13, 10, 1, 16], 6, 2, num_pad_rows=2, window=window)
    run_case([1, 1, 1], [1, 17, 33], 4, 2, block_size=4, seed=3, window=window)


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_blocks_before_the_window_are_never_read_for_values(softcap):
    """Freed blocks full of NaN: a key outside every query's window is selected away, not multiplied by 0."""
    run_case([7, 5, 1, 1, 8], [7, 30, 10, 1, 16], 6, 2, num_pad_rows=2, window=6, softcap=softcap, poison_freed=True)
    run_case([1, 1, 1], [1, 17, 33], 4, 2, block_size=4, seed=3, window=5, softcap=softcap, poison_freed=True)


def test_soft_capped_scores_with_and_without_a_window():
    run_case([7, 5, 1, 8], [7, 13, 10, 16], 6, 2, softcap=2.0)
    run_case([1, 1, 1], [1, 17, 33], 4, 2, seed=4, softcap=2.0, window=5)


def test_the_window_changes_the_result():
    """A window shorter than the context must not be a no-op (else the tests above prove nothing)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 2, 8, generator=gen), torch.randn(10, 2, 8, generator=gen),
               torch.randn(10, 2, 8, generator=gen))
    assert not torch.allclose(dense_attention(q, k, v, 6, 0.3), dense_attention(q, k, v, 6, 0.3, window=3))


def test_store_kv_skips_pad_slots():
    cache = torch.zeros(2, 4, 1, 2)
    k = torch.arange(6, dtype=torch.float32).view(3, 1, 2)
    slots = torch.tensor([5, PAD_SLOT, 0])
    store_kv(k, k, cache, cache.clone(), slots)
    flat = cache.view(-1, 1, 2)
    assert flat[5].tolist() == [[0.0, 1.0]] and flat[0].tolist() == [[4.0, 5.0]]
    assert int((flat != 0).any(-1).sum()) == 2
