"""Sampling and output fields through the official openai client against a live server on a
tiny real model: logit_bias, penalties, min_tokens, logprobs (chat, completions, echo), n."""

from __future__ import annotations

import openai
import pytest
from server_fixtures import FAKE_API_KEY
from tiny_model import TINY_EOS, tiny_server, write_tiny_model

USER = [{"role": "user", "content": "hi"}]
A = ord("A")  # the fallback tokenizer's token for "A"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with tiny_server(write_tiny_model(tmp_path_factory.mktemp("tiny"))) as (url, engine):
        yield url, engine


@pytest.fixture(scope="module")
def client(tiny):
    url, _ = tiny
    with openai.OpenAI(base_url=f"{url}/v1", api_key=FAKE_API_KEY, max_retries=0, timeout=30) as c:
        yield c


def chat(client, **fields):
    fields.setdefault("max_tokens", 8)
    fields.setdefault("temperature", 0)
    return client.chat.completions.create(model="tiny", messages=USER, **fields)


def test_logit_bias_100_makes_greedy_pick_that_token(client):
    resp = chat(client, logit_bias={str(A): 100})
    assert resp.choices[0].message.content == "A" * 8
    completion = client.completions.create(model="tiny", prompt="xy", max_tokens=5, temperature=0.8,
                                           logit_bias={str(A + 1): 100})
    assert completion.choices[0].text == "B" * 5


def test_logit_bias_out_of_vocabulary_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, logit_bias={"300": 5})
    assert info.value.param == "logit_bias" and "vocabulary" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, logit_bias={str(A): 150})
    assert info.value.param == "logit_bias"


def test_frequency_penalty_breaks_a_repetition(client):
    plain = chat(client, max_tokens=16, logit_bias={str(A): 10}).choices[0].message.content
    penalized = chat(client, max_tokens=16, logit_bias={str(A): 10}, frequency_penalty=2.0).choices[0].message.content
    assert plain == "A" * 16
    assert 0 < penalized.count("A") < 16, penalized  # A's lead of ~10 melts by 2 per occurrence


@pytest.mark.parametrize("field, value", [("presence_penalty", 2.5), ("frequency_penalty", -3),
                                          ("repetition_penalty", 0.0), ("min_tokens", 9)])
def test_out_of_range_output_fields_are_400s(client, field, value):
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, extra_body={field: value})
    assert info.value.param == field


def test_min_tokens_holds_back_eos(client):
    eos_first = chat(client, logit_bias={str(TINY_EOS): 100})
    assert eos_first.choices[0].finish_reason == "stop" and eos_first.usage.completion_tokens == 1
    held = chat(client, logit_bias={str(TINY_EOS): 100}, extra_body={"min_tokens": 5})
    assert held.choices[0].finish_reason == "stop" and held.usage.completion_tokens == 6


def test_chat_logprobs_shape_and_greedy_top_token(client):
    resp = chat(client, logprobs=True, top_logprobs=3, max_tokens=5)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens == 5
    # A token may be part of a UTF-8 character (its text is then U+FFFD): its raw bytes, joined,
    # rebuild the message exactly, as OpenAI's `bytes` field promises.
    rebuilt = bytes(b for t in content for b in t.bytes).decode("utf-8", errors="replace")
    assert rebuilt == resp.choices[0].message.content
    for token in content:
        if "\ufffd" not in token.token:
            assert token.bytes == list(token.token.encode())
        assert len(token.top_logprobs) == 3
        values = [t.logprob for t in token.top_logprobs]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        # Greedy: the sampled token is the most likely one.
        assert token.top_logprobs[0].token == token.token and token.top_logprobs[0].logprob == token.logprob
    bare = chat(client, logprobs=True, max_tokens=2).choices[0].logprobs.content
    assert [t.top_logprobs for t in bare] == [[], []]
    assert chat(client, max_tokens=2).choices[0].logprobs is None


def test_logprobs_over_the_maximum_are_400s(client):
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, logprobs=True, top_logprobs=21)
    assert info.value.param == "top_logprobs" and "20" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="a", logprobs=21)
    assert info.value.param == "logprobs"
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, top_logprobs=2)
    assert info.value.param == "top_logprobs"


def test_completion_logprobs_shape(client):
    out = client.completions.create(model="tiny", prompt="hello", max_tokens=6, temperature=0, logprobs=2)
    choice = out.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    # Legacy completions logprobs name tokens by text (vLLM's choice), so a token holding part of a
    # UTF-8 character reads U+FFFD and the join only equals the text when no token does.
    if not any("\ufffd" in t for t in lp.tokens):
        assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3 and top[token] == value  # the sampled token is always in the dict
        assert value == max(top.values())  # greedy


NON_ASCII_BANNED = {str(t): -100 for t in range(128, 300)}  # so that text maps back to token ids


