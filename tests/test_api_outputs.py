"""Output fields on the fake engine through the official openai client: continuous usage
stats, echo, n's request ids and seeds, and the sampling fields the engine receives."""

from __future__ import annotations

from fake_engine import FakeTokenizer

USER = [{"role": "user", "content": "hi"}]


def test_fields_reach_the_engine(client, api_server):
    resp = client.chat.completions.with_raw_response.create(
        model="fake-model", messages=USER, max_tokens=4, presence_penalty=0.5, frequency_penalty=-0.25,
        logit_bias={"65": 3.5}, logprobs=True, top_logprobs=2,
        extra_body={"repetition_penalty": 1.3, "min_tokens": 2})
    _, params = api_server.engine.requests[f"chatcmpl-{resp.headers['x-request-id']}"]
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.5, -0.25, 1.3)
    assert params.logit_bias == ((65, 3.5),) and params.min_tokens == 2 and params.logprobs == 2


def test_n_makes_one_engine_request_per_choice_with_seed_plus_i(client, api_server):
    resp = client.chat.completions.with_raw_response.create(model="fake-model", messages=USER, max_tokens=2, n=3,
                                                            seed=40)
    completion_id = f"chatcmpl-{resp.headers['x-request-id']}"
    seeds = [api_server.engine.requests[f"{completion_id}-{i}"][1].seed for i in range(3)]
    assert seeds == [40, 41, 42]
    parsed = resp.parse()
    assert [c.index for c in parsed.choices] == [0, 1, 2]
    num_prompt = len(FakeTokenizer().apply_chat_template(USER))
    assert (parsed.usage.prompt_tokens, parsed.usage.completion_tokens) == (num_prompt, 6)


def test_chat_continuous_usage_stats_on_every_chunk(client):
    chunks = list(client.chat.completions.create(
        model="fake-model", messages=USER, max_tokens=4, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    num_prompt = len(FakeTokenizer().apply_chat_template(USER))
    assert all(c.usage is not None and c.usage.prompt_tokens == num_prompt for c in chunks)
    completion_counts = [c.usage.completion_tokens for c in chunks]
    assert completion_counts[0] == 0 and completion_counts == sorted(completion_counts)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in chunks)


def test_completion_continuous_usage_stats_count_per_choice(client):
    chunks = list(client.completions.create(
        model="fake-model", prompt=["a", "bc"], max_tokens=3, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        assert chunk.usage.prompt_tokens == (2 if choice.index == 0 else 3)  # BOS + the prompt's bytes
    final = chunks[-1]
    assert final.choices == [] and (final.usage.prompt_tokens, final.usage.completion_tokens) == (5, 6)


def test_continuous_usage_needs_include_usage(client):
    chunks = list(client.completions.create(model="fake-model", prompt="a", max_tokens=2, stream=True,
                                            stream_options={"continuous_usage_stats": True}))
    assert all(c.usage is None for c in chunks)


def test_echo_puts_the_prompt_first(client):
    text = client.completions.create(model="fake-model", prompt="abc", max_tokens=3, echo=True).choices[0].text
    assert text == "abcdef"
    ids = client.completions.create(model="fake-model", prompt=[104, 105], max_tokens=2, echo=True)
    assert ids.choices[0].text == "hijk"  # a token-id prompt is decoded
    chunks = list(client.completions.create(model="fake-model", prompt="xy", max_tokens=2, echo=True, stream=True))
    assert chunks[0].choices[0].text.startswith("xy") and "".join(c.choices[0].text for c in chunks) == "xyz{"


def test_n_with_several_prompts_numbers_choices_prompt_major(client, api_server):
    resp = client.completions.create(model="fake-model", prompt=["a", "k"], max_tokens=2, n=2)
    assert [(c.index, c.text) for c in resp.choices] == [(0, "bc"), (1, "bc"), (2, "lm"), (3, "lm")]
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (4, 8)
