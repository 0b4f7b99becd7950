"""--engine-process on CUDA (GPU only): the core process, started with spawn, builds the engine on
the GPU with CUDA graphs and async scheduling as `fitserve serve` does, reports the GPU it uses
and the memory plan, and serves the same greedy tokens as the engine in this process.
A small Llama shape (head_dim 64, float32, dummy weights): a few seconds on an H200."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from fitserve.config import CacheConfig, EngineConfig, SchedulerConfig
from fitserve.sampling_params import SamplingParams
from fitserve.startup import start_serving_engine
from fitserve.telemetry import Telemetry

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

SMALL_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 300, "hidden_size": 256, "intermediate_size": 512,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
    "eos_token_id": 299, "torch_dtype": "float32",
}


async def _greedy(engine, request_id: str) -> list[int]:
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    tokens: list[int] = []
    async for output in engine.generate(request_id, [5, 6, 7, 8], params):
        tokens.extend(output.new_token_ids)
    return tokens


def test_the_core_on_cuda_serves_the_same_greedy_tokens(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMALL_LLAMA))
    fields = dict(model=str(tmp_path), load_format="dummy", dtype="float32", device="cuda",
                  cache=CacheConfig(kv_cache_memory_bytes=64 * 2**20),
                  scheduler=SchedulerConfig(max_model_len=512, max_num_seqs=8))
    split = start_serving_engine(EngineConfig(engine_process=True, **fields), _quiet_telemetry(), max_queue_len=None)
    try:
        assert split.gpu_ids and split.startup_info is not None
        there = asyncio.run(_greedy(split, "split"))
        assert split.stats().num_steps_total > 0
    finally:
        split.shutdown()
    here_engine = start_serving_engine(EngineConfig(**fields), _quiet_telemetry(), max_queue_len=None)
    try:
        here = asyncio.run(_greedy(here_engine, "here"))
    finally:
        here_engine.shutdown()
    assert len(there) == 24 and there == here


def _quiet_telemetry() -> Telemetry:
    return Telemetry(interval_s=0, stats_interval_s=None)
