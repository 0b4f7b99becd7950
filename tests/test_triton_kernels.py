"""Triton kernels against the pure-torch reference on random inputs of awkward sizes (GPU only)."""

from __future__ import annotations

import random

import pytest
import torch

from fitserve.forward_batch import PAD_SLOT
from fitserve.kernels import reference
from paged_helpers import make_batch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from fitserve.kernels import triton_attention  # noqa: E402  (imports triton, present with CUDA torch)


def random_case(query_lens, seq_lens, num_kv_heads, head_dim, block_size, num_pad_rows, dtype, seed):
    """A shuffled-block cache holding each request's earlier context, and this step's new K/V."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rng = random.Random(seed)
    num_blocks = sum(-(-s // block_size) for s in seq_lens) + 5
    free = list(range(num_blocks))
    rng.shuffle(free)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    v_cache = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    tables, slots, positions = [], [], []
    for q_len, s_len in zip(query_lens, seq_lens):
        table = [free.pop() for _ in range(-(-s_len // block_size))]
        tables.append(table)
        for p in range(s_len - q_len, s_len):
            positions.append(p)
            slots.append(table[p // block_size] * block_size + p % block_size)
    batch = make_batch([0] * sum(query_lens), positions, slots, list(query_lens), list(seq_lens), tables,
                       num_pad_rows, device="cuda")
    num_tokens = sum(query_lens) + num_pad_rows
    new_k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen, device="cuda").to(dtype)
    new_v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen, device="cuda").to(dtype)
    return k_cache, v_cache, new_k, new_v, batch


CASES = [
    # query_lens, seq_lens: fresh prefills, chunks on cached context, decodes, contexts past several tiles
    ([37, 5, 1, 1, 64], [37, 133, 10, 1, 64]),
    ([1] * 9, [1, 15, 16, 17, 63, 64, 65, 300, 1000]),
    ([200, 1, 17], [1200, 777, 17]),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(32, 8, 128), (9, 3, 64), (4, 4, 64)])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_store_and_attention_match_reference(dtype, num_heads, num_kv_heads, head_dim, block_size, case):
    query_lens, seq_lens = CASES[case]
    k_cache, v_cache, new_k, new_v, batch = random_case(
        query_lens, seq_lens, num_kv_heads, head_dim, block_size, num_pad_rows=3, dtype=dtype, seed=case)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    reference.store_kv(new_k, new_v, ref_k, ref_v, batch.slot_mapping)
    triton_attention.store_kv(new_k, new_v, k_cache, v_cache, batch.slot_mapping)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v), "store must be exact and skip PAD_SLOT"
    assert batch.slot_mapping[-1].item() == PAD_SLOT

    q = torch.randn(batch.num_tokens, num_heads, head_dim, device="cuda").to(dtype)
    scale = head_dim ** -0.5
    expected = reference.paged_attention(q.float(), k_cache.float(), v_cache.float(), batch, scale)
    out = torch.full_like(q, float("nan"))  # poisoned: every real row must be written
    triton_attention.paged_attention(q, k_cache, v_cache, out, batch.query_start_loc, batch.seq_lens,
                                     batch.block_tables, batch.max_query_len, scale)
    num_real = sum(query_lens)
    got = out[:num_real].float()
    assert not got.isnan().any(), "a real row was not written"
    rel_err = (got - expected[:num_real]).norm() / expected[:num_real].norm()
    assert rel_err < 1e-2, f"relative error {rel_err:.2e}"
    assert out[num_real:].isnan().all(), "padding rows are left alone"