def test_output_logprobs_equal_the_same_tokens_scored_by_echo(client):
    """Raw logprobs (before logit_bias) of generated tokens equal those of the tokens as a prompt."""
    prompt = [ord(c) for c in "hello"]
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=2,
                                    logit_bias=NON_ASCII_BANNED)
    lp = out.choices[0].logprobs
    generated = [ord(c) for c in out.choices[0].text]
    assert len(generated) == 6
    echoed = client.completions.create(model="tiny", prompt=prompt + generated, max_tokens=1, temperature=0,
                                       logprobs=2, echo=True)
    elp = echoed.choices[0].logprobs
    assert echoed.choices[0].text.startswith("hello" + out.choices[0].text)
    assert len(elp.tokens) == 12 and elp.token_logprobs[0] is None and elp.top_logprobs[0] is None
    assert elp.tokens[5:11] == lp.tokens
    assert elp.token_logprobs[5:11] == pytest.approx(lp.token_logprobs, abs=1e-4)
    for echo_top, out_top in zip(elp.top_logprobs[5:11], lp.top_logprobs):
        assert echo_top == pytest.approx(out_top, abs=1e-4)


def test_streamed_echo_with_logprobs_matches_the_whole_response(client):
    fields = dict(model="tiny", prompt="abc", max_tokens=4, temperature=0, logprobs=1, echo=True)
    whole = client.completions.create(**fields).choices[0]
    chunks = list(client.completions.create(stream=True, **fields))
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    tokens = [t for c in chunks for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in chunks for o in c.choices[0].logprobs.text_offset]
    assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset


def test_n_choices_with_a_seed_are_distinct_and_reproducible(client):
    fields = dict(max_tokens=12, temperature=1.0, seed=7, n=3)
    first, again = chat(client, **fields), chat(client, **fields)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) == 3
    single = chat(client, max_tokens=12, temperature=1.0, seed=7)
    assert single.choices[0].message.content == texts[0]  # choice 0 keeps the request's seed
    assert first.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt is counted once
    assert first.usage.completion_tokens == 36


def test_n_streaming_chat_matches_non_streaming(client):
    fields = dict(max_tokens=6, temperature=1.0, seed=11, n=2)
    whole = chat(client, **fields)
    stream = chat(client, stream=True, stream_options={"include_usage": True}, **fields)
    texts = {0: "", 1: ""}
    roles = set()
    chunks = list(stream)
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        if choice.delta.role:
            roles.add(choice.index)
    assert roles == {0, 1}
    assert [texts[0], texts[1]] == [c.message.content for c in whole.choices]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 12


def test_n_completions_over_several_prompts(client):
    resp = client.completions.create(model="tiny", prompt=["ab", "cd"], n=2, max_tokens=3, temperature=0)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    texts = [c.text for c in resp.choices]
    assert texts[0] == texts[1] and texts[2] == texts[3]  # greedy choices of one prompt agree
    assert resp.usage.completion_tokens == 12
    single = client.completions.create(model="tiny", prompt=["ab", "cd"], max_tokens=3, temperature=0)
    assert resp.usage.prompt_tokens == single.usage.prompt_tokens


def test_engine_is_clean_after_the_tests(tiny):
    _, engine = tiny
    engine.engine.check_invariants()
    assert engine.engine.kv_cache.num_free_blocks == engine.engine.kv_cache.pool.num_blocks
    assert engine.engine.runner.sampler.token_counts.num_tracked == 0


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_allowed_token_ids_are_the_only_tokens_sampled(client, temperature):
    """vLLM's allowed_token_ids; with logprobs, the reported logprobs stay the model's raw ones."""
    allowed = [ord("x"), ord("y"), ord("z")]
    completion = client.completions.create(model="tiny", prompt="hello", max_tokens=12, temperature=temperature,
                                           seed=3, extra_body={"allowed_token_ids": allowed, "ignore_eos": True})
    assert len(completion.choices[0].text) == 12 and set(completion.choices[0].text) <= set("xyz")
    reply = chat(client, max_tokens=6, extra_body={"allowed_token_ids": [A]}).choices[0].message.content
    assert reply == "A" * 6


@pytest.mark.parametrize("ids", [[300], [-1]])
def test_allowed_token_ids_outside_the_vocabulary_are_a_400(client, ids):
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, extra_body={"allowed_token_ids": ids})
    assert info.value.param == "allowed_token_ids"


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(client):
    """vLLM's left truncation: usage counts the kept tokens, echo shows them, and the output is that of
    the kept tokens sent alone."""
    kept = client.completions.create(model="tiny", prompt="abcdefgh", max_tokens=4, temperature=0, echo=True,
                                     extra_body={"truncate_prompt_tokens": 3})
    assert kept.usage.prompt_tokens == 3 and kept.choices[0].text.startswith("fgh")
    alone = client.completions.create(model="tiny", prompt="fgh", max_tokens=4, temperature=0,
                                      extra_body={"add_special_tokens": False})
    assert kept.choices[0].text == "fgh" + alone.choices[0].text
    whole = chat(client, max_tokens=2)
    cut = chat(client, max_tokens=2, extra_body={"truncate_prompt_tokens": 2})
    assert cut.usage.prompt_tokens == 2 < whole.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError):
        chat(client, extra_body={"truncate_prompt_tokens": 0})
