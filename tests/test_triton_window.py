"""Triton attention with a sliding window, a logit soft-cap, and a head_dim that is not a power of two,
against the pure-torch reference (GPU only). The cache blocks a window has left are freed by the cache
manager and their table entries point at a block of NaN here: a kernel that reads one for its values
writes NaN."""

from __future__ import annotations

import random

import pytest
import torch

from fitserve.kernels import reference
from paged_helpers import make_batch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from fitserve.kernels import triton_attention, triton_decode, triton_fused  # noqa: E402  (triton comes with CUDA torch)

POISON_BLOCK = 0  # freed table entries point here; it holds NaN


def windowed_case(query_lens, seq_lens, num_kv_heads, head_dim, block_size, window, seed):
    """A shuffled-block cache (bfloat16) holding each request's context; the blocks wholly before
    (num_cached - window) are freed: NaN, and their table entries point at POISON_BLOCK."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rng = random.Random(seed)
    num_blocks = sum(-(-s // block_size) for s in seq_lens) + 3
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen, device="cuda").to(torch.bfloat16)
    v_cache = torch.randn(shape, generator=gen, device="cuda").to(torch.bfloat16)
    k_cache[POISON_BLOCK], v_cache[POISON_BLOCK] = float("nan"), float("nan")
    tables, slots, positions = [], [], []
    for q_len, s_len in zip(query_lens, seq_lens):
        table = [free.pop() for _ in range(-(-s_len // block_size))]
        num_freed = 0 if window is None else max(0, (s_len - q_len - window) // block_size)
        for block in table[:num_freed]:
            k_cache[block], v_cache[block] = float("nan"), float("nan")
        table = [POISON_BLOCK] * num_freed + table[num_freed:]
        tables.append(table)
        for p in range(s_len - q_len, s_len):
            positions.append(p)
            slots.append(table[p // block_size] * block_size + p % block_size)
    batch = make_batch([0] * sum(query_lens), positions, slots, list(query_lens), list(seq_lens), tables,
                       num_pad_rows=2, device="cuda")
    return k_cache, v_cache, batch


def _check(out, expected, num_real):
    got = out[:num_real].float()
    assert not got.isnan().any(), "a real row was not written, or a freed block was read"
    assert (got - expected[:num_real]).norm() / expected[:num_real].norm() < 1e-2
    assert out[num_real:].isnan().all(), "padding rows are left alone"


FEATURES = [(64, None), (None, 30.0), (100, 20.0), (1, None)]  # window, soft-cap, both; a window of one token
HEADS = [(8, 2, 128), (6, 2, 96), (4, 4, 80)]  # Phi-3-mini's 96 and 80 are padded to 128


@pytest.mark.parametrize("window,softcap", FEATURES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", HEADS)
def test_prefill_chunks_and_decodes_after_cached_context(window, softcap, num_heads, num_kv_heads, head_dim):
    query_lens, seq_lens = [37, 20, 1, 1, 100], [37, 333, 10, 500, 164]  # fresh, chunk on context, decodes
    k_cache, v_cache, batch = windowed_case(query_lens, seq_lens, num_kv_heads, head_dim, 16, window, seed=3)
    q = torch.randn(batch.num_tokens, num_heads, head_dim, device="cuda").to(torch.bfloat16)
    scale = head_dim ** -0.5 * 4  # large scores, so that the soft-cap bites
    expected = reference.paged_attention(q.float(), k_cache.float(), v_cache.float(), batch, scale,
                                         sliding_window=window, softcap=softcap)
    out = torch.full_like(q, float("nan"))
    triton_attention.paged_attention(q, k_cache, v_cache, out, batch.query_start_loc, batch.seq_lens,
                                     batch.block_tables, batch.max_query_len, scale,
                                     sliding_window=window, softcap=softcap)
    _check(out, expected, sum(query_lens))


@pytest.mark.parametrize("window,softcap", FEATURES + [(None, None)])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", HEADS)
@pytest.mark.parametrize("num_splits", [16, 3])
def test_split_decode(window, softcap, num_heads, num_kv_heads, head_dim, num_splits):
    seq_lens = [1, 63, 65, 1000, 17, 300]
    k_cache, v_cache, batch = windowed_case([1] * 6, seq_lens, num_kv_heads, head_dim, 16, window, seed=num_splits)
    q = torch.randn(batch.num_tokens, num_heads, head_dim, device="cuda").to(torch.bfloat16)
    scale = head_dim ** -0.5 * 4
    expected = reference.paged_attention(q.float(), k_cache.float(), v_cache.float(), batch, scale,
                                         sliding_window=window, softcap=softcap)
    out = torch.full_like(q, float("nan"))
    triton_decode.paged_decode_attention(q, k_cache, v_cache, out, batch.query_start_loc, batch.seq_lens,
                                         batch.block_tables, scale, num_splits,
                                         sliding_window=window, softcap=softcap)
    _check(out, expected, 6)


@pytest.mark.parametrize("head_dim", [96, 80])
def test_rotary_and_fused_store_pad_the_head(head_dim):
    from fitserve.layers.rotary import RotaryEmbedding

    rope = RotaryEmbedding(head_dim, 10000.0, 4096, None, torch.device("cuda"))
    sizes = (8 * head_dim, 2 * head_dim, 2 * head_dim)
    qkv = torch.randn(29, sum(sizes), device="cuda").to(torch.bfloat16)
    positions = torch.randint(0, 4096, (29,), device="cuda")
    q, k, v = qkv.clone().split(sizes, dim=-1)
    ref_q, ref_k = reference.rotary(q, k, positions, rope.cos, rope.sin, head_dim)
    q, k, _ = qkv.clone().split(sizes, dim=-1)
    triton_fused.rotary_(q, k, positions, rope.cos, rope.sin, head_dim)
    torch.testing.assert_close(q, ref_q, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(k, ref_k, atol=2e-2, rtol=2e-2)

    slots = torch.randperm(64, device="cuda")[:29]
    slots[3] = -1  # PAD_SLOT
    k_cache = torch.zeros(4, 16, 2, head_dim, device="cuda", dtype=torch.bfloat16)
    v_cache, ref_k_cache, ref_v_cache = k_cache.clone(), k_cache.clone(), k_cache.clone()
    q, k, v = qkv.clone().split(sizes, dim=-1)
    triton_attention.rotary_store_kv(q, k, v, k_cache, v_cache, slots, positions, rope.cos, rope.sin)
    kv_shape = (29, 2, head_dim)
    reference.store_kv(ref_k.reshape(kv_shape), v.reshape(kv_shape), ref_k_cache, ref_v_cache, slots)
    torch.testing.assert_close(q, ref_q, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(k_cache, ref_k_cache, atol=2e-2, rtol=2e-2)
    assert torch.equal(v_cache, ref_v_cache)
