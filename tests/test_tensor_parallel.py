"""Tensor parallelism on the CPU (gloo): the sharding gives the same greedy tokens as one rank,
shards are slices of the whole model, indivisible head counts are refused before anything
starts, and the plan counts one GPU's memory."""

from __future__ import annotations

import json
import multiprocessing
from dataclasses import replace

import pytest
import torch
from plan_helpers import LLAMA_3_8B, llama_8b_arch, llama_8b_inputs
from tp_helpers import GREEDY_16, PROMPTS, greedy_tokens, tiny_llm, write_tiny_llama

from fitserve.cli import main
from fitserve.arch_config import ArchConfig
from fitserve.config import CacheConfig, ConfigError, EngineConfig, SchedulerConfig
from fitserve.kernels import fp8
from fitserve.layers.parallel import TensorParallel
from fitserve.llm import LLM
from fitserve.startup import build_engine
from fitserve.models.llama import tensor_shard
from fitserve.models.loader import load_model
from fitserve.plan.planner import plan_memory
from fitserve.runner.distributed import decode_step, encode_step
from fitserve.core.outputs import ScheduledRequest, SchedulerOutput
from fitserve.sampling_params import SamplingParams
from fitserve.weights.source import resolve_model_source


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def tp1_tokens(tiny_folder):
    with tiny_llm(tiny_folder, 1) as llm:
        return greedy_tokens(llm)


def test_tp2_greedy_tokens_equal_tp1_on_a_llama_checkpoint(tiny_folder, tp1_tokens):
    """Chunked prefills, mixed prefill/decode steps and decodes of 4 prompts, 16 tokens each."""
    with tiny_llm(tiny_folder, 2) as llm:
        runner = llm.engine.runner
        assert runner.model.arch.num_attention_heads == 2 and runner.model.arch.num_key_value_heads == 1
        assert runner.kv_caches[0][0].shape[2] == 1, "each rank caches its own KV head"
        assert greedy_tokens(llm) == tp1_tokens
        assert all(len(t) == 16 for t in tp1_tokens)


def test_tp2_calibrates_per_tensor_fp8_scales_on_every_rank(tiny_folder):
    """The calibration forward has collectives: every rank runs it at start-up, none waits alone."""
    with tiny_llm(tiny_folder, 2, quantization="fp8_per_tensor") as llm:
        layers = [m for m in llm.engine.runner.model.modules() if hasattr(m, "input_scale")]
        assert layers and all(m.input_scale is not None for m in layers)
        assert all(len(t) == 16 for t in greedy_tokens(llm))


@pytest.mark.slow
def test_tp3_greedy_tokens_equal_tp1_on_the_embedded_model():
    """SmolLM2-135M has 9 heads and 3 KV heads: TP=2 cannot split it, TP=3 can (3 heads, 1 KV head,
    512 MLP columns a rank). Real weights, float32, 4 prompts x 16 tokens."""
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "1, 2, 3, 4,"]
    tokens = {}
    for size in (1, 3):
        config = EngineConfig(dtype="float32", device="cpu", tensor_parallel_size=size,
                              cache=CacheConfig(kv_cache_memory_bytes=32 << 20),
                              scheduler=SchedulerConfig(max_model_len=512, max_num_batched_tokens=64))
        with LLM(config=config) as llm:
            tokens[size] = [o.token_ids for o in llm.generate(prompts, GREEDY_16)]
    assert tokens[3] == tokens[1]


@pytest.mark.slow
def test_embedded_model_with_tp2_is_refused_before_anything_starts():
    with pytest.raises(ConfigError, match=r"--tensor-parallel-size 2 does not divide .*num_attention_heads = 9, "
                                          r"num_key_value_heads = 3.*Sizes that divide them all: 1, 3"):
        build_engine(EngineConfig(device="cpu", tensor_parallel_size=2))
    assert not multiprocessing.active_children()


def test_indivisible_head_count_is_a_config_error_before_weights_or_workers(tiny_folder):
    with pytest.raises(ConfigError, match="--tensor-parallel-size 3 does not divide") as info:
        tiny_llm(tiny_folder, 3)
    assert "num_attention_heads = 4" in str(info.value) and "Sizes that divide them all: 1, 2" in str(info.value)
    assert not multiprocessing.active_children()
    with pytest.raises(ConfigError, match="must be 1 or more"):
        EngineConfig(tensor_parallel_size=0)


def test_each_rank_loads_its_slice_of_the_checkpoint(tiny_folder):
    """Rank r's q/k/v/gate/up rows and o/down columns are the r-th slices of the whole tensors
    (safetensors read as slices), the embeddings and norms whole. No process group is needed to load."""
    source = resolve_model_source(EngineConfig(model=str(tiny_folder)))
    whole = load_model(source, torch.float32, torch.device("cpu"), progress=False)
    for rank in range(2):
        part = load_model(source, torch.float32, torch.device("cpu"), progress=False, tp=TensorParallel(rank, 2))
        a, b = whole.layers[1], part.layers[1]
        q_rows, kv_rows = 2 * 16, 16  # 2 heads and 1 KV head of head_dim 16 per rank
        q, k, v = b.self_attn.qkv_proj.weight.split([q_rows, kv_rows, kv_rows])
        whole_q, whole_k, whole_v = a.self_attn.qkv_proj.weight.split([64, 32, 32])
        assert torch.equal(q, whole_q[rank * q_rows:(rank + 1) * q_rows])
        assert torch.equal(k, whole_k[rank * kv_rows:(rank + 1) * kv_rows])
        assert torch.equal(v, whole_v[rank * kv_rows:(rank + 1) * kv_rows])
        assert torch.equal(b.self_attn.o_proj.weight, a.self_attn.o_proj.weight[:, rank * 32:(rank + 1) * 32])
        assert torch.equal(b.mlp.down_proj.weight, a.mlp.down_proj.weight[:, rank * 48:(rank + 1) * 48])
        assert torch.equal(part.embed_tokens.weight, whole.embed_tokens.weight)
        assert torch.equal(part.lm_head.weight, whole.lm_head.weight)


