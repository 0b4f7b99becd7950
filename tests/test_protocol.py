"""Request-model validation: fast unit tests of protocol.py, no server."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fitserve.sampling_params import InvalidSamplingParam
from fitserve.server.protocol import (
    INVALID_TEXT_ERROR,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatStreamChoice,
    CompletionRequest,
    DeltaMessage,
    unpaired_surrogate_path,
)

USER = [{"role": "user", "content": "hi"}]


def test_chat_minimal_request_defaults():
    req = ChatCompletionRequest.model_validate({"messages": USER})
    assert req.model is None and req.stream is False and req.n == 1
    assert req.requested_max_tokens() is None
    params = req.to_sampling_params(max_tokens=7)
    assert params.max_tokens == 7 and params.temperature == 1.0 and params.stop == ()


def test_chat_max_completion_tokens_wins_over_max_tokens():
    req = ChatCompletionRequest.model_validate({"messages": USER, "max_tokens": 5, "max_completion_tokens": 9})
    assert req.requested_max_tokens() == 9


def test_content_parts_are_joined():
    msg = {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    req = ChatCompletionRequest.model_validate({"messages": [msg]})
    assert req.messages[0].to_template_dict() == {"role": "user", "content": "a\nb"}


@pytest.mark.parametrize("body", [
    {},  # no messages
    {"messages": []},
    {"messages": [{"role": "wizard", "content": "x"}]},
    {"messages": [{"role": "user"}]},  # only assistant turns may omit content
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
    {"messages": USER, "tools": [{"type": "function", "function": {"name": "f g"}}]},  # a space in a name
    {"messages": USER, "tools": [{"type": "retrieval"}]},
    {"messages": USER, "n": 0},
    {"messages": USER, "top_logprobs": 2},  # top_logprobs needs logprobs: true
    {"messages": USER, "logprobs": True, "top_logprobs": -1},
    {"messages": USER, "logit_bias": {"5": "strong"}},
    {"messages": USER, "stream_options": {"include_usage": True}},  # without stream
    {"messages": USER, "response_format": {"type": "json_schema"}},  # the schema is missing
    {"messages": USER, "response_format": {"type": "yaml"}},
    {"messages": USER, "temperature": "hot"},
])
def test_chat_invalid_requests(body):
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(body)


def test_assistant_message_may_omit_content():
    req = ChatCompletionRequest.model_validate({"messages": [*USER, {"role": "assistant", "content": None}]})
    assert req.messages[1].text() == ""


def test_sampling_fields_map_one_to_one():
    req = ChatCompletionRequest.model_validate({
        "messages": USER, "temperature": 0, "top_p": 0.5, "top_k": 3, "min_p": 0.1, "seed": 4,
        "stop": "x", "stop_token_ids": [2], "ignore_eos": True, "include_stop_str_in_output": True,
        "skip_special_tokens": False,
    })
    p = req.to_sampling_params(max_tokens=3)
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (0, 0.5, 3, 0.1, 4)
    assert p.stop == ("x",) and p.stop_token_ids == (2,) and p.greedy
    assert p.ignore_eos and p.include_stop_str_in_output and not p.skip_special_tokens


@pytest.mark.parametrize("field, value", [
    ("top_p", 0), ("presence_penalty", 2.5), ("frequency_penalty", -2.1), ("repetition_penalty", 0),
    ("logit_bias", {"x": 1}), ("logit_bias", {"3": 101}), ("min_tokens", -1), ("min_tokens", 4),
])
def test_out_of_range_sampling_value_names_the_param(field, value):
    req = ChatCompletionRequest.model_validate({"messages": USER, field: value})
    with pytest.raises(InvalidSamplingParam) as info:
        req.to_sampling_params(max_tokens=3)
    assert info.value.param == field


def test_output_fields_map_to_sampling_params():
    chat = ChatCompletionRequest.model_validate({
        "messages": USER, "presence_penalty": 0.5, "frequency_penalty": -1, "repetition_penalty": 1.2,
        "logit_bias": {"7": 100, "3": -5.5}, "min_tokens": 2, "logprobs": True, "top_logprobs": 4})
    p = chat.to_sampling_params(max_tokens=3)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_tokens) == (0.5, -1, 1.2, 2)
    assert p.logit_bias == ((3, -5.5), (7, 100.0)) and (p.logprobs, p.prompt_logprobs) == (4, None)
    assert ChatCompletionRequest.model_validate({"messages": USER, "logprobs": True}).to_sampling_params(1).logprobs == 0
    echo = CompletionRequest.model_validate({"prompt": "x", "echo": True, "logprobs": 2}).to_sampling_params(1)
    assert (echo.logprobs, echo.prompt_logprobs) == (2, 2)
    plain = CompletionRequest.model_validate({"prompt": "x", "logprobs": 0}).to_sampling_params(1)
    assert (plain.logprobs, plain.prompt_logprobs) == (0, None)


def test_generation_config_defaults_fill_only_unset_fields():
    defaults = {"temperature": 0.3, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1}
    unset = ChatCompletionRequest.model_validate({"messages": USER}).to_sampling_params(4, defaults)
    assert (unset.temperature, unset.top_p, unset.top_k, unset.repetition_penalty) == (0.3, 0.8, 20, 1.1)
    explicit = ChatCompletionRequest.model_validate(
        {"messages": USER, "temperature": 1.0, "top_k": -1}).to_sampling_params(4, defaults)
    assert (explicit.temperature, explicit.top_k, explicit.top_p) == (1.0, -1, 0.8)


@pytest.mark.parametrize("prompt, expected", [
    ("hi", ["hi"]),
    (["a", "b"], ["a", "b"]),
    ([1, 2, 3], [[1, 2, 3]]),
    ([[1, 2], [3]], [[1, 2], [3]]),
])
def test_completion_prompt_forms(prompt, expected):
    assert CompletionRequest.model_validate({"prompt": prompt}).prompts() == expected


@pytest.mark.parametrize("body", [
    {},
    {"prompt": []},
    {"prompt": [[1], []]},
    {"prompt": "x", "logprobs": -1},
    {"prompt": "x", "best_of": 3},  # best_of other than n
    {"prompt": "x", "n": 2, "best_of": 1},
    {"prompt": "x", "n": 0},
    {"prompt": {"text": "x"}},
])
def test_completion_invalid_requests(body):
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate(body)


def test_completion_default_max_tokens_is_16_and_null_means_the_context():
    assert CompletionRequest.model_validate({"prompt": "x"}).requested_max_tokens() == 16
    assert CompletionRequest.model_validate({"prompt": "x", "max_tokens": None}).requested_max_tokens() is None


def test_include_usage_only_when_streaming():
    req = CompletionRequest.model_validate({"prompt": "x", "stream": True, "stream_options": {"include_usage": True}})
    assert req.include_usage and not req.continuous_usage
    continuous = CompletionRequest.model_validate({"prompt": "x", "stream": True, "stream_options": {
        "include_usage": True, "continuous_usage_stats": True}})
    assert continuous.continuous_usage
    without_usage = CompletionRequest.model_validate({"prompt": "x", "stream": True, "stream_options": {
        "continuous_usage_stats": True}})
    assert not without_usage.continuous_usage  # as in vLLM: only together with include_usage
    assert not CompletionRequest.model_validate({"prompt": "x", "stream": True}).include_usage


def test_delta_sends_only_changed_fields():
    chunk = ChatCompletionChunk(id="c", model="m", choices=[ChatStreamChoice(index=0, delta=DeltaMessage(content="x"))])
    assert chunk.model_dump()["choices"][0]["delta"] == {"content": "x"}


@pytest.mark.parametrize("field, value", [
    ("temperature", True), ("temperature", "0.5"), ("stream", "yes"), ("stream", 1), ("n", 2.0), ("n", "2"),
    ("max_tokens", True), ("seed", 1.5), ("logprobs", "yes"), ("add_generation_prompt", "false"),
    ("logit_bias", {"5": True}), ("stream_options", {"include_usage": "yes"}),
])
def test_types_are_as_strict_as_openais(field, value):
    body = {"messages": USER, field: value} if field != "stream_options" else \
        {"messages": USER, "stream": True, field: value}
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(body)


def test_a_number_field_takes_an_integer():
    req = ChatCompletionRequest.model_validate({"messages": USER, "temperature": 1, "top_p": 1, "logit_bias": {"5": 2}})
    assert req.temperature == 1.0 and req.top_p == 1.0 and req.logit_bias == {"5": 2.0}


@pytest.mark.parametrize("data, path", [
    ({"prompt": "a\ud800"}, "prompt"),
    ({"prompt": ["ok", "\udc00"]}, "prompt.1"),
    ({"messages": USER, "chat_template_kwargs": {"\ud800": 1}}, "chat_template_kwargs.'\\ud800'"),
    ({"prompt": "\N{GRINNING FACE} and text"}, None),
    ({"prompt": list(range(512))}, None),  # token ids: skipped whole
    ({"prompt": [1, 2, "\udfff"]}, "prompt.2"),  # a list with one string in it is walked
    ({"prompt": [[1, 2], ["\ud800"]]}, "prompt.1.0"),
])
def test_unpaired_surrogate_path(data, path):
    assert unpaired_surrogate_path(data) == path


def test_an_unpaired_surrogate_is_a_validation_error_naming_the_field():
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({"prompt": ["ok", "x\ud800"]})
    error = info.value.errors()[0]
    assert error["type"] == INVALID_TEXT_ERROR and error["ctx"]["param"] == "prompt.1"


@pytest.mark.parametrize("prompt", [[], [[1, 2], []], [[]]])
def test_an_empty_prompt_is_refused(prompt):
    with pytest.raises(ValidationError, match="prompt must not be empty"):
        CompletionRequest.model_validate({"prompt": prompt})


@pytest.mark.parametrize("prompt, prompts", [
    ([5, 6, 7], [[5, 6, 7]]), ([[5], [6, 7]], [[5], [6, 7]]), (["a", "b"], ["a", "b"]), ("a", ["a"])])
def test_a_prompt_gives_one_entry_per_choice(prompt, prompts):
    assert CompletionRequest.model_validate({"prompt": prompt}).prompts() == prompts


@pytest.mark.parametrize("kind", ["image_url", "input_audio", "file"])
def test_a_content_part_that_is_not_text_says_so(kind):
    with pytest.raises(ValidationError, match=f"content parts of type `{kind}` are not supported"):
        ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "see"}, {"type": kind, kind: {}}]}]})
