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


@pytest.mark.parametrize("num_seqs,num_splits", [(1, 16), (3, 5), (7, 2)])
def test_split_decode_matches_reference(num_seqs, num_splits):
    seq_lens = [1, 64, 65, 1000, 17, 300, 2][:num_seqs]
    k_cache, v_cache, new_k, new_v, batch = random_case(
        [1] * num_seqs, seq_lens, 8, 128, 16, num_pad_rows=2, dtype=torch.bfloat16, seed=num_splits)
    triton_attention.store_kv(new_k, new_v, k_cache, v_cache, batch.slot_mapping)
    q = torch.randn(batch.num_tokens, 32, 128, device="cuda").to(torch.bfloat16)
    expected = reference.paged_attention(q.float(), k_cache.float(), v_cache.float(), batch, 128 ** -0.5)
    out = torch.full_like(q, float("nan"))
    triton_attention.paged_decode_attention(q, k_cache, v_cache, out, batch.query_start_loc, batch.seq_lens,
                                            batch.block_tables, 128 ** -0.5, num_splits)
    got = out[:num_seqs].float()
    assert not got.isnan().any()
    assert (got - expected[:num_seqs]).norm() / expected[:num_seqs].norm() < 1e-2
    assert out[num_seqs:].isnan().all()


def test_split_count_fills_the_chip_only_for_small_batches():
    assert triton_attention.decode_num_splits(1, 8, 132) == triton_attention.MAX_SPLITS
    assert triton_attention.decode_num_splits(256, 8, 132) == 1


@pytest.mark.parametrize("num_rows,hidden", [(1, 4096), (37, 576), (300, 4096)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(num_rows, hidden, with_residual):
    from fitserve.kernels import triton_fused

    x = torch.randn(num_rows, hidden, device="cuda").to(torch.bfloat16)
    residual = torch.randn_like(x) if with_residual else None
    weight = torch.randn(hidden, device="cuda").to(torch.bfloat16)
    ref_out, ref_sum = reference.rms_norm(x, weight, 1e-5, residual)
    out, total = triton_fused.rms_norm(x, weight, 1e-5, residual)
    assert torch.equal(total, ref_sum), "the residual sum is rounded the same way"
    torch.testing.assert_close(out, ref_out, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(32, 8, 128), (9, 3, 64)])
def test_rotary_matches_reference_on_qkv_views(num_heads, num_kv_heads, head_dim):
    from fitserve.kernels import triton_fused
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
    from fitserve.kernels import triton_fused

    gate_up = torch.randn(41, 2 * 14336, device="cuda").to(torch.bfloat16)
    torch.testing.assert_close(triton_fused.silu_and_mul(gate_up), reference.silu_and_mul(gate_up), atol=2e-2, rtol=2e-2)


def test_model_on_gpu_matches_cpu_reference_path():
    """The whole model through the Triton kernels agrees with the pure-torch path in float32."""
    from fitserve.config import ArchConfig
    from fitserve.models.llama import LlamaForCausalLM
    from paged_helpers import PagedDriver

    arch = ArchConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)
    torch.manual_seed(0)
    cpu_model = LlamaForCausalLM(arch, torch.float32, torch.device("cpu"))
    for p in cpu_model.parameters():
        p.data.normal_(0, 0.05)
    gpu_model = LlamaForCausalLM(arch, torch.float32, torch.device("cuda"))
    gpu_model.load_state_dict(cpu_model.state_dict())
    chunks = [("a", list(range(1, 40))), ("b", list(range(50, 57)))]
    cpu_driver = PagedDriver(cpu_model, num_blocks=16, block_size=16)
    gpu_driver = PagedDriver(gpu_model, num_blocks=16, block_size=16, device="cuda")
    for step in (chunks, [("a", [5]), ("b", list(range(60, 90)))], [("a", [6]), ("b", [7])]):  # prefill, mixed, decode
        cpu_logits = cpu_driver.step(step)
        gpu_logits = gpu_driver.step(step)
        torch.testing.assert_close(gpu_logits.cpu(), cpu_logits, atol=2e-3, rtol=2e-3)


def test_cuda_graph_decode_gives_the_eager_tokens():
    """The same requests through the engine with decode graphs and without: identical greedy tokens."""
    from fitserve.config import ArchConfig
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
    triton_attention.paged_decode_attention(q, k_cache, v_cache, out, batch.query_start_loc, batch.seq_lens,
                                            batch.block_tables, 128 ** -0.5, num_splits, 1.0, 2.0)
    got = out[:num_seqs].float()
    assert not got.isnan().any()
    assert (got - expected[:num_seqs]).norm() / expected[:num_seqs].norm() < 1e-2
    assert out[num_seqs:].isnan().all()
