"""Penalties, min_tokens and logprobs through the real engine and runner on a tiny model:
preemption (recompute) and chunked prefill must not change what a request gets."""

from __future__ import annotations

from dataclasses import replace

import pytest
from tiny_model import TINY_EOS, tiny_engine_config, write_tiny_model

from fitserve.config import CacheConfig, ConfigError, SchedulerConfig
from fitserve.llm import LLM
from fitserve.startup import build_engine
from fitserve.sampling_params import SamplingParams
from fitserve.weights.source import load_generation_config, resolve_model_source

PROMPTS = [[ord(c) for c in text] for text in ("hello there", "penalties", "abcabcabc", "x" * 30, "min tokens!")]
PARAMS = [
    SamplingParams(max_tokens=24, temperature=0, repetition_penalty=1.5, logprobs=3, ignore_eos=True),
    SamplingParams(max_tokens=24, temperature=0.9, seed=3, presence_penalty=1.0, frequency_penalty=0.5,
                   ignore_eos=True),
    SamplingParams(max_tokens=24, temperature=0, logit_bias={65: 4.0}, frequency_penalty=1.0, prompt_logprobs=2,
                   logprobs=1, ignore_eos=True),
    SamplingParams(max_tokens=24, temperature=0, prompt_logprobs=0, ignore_eos=True),
    SamplingParams(max_tokens=24, temperature=0, logit_bias={TINY_EOS: 100}, min_tokens=20),
]


def run(engine):
    for i, (prompt, params) in enumerate(zip(PROMPTS, PARAMS)):
        engine.add_request(engine.make_request(f"r{i}", prompt, params))
    results = {f"r{i}": {"tokens": [], "logprobs": [], "prompt_logprobs": None} for i in range(len(PROMPTS))}
    while engine.has_unfinished:
        for out in engine.step():
            result = results[out.request_id]
            result["tokens"].extend(out.new_token_ids)
            result["logprobs"].extend(out.new_logprobs or ())
            if out.prompt_logprobs is not None:
                result["prompt_logprobs"] = out.prompt_logprobs
        engine.check_invariants()
    return results


def assert_same(a, b):
    for request_id in a:
        assert a[request_id]["tokens"] == b[request_id]["tokens"], request_id
        for x, y in zip(a[request_id]["logprobs"], b[request_id]["logprobs"]):
            assert x.token_id == y.token_id and [t for t, _ in x.top] == [t for t, _ in y.top]
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
        pa, pb = a[request_id]["prompt_logprobs"], b[request_id]["prompt_logprobs"]
        assert (pa is None) == (pb is None)
        if pa is not None:
            assert pa[0] is None and pb[0] is None and len(pa) == len(pb)
            assert [e.logprob for e in pa[1:]] == pytest.approx([e.logprob for e in pb[1:]], abs=1e-4)


def test_preemption_and_chunking_do_not_change_outputs(tmp_path):
    folder = write_tiny_model(tmp_path / "tiny")
    roomy_config = replace(tiny_engine_config(folder), scheduler=SchedulerConfig(max_model_len=64))
    roomy = build_engine(roomy_config, progress=False).engine
    reference = run(roomy)
    tight_config = replace(roomy_config, cache=CacheConfig(block_size=4, num_gpu_blocks_override=24),
                           scheduler=SchedulerConfig(max_model_len=64, max_num_seqs=16, max_num_batched_tokens=7))
    tight = build_engine(tight_config, progress=False).engine
    result = run(tight)
    assert tight.scheduler.num_preemptions_total > 0
    assert_same(reference, result)
    lagging = build_engine(roomy_config, progress=False).engine
    lagging.async_output = True  # outputs (logprobs included) handed out one step later, as on CUDA
    assert_same(reference, run(lagging))
    ahead = build_engine(tight_config, progress=False).engine
    ahead.async_scheduling = True  # each step planned before the last one's tokens are read, as on CUDA
    assert_same(reference, run(ahead))
    assert ahead.scheduler.num_preemptions_total > 0
    for engine in (roomy, tight, lagging, ahead):
        engine.step()  # the runner hears of the last finished requests with the next step
        assert engine.runner.sampler.token_counts.num_tracked == 0
        assert engine.kv_cache.num_free_blocks == engine.kv_cache.pool.num_blocks
    assert len(reference["r4"]["tokens"]) == 21 and reference["r4"]["tokens"][-1] == TINY_EOS  # min_tokens=20
    assert len(reference["r2"]["prompt_logprobs"]) == len(PROMPTS[2])
    assert all(len(e.top) == 2 for e in reference["r2"]["prompt_logprobs"][1:])
    assert len(reference["r0"]["logprobs"]) == 24 and reference["r1"]["logprobs"] == []


def test_generation_config_defaults(tmp_path, caplog):
    folder = write_tiny_model(tmp_path / "tiny", {"temperature": 0.0, "top_k": 5, "max_new_tokens": 7,
                                                   "repetition_penalty": 1.2, "do_sample": True, "eos_token_id": 5})
    source = resolve_model_source(tiny_engine_config(folder))
    assert source.eos_token_ids == (TINY_EOS, 5)
    with caplog.at_level("INFO", logger="fitserve.startup"):
        llm = LLM(config=tiny_engine_config(folder))
    assert llm.default_sampling_params == {"temperature": 0.0, "top_k": 5, "repetition_penalty": 1.2,
                                           "max_tokens": 7}
    assert "generation_config.json" in caplog.text and "--generation-config vllm" in caplog.text
    (out,) = llm.generate([[ord("a")]])
    assert len(out.token_ids) <= 7  # max_new_tokens is the default max_tokens
    ignored = LLM(config=tiny_engine_config(folder, generation_config="vllm"))
    assert ignored.default_sampling_params == {}
    elsewhere = write_tiny_model(tmp_path / "other", {"top_p": 0.5})
    assert load_generation_config(str(elsewhere), source)[0] == {"top_p": 0.5}
    with pytest.raises(ConfigError, match="generation_config.json"):
        load_generation_config(str(tmp_path), source)
