"""Triton kernels against the pure-torch reference on random inputs of awkward sizes (GPU only)."""

from __future__ import annotations

import random

import pytest
import torch

from fitserve.forward_batch import PAD_SLOT
from fitserve.kernels import reference
from paged_helpers import engine_greedy_tokens, make_batch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from fitserve.kernels import triton_attention, triton_decode, triton_fused  # noqa: E402  (triton comes with CUDA torch)


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


@pytest.mark.parametrize("num_seqs,num_splits,head_dim,tile", [(1, 16, 128, None), (3, 5, 128, None),
                                                                (7, 2, 128, None), (7, 3, 256, None),
                                                                (3, 2, 256, 64), (5, 4, 256, 16)])
def test_split_decode_matches_reference(num_seqs, num_splits, head_dim, tile):
    seq_lens = [1, 64, 65, 1000, 17, 300, 2][:num_seqs]
    k_cache, v_cache, new_k, new_v, batch = random_case(
        [1] * num_seqs, seq_lens, 8, head_dim, 16, num_pad_rows=2, dtype=torch.bfloat16, seed=num_splits)
    triton_attention.store_kv(new_k, new_v, k_cache, v_cache, batch.slot_mapping)
    q = torch.randn(batch.num_tokens, 32, head_dim, device="cuda").to(torch.bfloat16)
    expected = reference.paged_attention(q.float(), k_cache.float(), v_cache.float(), batch, head_dim ** -0.5)
    out = torch.full_like(q, float("nan"))
    triton_decode.paged_decode_attention(q, k_cache, v_cache, out, batch.query_start_loc, batch.seq_lens,
                                         batch.block_tables, head_dim ** -0.5, num_splits, tile=tile)
    got = out[:num_seqs].float()
    assert not got.isnan().any()
    assert (got - expected[:num_seqs]).norm() / expected[:num_seqs].norm() < 1e-2
    assert out[num_seqs:].isnan().all()


def test_decode_tile_keeps_the_shared_memory_of_head_dim_128():
    assert [triton_decode.decode_tile(d) for d in (64, 128, 256, 512)] == [64, 64, 32, 16]


def test_split_count_fills_the_chip_only_for_small_batches():
    assert triton_decode.decode_num_splits(1, 8, 132) == triton_decode.MAX_SPLITS
    assert triton_decode.decode_num_splits(256, 8, 132) == 1
    assert triton_decode.decode_num_splits(20, 8, 132) == 4  # W1/W6's batch (decode_attention_bench.py)


