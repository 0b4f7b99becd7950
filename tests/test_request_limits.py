"""The request limits the engine checks, once, for every request (engine/request_limits.py):
each refusal is a RequestLimitError naming the limit and the engine's parameter."""

from __future__ import annotations

import pytest

from fitserve.core.scheduler import SchedulerLimits
from fitserve.engine.llm_engine import EngineLimits, LLMEngine
from fitserve.engine.request_limits import Limit, RequestLimitError, RequestLimits, check_request
from fitserve.sampling_params import SamplingParams
from fitserve.testing import FakeDecoder, FakeRunner

VOCAB_SIZE = 100
MAX_MODEL_LEN = 64
LIMITS = RequestLimits(MAX_MODEL_LEN, VOCAB_SIZE, max_logprobs=5, num_kv_tokens=48)


def refusal(prompt: list[int], params: SamplingParams, limits: RequestLimits = LIMITS) -> RequestLimitError:
    with pytest.raises(RequestLimitError) as info:
        check_request(prompt, params, limits)
    return info.value


@pytest.mark.parametrize("prompt, params, limit, param", [
    ([], SamplingParams(), Limit.EMPTY_PROMPT, "prompt"),
    ([1, VOCAB_SIZE], SamplingParams(), Limit.VOCABULARY, "prompt"),
    ([1], SamplingParams(stop_token_ids=(VOCAB_SIZE + 5,)), Limit.VOCABULARY, "stop_token_ids"),
    ([1], SamplingParams(logit_bias={VOCAB_SIZE: 1.0}), Limit.VOCABULARY, "logit_bias"),
    ([1] * MAX_MODEL_LEN, SamplingParams(max_tokens=None), Limit.CONTEXT_LENGTH, "prompt"),
    ([1] * 10, SamplingParams(max_tokens=MAX_MODEL_LEN - 9), Limit.CONTEXT_LENGTH, "max_tokens"),
    ([1] * 10, SamplingParams(max_tokens=40), Limit.KV_CACHE, "max_tokens"),
    ([1], SamplingParams(logprobs=6), Limit.MAX_LOGPROBS, "logprobs"),
    ([1], SamplingParams(prompt_logprobs=6), Limit.MAX_LOGPROBS, "prompt_logprobs"),
])
def test_each_limit_names_itself_and_the_engine_parameter(prompt, params, limit, param):
    error = refusal(prompt, params)
    assert error.limit is limit and error.param == param
    assert f"`{param}`" in str(error) or limit is Limit.EMPTY_PROMPT


def test_a_prompt_past_the_whole_kv_cache_never_fits():
    limits = RequestLimits(max_model_len=256, vocab_size=VOCAB_SIZE, max_logprobs=5, num_kv_tokens=32)
    error = refusal([1] * 32, SamplingParams(max_tokens=None), limits)
    assert error.limit is Limit.KV_CACHE and error.param == "prompt" and "could never run" in str(error)


def test_the_message_can_name_the_clients_field():
    error = refusal([1] * 10, SamplingParams(max_tokens=60))
    assert "`max_tokens` is too large: 60" in str(error)
    assert error.message_for("max_completion_tokens").startswith("`max_completion_tokens` is too large: 60")
    assert "max_tokens" not in error.message_for("max_completion_tokens")


@pytest.mark.parametrize("max_tokens, expected", [
    (None, 48 - 10),  # the room left: here the KV cache is smaller than the context
    (7, 7),
])
def test_max_tokens_resolved(max_tokens, expected):
    assert check_request([1] * 10, SamplingParams(max_tokens=max_tokens), LIMITS) == expected
    roomy = RequestLimits(MAX_MODEL_LEN, VOCAB_SIZE, max_logprobs=5)
    assert check_request([1] * 10, SamplingParams(max_tokens=None), roomy) == MAX_MODEL_LEN - 10


def make_engine(num_blocks: int, block_size: int = 4) -> LLMEngine:
    runner = FakeRunner(num_blocks=num_blocks, block_size=block_size, vocab_size=VOCAB_SIZE)
    limits = EngineLimits(VOCAB_SIZE, (VOCAB_SIZE - 1,), SchedulerLimits(4, 32, MAX_MODEL_LEN), max_logprobs=5)
    return LLMEngine(runner, FakeDecoder(), limits)


def test_make_request_checks_the_kv_caches_total_size():
    engine = make_engine(num_blocks=8)  # 32 tokens in all, under the 64-token context
    assert engine.request_limits.num_kv_tokens == 32
    with pytest.raises(RequestLimitError) as info:
        engine.make_request("r", [1] * 10, SamplingParams(max_tokens=30))
    assert info.value.limit is Limit.KV_CACHE
    request = engine.make_request("r", [1] * 10, SamplingParams(max_tokens=None))
    assert request.sampling_params.max_tokens == 32 - 10


def test_make_request_refuses_stop_token_ids_outside_the_vocabulary():
    with pytest.raises(RequestLimitError) as info:
        make_engine(num_blocks=64).make_request("r", [1], SamplingParams(stop_token_ids=(1, VOCAB_SIZE)))
    assert info.value.limit is Limit.VOCABULARY and info.value.param == "stop_token_ids"
