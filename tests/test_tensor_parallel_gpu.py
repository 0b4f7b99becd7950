"""Tensor parallelism over NCCL (two GPUs): TP=2 == TP=1 greedy tokens with and without CUDA
graphs (all-reduces captured inside them), fp8 runs split, and a dead worker fails the engine
(the NCCL collective waiting for it is aborted) instead of hanging it."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
    pytest.skip("needs two CUDA devices", allow_module_level=True)

from tp_helpers import generate_after_killing_a_worker, greedy_tokens, tiny_llm, write_tiny_llama  # noqa: E402

from fitserve.runner.distributed import TensorParallelError  # noqa: E402

CUDA = {"device": "cuda"}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    # head_dim 64, as the Triton kernels' tests use; TP=2: 2 heads, 1 KV head, 256 MLP columns a GPU
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), hidden_size=256, intermediate_size=512)


@pytest.fixture(scope="module")
def tp1_tokens(tiny_folder):
    with tiny_llm(tiny_folder, 1, **CUDA, enforce_eager=True) as llm:
        return greedy_tokens(llm)


@pytest.mark.parametrize("enforce_eager", [True, False])
def test_tp2_greedy_tokens_equal_tp1(tiny_folder, tp1_tokens, enforce_eager):
    with tiny_llm(tiny_folder, 2, **CUDA, enforce_eager=enforce_eager) as llm:
        runner = llm.engine.runner
        assert runner.decode_graphs is None, "graphs are off with tensor parallelism (docs/parallelism.md)"
        assert runner.kv_caches[0][0].shape[2:] == (1, 64) and runner.device.type == "cuda"
        assert greedy_tokens(llm) == tp1_tokens


def test_tp2_fp8_serves(tiny_folder):
    with tiny_llm(tiny_folder, 2, **CUDA, quantization="fp8") as llm:
        tokens = greedy_tokens(llm)
    assert all(len(t) == 16 for t in tokens)


def test_a_dead_worker_fails_the_engine_on_nccl(tiny_folder):
    llm = tiny_llm(tiny_folder, 2, **CUDA)
    try:
        hung, error = generate_after_killing_a_worker(llm, 60)
        assert not hung, "the engine hung on a dead worker"
        assert isinstance(error, TensorParallelError)
    finally:
        llm.shutdown()