@pytest.mark.parametrize("num_rows,hidden", [(1, 4096), (37, 576), (300, 4096), (7, 3072), (7, 3840)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(num_rows, hidden, with_residual):
    x = torch.randn(num_rows, hidden, device="cuda").to(torch.bfloat16)
    residual = torch.randn_like(x) if with_residual else None
    weight = torch.randn(hidden, device="cuda").to(torch.bfloat16)
    ref_out, ref_sum = reference.rms_norm(x, weight, 1e-5, residual)
    out, total = triton_fused.rms_norm(x, weight, 1e-5, residual)
    assert torch.equal(total, ref_sum), "the residual sum is rounded the same way"
    torch.testing.assert_close(out, ref_out, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(32, 8, 128), (9, 3, 64)])
def test_rotary_matches_reference_on_qkv_views(num_heads, num_kv_heads, head_dim):
    from fitserve.layers.rotary import RotaryEmbedding

    rope = RotaryEmbedding(head_dim, 500000.0, 4096, None, torch.device("cuda"))
    sizes = (num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim)
    qkv = torch.randn(53, sum(sizes), device="cuda").to(torch.bfloat16)
    positions = torch.randint(0, 4096, (53,), device="cuda")
    q, k, v = qkv.clone().split(sizes, dim=-1)
    ref_q, ref_k = reference.rotary(q, k, positions, rope.cos, rope.sin, head_dim)
    q, k, v_after = qkv.split(sizes, dim=-1)
    triton_fused.rotary_(q, k, positions, rope.cos, rope.sin, head_dim)
    torch.testing.assert_close(q, ref_q, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(k, ref_k, atol=2e-2, rtol=2e-2)
    assert torch.equal(v_after, v), "v is untouched"


def test_silu_and_mul_matches_reference():
    gate_up = torch.randn(41, 2 * 14336, device="cuda").to(torch.bfloat16)
    torch.testing.assert_close(triton_fused.silu_and_mul(gate_up), reference.silu_and_mul(gate_up), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("fused", [True, False])
def test_model_on_gpu_matches_cpu_reference_path(fused):
    """The whole model through the Triton kernels agrees with the pure-torch path in float32, with the
    rotary + KV store fusion and without (decode split over the context either way)."""
    from fitserve.arch_config import ArchConfig
    from fitserve.layers.attention import PagedAttention
    from fitserve.models.llama import LlamaForCausalLM
    from paged_helpers import PagedDriver

    arch = ArchConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)
    torch.manual_seed(0)
    cpu_model = LlamaForCausalLM(arch, torch.float32, torch.device("cpu"))
    for p in cpu_model.parameters():
        p.data.normal_(0, 0.05)
    gpu_model = LlamaForCausalLM(arch, torch.float32, torch.device("cuda"), fuse_rotary_store=fused)
    gpu_model.load_state_dict(cpu_model.state_dict())
    assert all(m.fuse_rotary_store == fused for m in gpu_model.modules() if isinstance(m, PagedAttention))
    chunks = [("a", list(range(1, 40))), ("b", list(range(50, 57)))]
    cpu_driver = PagedDriver(cpu_model, num_blocks=16, block_size=16)
    gpu_driver = PagedDriver(gpu_model, num_blocks=16, block_size=16, device="cuda")
    steps = (chunks, [("a", [5]), ("b", list(range(60, 90)))], [("a", [6]), ("b", [7])], [("a", [8]), ("b", [9])])
    for step in steps:  # prefill, mixed, decode (split over the context: two requests leave the chip idle)
        cpu_logits = cpu_driver.step(step)
        gpu_logits = gpu_driver.step(step)
        torch.testing.assert_close(gpu_logits.cpu(), cpu_logits, atol=2e-3, rtol=2e-3)


def test_cuda_graph_decode_gives_the_eager_tokens():
    """The same requests through the engine with decode graphs and without: identical greedy tokens."""
    from fitserve.arch_config import ArchConfig
    from fitserve.core.interfaces import KVCapacity
    from fitserve.core.scheduler import SchedulerLimits
    from fitserve.engine.llm_engine import EngineLimits, LLMEngine
    from fitserve.models.llama import LlamaForCausalLM
    from fitserve.runner.model_runner import TorchModelRunner
    from fitserve.testing import FakeDecoder

    arch = ArchConfig(vocab_size=500, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(arch, torch.float32, torch.device("cuda"))
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    results = []
    # graphs with async scheduling and output processing (the serving default), graphs with one or
    # neither, eager with and without async scheduling
    variants = ((True, True, True), (True, True, False), (True, False, False), (False, False, True),
                (False, False, False))
    for use_graphs, async_output, async_scheduling in variants:
        runner = TorchModelRunner(model, arch, KVCapacity(64, 16), torch.float32, torch.device("cuda"), seed=0,
                                  max_num_seqs=12, max_model_len=256, use_cuda_graphs=use_graphs)
        assert (runner.decode_graphs is not None) == use_graphs
        engine = LLMEngine(runner, FakeDecoder(), EngineLimits(500, (), SchedulerLimits(12, 64, 256)),
                           async_output=async_output, async_scheduling=async_scheduling)
        tokens = engine_greedy_tokens(engine, 500)
        engine.check_invariants()
        results.append(tokens)
    assert all(tokens == results[-1] for tokens in results)


# -- fp8 (e4m3) KV cache: the store quantizes as the reference does, both attention kernels read it --------


def _fp8_bytes(cache: torch.Tensor) -> torch.Tensor:
    return cache.view(torch.uint8)


@pytest.mark.parametrize("k_scale,v_scale", [(1.0, 1.0), (0.5, 3.0)])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(32, 8, 128), (9, 3, 64)])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_fp8_cache_store_and_attention_match_reference(k_scale, v_scale, num_heads, num_kv_heads, head_dim, case):
    query_lens, seq_lens = CASES[case]
    k_cache, v_cache, new_k, new_v, batch = random_case(
        query_lens, seq_lens, num_kv_heads, head_dim, 16, num_pad_rows=3, dtype=torch.bfloat16, seed=10 + case)
    new_k[0, 0, :4] = torch.tensor([1000.0, -1000.0, 1e-6, 0.0])  # saturation and underflow
    k_cache = (k_cache.float() / k_scale).to(torch.float8_e4m3fn)
    v_cache = (v_cache.float() / v_scale).to(torch.float8_e4m3fn)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    reference.store_kv(new_k, new_v, ref_k, ref_v, batch.slot_mapping, k_scale, v_scale)
    triton_attention.store_kv(new_k, new_v, k_cache, v_cache, batch.slot_mapping, k_scale, v_scale)
    assert torch.equal(_fp8_bytes(k_cache), _fp8_bytes(ref_k)) and torch.equal(_fp8_bytes(v_cache), _fp8_bytes(ref_v))
    assert not k_cache.float().isnan().any(), "out-of-range values saturate, never NaN"

    q = torch.randn(batch.num_tokens, num_heads, head_dim, device="cuda").to(torch.bfloat16)
    scale = head_dim ** -0.5
    expected = reference.paged_attention(q.float(), k_cache, v_cache, batch, scale, k_scale, v_scale)
    out = torch.full_like(q, float("nan"))
    triton_attention.paged_attention(q, k_cache, v_cache, out, batch.query_start_loc, batch.seq_lens,
                                     batch.block_tables, batch.max_query_len, scale, k_scale, v_scale)
    num_real = sum(query_lens)
    got = out[:num_real].float()
    assert not got.isnan().any()
    assert (got - expected[:num_real]).norm() / expected[:num_real].norm() < 1e-2
    assert out[num_real:].isnan().all()


@pytest.mark.parametrize("num_seqs,num_splits", [(1, 16), (7, 3)])
def test_fp8_cache_split_decode_matches_reference(num_seqs, num_splits):
    seq_lens = [1, 64, 65, 1000, 17, 300, 2][:num_seqs]
    k_cache, v_cache, new_k, new_v, batch = random_case(
        [1] * num_seqs, seq_lens, 8, 128, 16, num_pad_rows=2, dtype=torch.bfloat16, seed=20 + num_splits)
    k_cache, v_cache = k_cache.to(torch.float8_e4m3fn), (v_cache.float() / 2.0).to(torch.float8_e4m3fn)
    triton_attention.store_kv(new_k, new_v, k_cache, v_cache, batch.slot_mapping, 1.0, 2.0)
    q = torch.randn(batch.num_tokens, 32, 128, device="cuda").to(torch.bfloat16)
    expected = reference.paged_attention(q.float(), k_cache, v_cache, batch, 128 ** -0.5, 1.0, 2.0)
    out = torch.full_like(q, float("nan"))
    triton_decode.paged_decode_attention(q, k_cache, v_cache, out, batch.query_start_loc, batch.seq_lens,
                                         batch.block_tables, 128 ** -0.5, num_splits, 1.0, 2.0)
    got = out[:num_seqs].float()
    assert not got.isnan().any()
    assert (got - expected[:num_seqs]).norm() / expected[:num_seqs].norm() < 1e-2
    assert out[num_seqs:].isnan().all()


# -- rotary + KV store in one kernel; split-context decode with padding sequences and in a CUDA graph -


def _cache_bytes(cache: torch.Tensor) -> torch.Tensor:
    return cache.view(torch.uint8) if cache.dtype == torch.float8_e4m3fn else cache


@pytest.mark.parametrize("cache_dtype,dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                               (torch.float32, torch.float32), (torch.float8_e4m3fn, torch.bfloat16)])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(32, 8, 128), (9, 3, 64), (8, 1, 64), (4, 4, 64)])
@pytest.mark.parametrize("block_size", [16, 8])
def test_rotary_store_kv_is_rotary_then_store(cache_dtype, dtype, num_heads, num_kv_heads, head_dim, block_size):
    """Same bytes as triton_fused.rotary_ then store_kv (= reference.store_kv of the rotated k), PAD_SLOT skipped."""
    from fitserve.layers.rotary import RotaryEmbedding

    query_lens, seq_lens = [37, 5, 1, 1], [37, 133, 10, 1]
    k_cache, v_cache, _, _, batch = random_case(query_lens, seq_lens, num_kv_heads, head_dim, block_size,
                                                num_pad_rows=3, dtype=dtype, seed=num_heads + block_size)
    k_scale, v_scale = (0.5, 3.0) if cache_dtype == torch.float8_e4m3fn else (1.0, 1.0)
    k_cache, v_cache = (k_cache.float() / k_scale).to(cache_dtype), (v_cache.float() / v_scale).to(cache_dtype)
    rope = RotaryEmbedding(head_dim, 500000.0, 4096, None, torch.device("cuda"))
    sizes = (num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim)
    qkv = torch.randn(batch.num_tokens, sum(sizes), device="cuda").to(dtype)
    qkv[0, sizes[0]:sizes[0] + 3] = torch.tensor([1000.0, -1000.0, 1e-6])  # fp8 saturation and underflow

    two_qkv, two_k_cache, two_v_cache = qkv.clone(), k_cache.clone(), v_cache.clone()
    q2, k2, v2 = two_qkv.split(sizes, dim=-1)
    triton_fused.rotary_(q2, k2, batch.positions, rope.cos, rope.sin, head_dim)
    kv_shape = (batch.num_tokens, num_kv_heads, head_dim)
    reference.store_kv(k2.reshape(kv_shape), v2.reshape(kv_shape), two_k_cache, two_v_cache, batch.slot_mapping,
                       k_scale, v_scale)
    q, k, v = qkv.split(sizes, dim=-1)  # views of one tensor, as the model hands them
    triton_attention.rotary_store_kv(q, k, v, k_cache, v_cache, batch.slot_mapping, batch.positions,
                                     rope.cos, rope.sin, k_scale, v_scale)
    assert torch.equal(q, q2), "q is rotated in place exactly as rotary_ does"
    assert torch.equal(_cache_bytes(k_cache), _cache_bytes(two_k_cache)), "rotated k stored as rotary_ + store_kv"
    assert torch.equal(_cache_bytes(v_cache), _cache_bytes(two_v_cache))
    assert batch.slot_mapping[-1].item() == PAD_SLOT


def with_padding_seqs(batch, num_pad_seqs: int):
    """query_start_loc, seq_lens, block_tables with num_pad_seqs trailing sequences of zero query
    tokens, as a CUDA graph pads a decode batch."""
    last = batch.query_start_loc[-1:]
    query_start = torch.cat([batch.query_start_loc, last.repeat(num_pad_seqs)])
    seq_lens = torch.cat([batch.seq_lens, torch.zeros(num_pad_seqs, dtype=torch.int32, device="cuda")])
    tables = torch.cat([batch.block_tables, torch.zeros(num_pad_seqs, batch.block_tables.shape[1],
                                                        dtype=torch.int32, device="cuda")])
    return query_start, seq_lens, tables


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(32, 8, 128), (9, 3, 64), (8, 1, 64), (4, 4, 64)])
@pytest.mark.parametrize("block_size,num_splits", [(16, 16), (8, 3), (16, 2)])
@pytest.mark.parametrize("fp8_cache", [False, True])
def test_split_decode_with_padding_sequences(num_heads, num_kv_heads, head_dim, block_size, num_splits, fp8_cache):
    seq_lens = [1, 63, 65, 1000, 17, 300, 2]
    k_cache, v_cache, _, _, batch = random_case([1] * 7, seq_lens, num_kv_heads, head_dim, block_size,
                                                num_pad_rows=3, dtype=torch.bfloat16, seed=num_splits + head_dim)
    k_scale, v_scale = (1.0, 2.0) if fp8_cache else (1.0, 1.0)
    if fp8_cache:
        k_cache, v_cache = k_cache.to(torch.float8_e4m3fn), (v_cache.float() / 2.0).to(torch.float8_e4m3fn)
    query_start, seq_lens_t, tables = with_padding_seqs(batch, 3)
    q = torch.randn(batch.num_tokens, num_heads, head_dim, device="cuda").to(torch.bfloat16)
    scale = head_dim ** -0.5
    expected = reference.paged_attention(q.float(), k_cache if fp8_cache else k_cache.float(),
                                         v_cache if fp8_cache else v_cache.float(), batch, scale, k_scale, v_scale)[:7]
    out = torch.full_like(q, float("nan"))
    triton_decode.paged_decode_attention(q, k_cache, v_cache, out, query_start, seq_lens_t, tables, scale,
                                         num_splits, k_scale, v_scale)
    got = out[:7].float()
    assert not got.isnan().any(), "a real row was not written"
    assert (got - expected).norm() / expected.norm() < 1e-2
    assert out[7:].isnan().all(), "padding rows and padding sequences write nothing"


