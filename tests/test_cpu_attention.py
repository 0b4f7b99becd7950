"""The CPU decode attention (kernels/reference.py's _decode_sdpa_grouped): grouped query heads read
their shared KV head in place, never a per-group copy of K and V, and match dense attention."""

from __future__ import annotations

import pytest
import torch

from fitserve.kernels import reference
from paged_helpers import make_batch
from test_attention_reference import run_case


@pytest.fixture
def no_repeat_interleave(monkeypatch):
    """Fails any call that would copy K or V once per query head of a group."""
    def refuse(*args, **kwargs):
        raise AssertionError("the decode path copied K/V per query-head group (repeat_interleave)")
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", refuse)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(9, 3), (8, 2), (4, 4), (6, 1)])
def test_grouped_decode_matches_dense_attention(num_heads, num_kv_heads):
    run_case([1, 1, 1, 1], [1, 17, 5, 33], num_heads, num_kv_heads, block_size=4, num_pad_rows=2, seed=5)


def test_decode_reads_the_shared_kv_head_in_place(no_repeat_interleave):
    q = torch.randn(3, 9, 8)
    k_cache, v_cache = torch.randn(6, 4, 3, 8), torch.randn(6, 4, 3, 8)
    batch = make_batch([0, 0, 0], [4, 0, 9], [5, 8, 17], [1, 1, 1], [5, 1, 10], [[0, 1], [2], [3, 4, 5]], 0)
    out = reference.paged_attention(q, k_cache, v_cache, batch, 0.3)
    assert out.shape == (3, 9, 8) and torch.isfinite(out).all()


def test_head_h_reads_kv_head_h_over_group_size():
    """Each query head of a group gets its own KV head's values: with V constant per KV head, the
    output of head h is that constant of KV head h // 3."""
    q = torch.randn(2, 9, 4)
    k_cache = torch.randn(2, 4, 3, 4)
    v_cache = torch.arange(3.0)[None, None, :, None].expand(2, 4, 3, 4).contiguous()
    batch = make_batch([0, 0], [2, 3], [2, 7], [1, 1], [3, 4], [[0], [1]], 0)
    out = reference.paged_attention(q, k_cache, v_cache, batch, 0.5)
    expected = (torch.arange(9) // 3).float()[None, :, None].expand(2, 9, 4)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_store_kv_without_padding_writes_what_the_masked_store_writes(cache_dtype):
    """The CPU's direct copy (no PAD_SLOT row) and the masked path (one PAD_SLOT row added) store the
    same rows, in the cache's dtype, and nothing else."""
    gen = torch.Generator().manual_seed(7)
    k, v = torch.randn(5, 3, 8, generator=gen), torch.randn(5, 3, 8, generator=gen)
    slots = torch.tensor([9, 0, 31, 17, 4])
    direct = [torch.zeros(4, 8, 3, 8, dtype=cache_dtype) for _ in range(2)]
    masked = [torch.zeros(4, 8, 3, 8, dtype=cache_dtype) for _ in range(2)]
    reference.store_kv(k, v, *direct, slots)
    pad = torch.zeros(1, 3, 8)
    reference.store_kv(torch.cat([k, pad]), torch.cat([v, pad + 1]), *masked, torch.cat([slots, torch.tensor([-1])]))
    for got, want, rows in zip(direct, masked, (k, v)):
        assert torch.equal(got, want)
        assert torch.equal(got.view(-1, 3, 8)[slots], rows.to(cache_dtype))
        assert int((got != 0).any(-1).any(-1).sum()) == 5
