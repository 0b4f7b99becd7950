"""Structured output in the engine: grammar compiled per request, masks in the plan, "stop" at the end.

The runner is the fake one (it picks the first allowed token after `last + 1`), the tokenizer
the embedded model's, so the grammar works on real tokens in milliseconds.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from fitserve.config import EngineConfig
from fitserve.core.scheduler import SchedulerLimits
from fitserve.engine.errors import InvalidRequestError
from fitserve.engine.llm_engine import EngineLimits, LLMEngine
from fitserve.engine.structured_output import GrammarCompiler, json_schema_error
from fitserve.engine.tokenizer import Tokenizer
from fitserve.sampling_params import SamplingParams
from fitserve.structured_params import ANY_JSON_OBJECT_SCHEMA, StructuredOutputParams
from fitserve.testing import FakeRunner
from fitserve.weights.source import resolve_model_source

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
    "required": ["ok", "color"],
    "additionalProperties": False,
}


class RecordingRunner(FakeRunner):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.plans = []

    def execute(self, scheduler_output):
        self.plans.append(scheduler_output)
        return super().execute(scheduler_output)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_source(resolve_model_source(EngineConfig()))


def make_engine(tokenizer: Tokenizer, with_compiler: bool = True, num_blocks: int = 64,
                async_output: bool = False, async_scheduling: bool = False) -> LLMEngine:
    vocab_size = tokenizer.vocab_size
    runner = RecordingRunner(num_blocks=num_blocks, block_size=4, vocab_size=vocab_size)
    limits = EngineLimits(vocab_size, tokenizer.eos_token_ids, SchedulerLimits(8, 32, 256))
    compiler = GrammarCompiler(tokenizer.hf, vocab_size, tokenizer.eos_token_ids) if with_compiler else None
    return LLMEngine(runner, tokenizer, limits, grammar_compiler=compiler, async_output=async_output,
                     async_scheduling=async_scheduling)


def run(engine: LLMEngine, requests: dict[str, SamplingParams], prompt: list[int]) -> dict[str, tuple[str, str]]:
    for request_id, params in requests.items():
        engine.add_request(engine.make_request(request_id, prompt, params))
    texts: dict[str, list[str]] = {r: [] for r in requests}
    finish: dict[str, str] = {}
    while engine.has_unfinished:
        for out in engine.step():
            texts[out.request_id].append(out.new_text)
            if out.finished:
                finish[out.request_id] = out.finish_reason
        engine.check_invariants()
    return {r: ("".join(texts[r]), finish[r]) for r in requests}


@pytest.mark.parametrize("async_output,async_scheduling", [(False, False), (True, False), (True, True)])
def test_constrained_output_validates_and_ends_with_stop(tokenizer, async_output, async_scheduling):
    """With async output processing the next plan is made before the last tokens are detokenized,
    and with async scheduling before they are read: its masks must still follow every sampled token
    (async scheduling waits for the last step while a grammar request runs)."""
    engine = make_engine(tokenizer, async_output=async_output, async_scheduling=async_scheduling)
    prompt = tokenizer.encode("Answer in JSON:")
    constrained = SamplingParams(max_tokens=100, structured_output=StructuredOutputParams.from_schema(SCHEMA))
    any_object = SamplingParams(max_tokens=100, structured_output=StructuredOutputParams(ANY_JSON_OBJECT_SCHEMA))
    free = SamplingParams(max_tokens=5)
    results = run(engine, {"schema": constrained, "object": any_object, "free": free}, prompt)
    text, finish = results["schema"]
    jsonschema.validate(json.loads(text), SCHEMA)
    assert finish == "stop"
    assert results["object"][1] in ("stop", "length")  # any object may be long: it only must stay valid JSON
    assert results["free"][1] == "length"
    free_ids = [t for t in range(prompt[-1] + 1, prompt[-1] + 6)]
    assert results["free"][0] == tokenizer.decode(free_ids), "an unconstrained neighbour is unaffected"
    plans = engine.runner.plans
    masked = {c.request_id for plan in plans for c in plan.scheduled if c.allowed_token_bitmask is not None}
    assert masked == {"schema", "object"}
    min_bytes = -(-tokenizer.vocab_size // 32) * 4  # llguidance may add a word; bits past the vocab are 0
    assert all(len(c.allowed_token_bitmask) >= min_bytes for plan in plans for c in plan.scheduled
               if c.allowed_token_bitmask is not None)
    assert engine.kv_cache.num_free_blocks == 64


def test_grammar_survives_preemption(tokenizer):
    """A preempted request is recomputed; its matcher has consumed exactly its output tokens."""
    engine = make_engine(tokenizer, num_blocks=12)  # 48 tokens: not enough for five requests at once
    prompt = tokenizer.encode("Answer in JSON:")
    params = SamplingParams(max_tokens=30, structured_output=StructuredOutputParams.from_schema(SCHEMA))
    results = run(engine, {f"r{i}": params for i in range(5)}, prompt)
    assert engine.scheduler.num_preemptions_total > 0
    for text, finish in results.values():
        jsonschema.validate(json.loads(text), SCHEMA)
        assert finish == "stop"


def test_invalid_schema_and_missing_compiler_are_request_errors(tokenizer):
    bad = SamplingParams(structured_output=StructuredOutputParams.from_schema({"type": "banana"}))
    with pytest.raises(InvalidRequestError) as info:
        make_engine(tokenizer).make_request("a", [1, 2], bad)
    assert info.value.param == "response_format" and "banana" in str(info.value)
    ok = SamplingParams(structured_output=StructuredOutputParams(ANY_JSON_OBJECT_SCHEMA))
    with pytest.raises(InvalidRequestError, match="not available"):
        make_engine(tokenizer, with_compiler=False).make_request("a", [1, 2], ok)


def test_schema_check_without_a_tokenizer():
    assert json_schema_error(SCHEMA) is None
    assert "properties" in json_schema_error({"type": "object", "properties": 5})
    assert json_schema_error("{not json") is not None