def test_split_decode_replays_in_a_cuda_graph():
    """Captured once, replayed with new contexts: each replay splits and merges correctly."""
    k_cache, v_cache, _, _, batch = random_case([1] * 3, [1000] * 3, 8, 128, 16, num_pad_rows=0,
                                                dtype=torch.bfloat16, seed=5)  # block tables for 1000 tokens each
    q = torch.randn(3, 32, 128, device="cuda").to(torch.bfloat16)
    seq_lens = torch.tensor([900, 64, 7], dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    args = (k_cache, v_cache, out, batch.query_start_loc, seq_lens, batch.block_tables, 128 ** -0.5, 16)
    triton_decode.paged_decode_attention(q, *args)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        triton_decode.paged_decode_attention(q, *args)
    for lens in ([900, 64, 7], [1, 1000, 33], [512, 5, 64]):
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        q.normal_()
        out.fill_(float("nan"))
        graph.replay()
        step = make_batch([0] * 3, [n - 1 for n in lens], [0, 0, 0], [1] * 3, lens,
                          batch.block_tables.tolist(), device="cuda")
        expected = reference.paged_attention(q.float(), k_cache.float(), v_cache.float(), step, 128 ** -0.5)
        assert (out.float() - expected).norm() / expected.norm() < 1e-2