def test_dummy_shards_are_slices_of_the_tp1_dummy_model_and_fp8_scales_follow_them():
    source = replace(resolve_model_source(EngineConfig(model=str(LLAMA_3_8B), load_format="dummy")),
                     arch=ArchConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    whole = load_model(source, torch.bfloat16, torch.device("cpu"), progress=False)
    part = load_model(source, torch.bfloat16, torch.device("cpu"), progress=False, tp=TensorParallel(1, 2))
    assert torch.equal(part.layers[0].mlp.gate_up_proj.weight[:64], whole.layers[0].mlp.gate_up_proj.weight[64:128])
    assert torch.equal(part.layers[1].self_attn.o_proj.weight, whole.layers[1].self_attn.o_proj.weight[:, 32:])
    # fp8: the rank quantizes its own slice, so a row-parallel layer's per-row scales are the slice's
    fp8_part = load_model(source, torch.bfloat16, torch.device("cpu"), progress=False, quantization="fp8",
                          tp=TensorParallel(1, 2))
    q, scale = fp8.quantize_per_row(whole.layers[1].mlp.down_proj.weight[:, 64:])
    assert torch.equal(fp8_part.layers[1].mlp.down_proj.weight.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(fp8_part.layers[1].mlp.down_proj.weight_scale[0], scale[:, 0])


def test_tensor_shard_names_heads_and_columns():
    arch = llama_8b_arch()
    rank1 = TensorParallel(1, 2)
    def shard(name: str) -> tuple[int, int, int]:
        part = tensor_shard(name, arch, rank1)
        return part.dim, part.start, part.length

    assert shard("model.layers.3.self_attn.q_proj.weight") == (0, 2048, 2048)  # heads 16-31
    assert shard("model.layers.3.self_attn.k_proj.weight") == (0, 512, 512)  # KV heads 4-7
    assert shard("model.layers.3.self_attn.o_proj.weight") == (1, 2048, 2048)
    assert shard("model.layers.0.mlp.up_proj.weight") == (0, 7168, 7168)
    assert shard("model.layers.0.mlp.down_proj.weight") == (1, 7168, 7168)
    assert tensor_shard("model.embed_tokens.weight", arch, rank1) is None
    assert tensor_shard("model.layers.0.self_attn.q_proj.weight", arch, TensorParallel()) is None


def test_the_step_message_carries_what_workers_run():
    params = SamplingParams(temperature=0.7, seed=3)
    scheduled = (ScheduledRequest("a", (5, 6, 7), 0, (3, 4), True, params),
                 ScheduledRequest("b", (9,), 40, (1, 2, 8), False, params))
    got = decode_step(encode_step(SchedulerOutput(scheduled, frozenset({"x"}))))
    assert got.finished_request_ids == frozenset({"x"})
    for mine, theirs in zip(scheduled, got.scheduled):
        assert (theirs.token_ids, theirs.num_computed_tokens, theirs.block_table, theirs.samples) == \
            (mine.token_ids, mine.num_computed_tokens, mine.block_table, mine.samples)


def test_plan_counts_one_gpu():
    h100 = dict(device_total_bytes=81559 * 2**20, gpu_name="NVIDIA H100 80GB HBM3")
    one, two = plan_memory(llama_8b_inputs(**h100)), plan_memory(llama_8b_inputs(tensor_parallel_size=2, **h100))
    assert one.fits and two.fits and one.num_kv_blocks > 0
    assert two.weights.linear_bytes * 2 == one.weights.linear_bytes
    assert two.weights.embedding_bytes == one.weights.embedding_bytes == 2 * 128256 * 4096 * 2
    assert two.kv_block_bytes * 2 == one.kv_block_bytes == 16 * 128 * 1024
    # the sampler's logits (replicated vocabulary) set the activation peak; the graphs hold 1/2 of the MLP
    assert two.breakdown.activation_peak_bytes == one.breakdown.activation_peak_bytes
    assert two.breakdown.cuda_graph_bytes < one.breakdown.cuda_graph_bytes
    assert two.num_kv_blocks > 2 * one.num_kv_blocks, "half the weights leave more room, and each block is half"
    with pytest.raises(ConfigError, match="--tensor-parallel-size 3 does not divide"):
        plan_memory(llama_8b_inputs(tensor_parallel_size=3))


def test_fitserve_plan_tensor_parallel_size(capsys):
    assert main(["plan", "--model", str(LLAMA_3_8B), "--gpu", "h100", "-tp", "2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["per_gpu"] and plan["settings"]["tensor_parallel_size"] == 2
    assert plan["kv_block_bytes"] == 16 * 64 * 1024
    assert main(["plan", "--model", str(LLAMA_3_8B), "--gpu", "h100", "--tensor-parallel-size", "2"]) == 0
    assert "2 x NVIDIA H100" in capsys.readouterr().out
