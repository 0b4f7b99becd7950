"""The planner's activation, sampler and CUDA-graph estimates against what the code allocates.

The CPU runs the pure-torch reference path; the live-bytes tracker measures its peak the way
torch's CUDA allocator would, so the formulas are checked without a GPU. (On the GPU the
fused kernels hold less; benchmarks/startup_memory.py compares the plan with an H100.) The bf16
matmuls take torch's own path here, as on the GPU: on a CPU without bf16 units fitserve widens
several rows' bf16 matmuls to float32 (kernels/cpu_matmul.py), whose scratch no plan counts.
"""

from __future__ import annotations

import pytest
import torch
from memory_tracker import LiveBytesTracker

from fitserve.arch_config import ArchConfig
from fitserve.kernels import cpu_matmul
from fitserve.models.llama import LlamaForCausalLM
from fitserve.plan import estimates
from fitserve.runner import profiling
from fitserve.runner.cuda_graph import graph_batch_sizes

# Llama-like proportions (intermediate = 3.5 x hidden, 4 query heads per KV head), small enough for a test.
ARCH = ArchConfig(vocab_size=8192, hidden_size=512, intermediate_size=1792, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096)


@pytest.fixture(autouse=True)
def torch_bf16_matmul(monkeypatch):
    monkeypatch.setattr(cpu_matmul, "cpu_has_bf16_units", lambda: True)


@pytest.fixture(scope="module")
def model():
    model = LlamaForCausalLM(ARCH, torch.bfloat16, torch.device("cpu"))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    return model


def _tracked(fn) -> int:
    with torch.inference_mode(), LiveBytesTracker() as tracker:
        fn()
    return tracker.peak_bytes


@pytest.mark.parametrize("num_tokens", [256, 1024])
def test_forward_peak_matches_the_reference_path(model, num_tokens):
    chunks = profiling.profile_chunks(num_tokens, max_model_len=4096)
    caches = profiling.throwaway_cache(model, ARCH, chunks, torch.device("cpu"))
    measured = _tracked(lambda: profiling.run_forward(model, chunks, torch.device("cpu")))
    estimated = estimates.forward_peak_bytes(ARCH, num_tokens, act_bytes=2, fused_kernels=False)
    assert measured == pytest.approx(estimated, rel=0.05)
    del caches


@pytest.mark.parametrize("num_rows", [16, 64, 100, 200])  # one pass, a full one, a short second, three
def test_sampler_peak_bytes_per_logit(model, num_rows):
    hidden = torch.randn(num_rows, ARCH.hidden_size, dtype=torch.bfloat16)
    measured = _tracked(lambda: profiling.run_sampling(model, hidden, num_rows, torch.device("cpu")))
    estimated = estimates.sampler_peak_bytes(ARCH, num_rows, act_bytes=2, on_gpu=False)
    assert measured == pytest.approx(estimated, rel=0.03)


def test_sampler_constants_match_the_runner():
    from fitserve.runner import logits_processors, sampler

    assert estimates.SAMPLER_ROWS_PER_PASS == sampler.ROWS_PER_PASS
    assert estimates.PENALTY_SLAB_FIRST_ROWS == logits_processors.INITIAL_SLAB_ROWS


def test_sampler_passes_bound_its_peak():
    """Past one pass the peak grows by the held bytes and the slab only: 256 rows of a 128K
    vocabulary take well under half of what one pass over all of them would."""
    arch = ArchConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192)
    one_pass = 256 * arch.vocab_size * (estimates.SAMPLER_HELD_BYTES_PER_LOGIT
                                        + estimates.PENALTY_SLAB_BYTES_PER_LOGIT
                                        + estimates.SAMPLER_PASS_BYTES_PER_LOGIT
                                        + estimates.CUDA_SORT_SCRATCH_BYTES_PER_LOGIT)
    assert estimates.sampler_peak_bytes(arch, 256, act_bytes=2) < 0.45 * one_pass


def test_profile_chunks_cover_the_budget_within_the_context():
    chunks = profiling.profile_chunks(5000, max_model_len=2048)
    assert [c.num_tokens for c in chunks] == [2048, 2048, 904]
    blocks = [b for c in chunks for b in c.block_table]
    assert len(blocks) == len(set(blocks)) == sum(-(-c.num_tokens // 16) for c in chunks)


@pytest.mark.parametrize("max_num_seqs", [1, 3, 8, 100, 256, 512])
def test_graph_batch_sizes_match_the_runner(max_num_seqs):
    assert estimates.graph_batch_sizes(max_num_seqs) == graph_batch_sizes(max_num_seqs)


def test_graph_pool_counts_each_captured_hidden_buffer():
    sizes = estimates.graph_batch_sizes(256)
    kept = sum(sizes) * ARCH.hidden_size * 2
    pool = estimates.cuda_graph_pool_bytes(ARCH, 256, act_bytes=2)
    transient = estimates.forward_peak_bytes(ARCH, 256, 2)
    drivers = len(sizes) * estimates.GRAPH_DRIVER_BYTES_PER_CAPTURE
    assert pool == kept + transient + drivers
