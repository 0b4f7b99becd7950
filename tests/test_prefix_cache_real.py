"""Prefix caching on the embedded SmolLM2-135M-Instruct: greedy outputs equal those without it,
and /metrics counts the hits through a live server."""

from __future__ import annotations

import httpx
import openai
import pytest
from server_fixtures import FAKE_API_KEY, built_engine_server

from fitserve.config import CacheConfig, EngineConfig, SchedulerConfig
from fitserve.llm import LLM
from fitserve.startup import build_engine
from fitserve.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

SYSTEM = ("You are a careful assistant for a small bakery. Answer in one short sentence, politely, and never "
          "invent prices. The bakery opens at seven, closes at six, sells bread, cakes and coffee, and is shut "
          "on Mondays. ")
QUESTIONS = ["When do you open?", "Do you sell coffee?", "Are you open on Monday?", "What can I buy?"]
NUM_KV_BLOCKS = 256  # 4096 tokens: plenty, and small beside the default 1 GiB


def generate(enable_prefix_caching: bool) -> tuple[list[tuple[int, ...]], LLM]:
    # float32: in bf16 a different batch shape may flip a near-tied greedy choice, which would
    # say nothing about the cache (tests/test_real_model_serving.py measured it).
    llm = LLM(dtype="float32", num_gpu_blocks_override=NUM_KV_BLOCKS, enable_prefix_caching=enable_prefix_caching,
              max_num_batched_tokens=64, max_model_len=1024)  # small chunks: cached blocks are reused mid-prefill too
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [SYSTEM + q for q in QUESTIONS]
    together = llm.generate(prompts, params)  # in one batch: later requests reuse blocks scheduled earlier
    one_by_one = [llm.generate([p], params)[0] for p in prompts]  # from blocks freed by finished requests
    llm.engine.check_invariants()
    return [o.token_ids for o in together + one_by_one], llm


def test_greedy_outputs_with_prefix_caching_equal_outputs_without():
    cached, llm = generate(enable_prefix_caching=True)
    uncached, plain = generate(enable_prefix_caching=False)
    assert cached == uncached
    snapshot = llm.engine.metrics.snapshot().prefix_cache
    prompt_len = len(llm.tokenizer.encode(SYSTEM))
    assert snapshot.hits >= (2 * len(QUESTIONS) - 1) * (prompt_len // 16 - 1) * 16, "the system prompt is reused"
    assert plain.engine.metrics.snapshot().prefix_cache.queries == 0
    assert llm.engine.runner.kv_capacity().num_blocks == NUM_KV_BLOCKS


def test_metrics_count_prefix_cache_hits_on_a_live_server():
    built = build_engine(EngineConfig(dtype="float32", cache=CacheConfig(num_gpu_blocks_override=NUM_KV_BLOCKS),
                                      scheduler=SchedulerConfig(max_model_len=1024)),
                         progress=False)
    with built_engine_server(built) as (url, _):
        with openai.OpenAI(base_url=f"{url}/v1", api_key=FAKE_API_KEY, max_retries=0, timeout=120) as client:
            answers = [client.chat.completions.create(
                model=built.model_name, max_tokens=4, temperature=0,
                messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
            ) for q in QUESTIONS[:3]]
        text = httpx.get(url + "/metrics", timeout=10).text
    assert all(a.choices[0].message.content for a in answers)
    prompt_tokens = sum(a.usage.prompt_tokens for a in answers)
    counters = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("vllm:prefix_cache_")}
    assert counters["vllm:prefix_cache_queries_total"] == prompt_tokens
    assert counters["vllm:prefix_cache_hits_total"] >= 2 * 16 * (len(built.tokenizer.encode(SYSTEM)) // 16 - 1)
