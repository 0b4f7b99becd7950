"""A request's chat_template_kwargs set template variables only: its own template is refused
unless --trust-request-chat-template, then rendered in a bounded child; keys that are
apply_chat_template's own arguments are 400s, never 500s."""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import httpx
import pytest
from reliability_helpers import EOS_TOKEN_ID, MODEL, assert_openai_error, byte_tokenizer, engine_server
from transformers import PreTrainedTokenizerFast

from fitserve.config import ServerConfig
from fitserve.engine.chat_template import (
    RESERVED_TEMPLATE_ARGS,
    TRUST_FLAG,
    TemplateLimits,
    render_request_template,
    template_variables,
)
from fitserve.engine.errors import InvalidRequestError

MESSAGES = [{"role": "user", "content": "hi"}]
SHORT_LIMITS = TemplateLimits(timeout_s=2.0, max_output_bytes=1000, max_memory_bytes=512 * 2**20)


def test_reserved_names_cover_apply_chat_templates_own_arguments():
    params = set(inspect.signature(PreTrainedTokenizerFast.apply_chat_template).parameters) - {"self", "kwargs"}
    assert params <= RESERVED_TEMPLATE_ARGS


@pytest.mark.parametrize("key", ["messages", "tokenize", "add_generation_prompt", "tools", "return_dict"])
def test_a_reserved_key_is_a_400_naming_it(key):
    with pytest.raises(InvalidRequestError, match=key):
        template_variables({key: True, "enable_thinking": False}, allow_template=True)


def test_a_request_template_needs_the_flag_and_variables_pass():
    with pytest.raises(InvalidRequestError, match=TRUST_FLAG):
        template_variables({"chat_template": "{{ 1 }}"}, allow_template=False)
    assert template_variables({"enable_thinking": False}, allow_template=False) == ({"enable_thinking": False}, None)
    assert template_variables({"chat_template": "x"}, allow_template=True) == ({}, "x")


def test_the_tokenizer_refuses_its_own_arguments_as_variables_and_passes_others():
    tokenizer = byte_tokenizer()
    with pytest.raises(InvalidRequestError, match="tokenize"):
        tokenizer.render_chat(MESSAGES, tokenize=True)
    assert tokenizer.render_chat(MESSAGES, enable_thinking=False) == tokenizer.render_chat(MESSAGES)


def test_a_request_template_renders_in_the_sandbox_with_the_usual_variables():
    text = byte_tokenizer().render_chat(MESSAGES, request_template="{{ eos_token }}{{ messages[0].content | tojson }}"
                                        "{% if add_generation_prompt %}>{% endif %}{{ shout }}", shout="!")
    assert text == f'<|id_{EOS_TOKEN_ID}|>"hi">!'


@pytest.mark.parametrize("template, reason", [
    ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", "within 2 s"),
    ("{% for i in range(99999) %}0123456789{% endfor %}", "1000 bytes"),
    ("{{ messages.append(1) }}", "unsafe"),
    ("{{ raise_exception('no tools here') }}", "no tools here"),
    ("{% for %}", "TemplateSyntaxError"),
])
def test_a_hostile_or_broken_request_template_is_a_400(template, reason):
    with pytest.raises(InvalidRequestError, match=reason):
        render_request_template(template, {"messages": MESSAGES}, SHORT_LIMITS)


@contextmanager
def byte_tokenizer_server(config: ServerConfig):
    with engine_server(config, tokenizer=byte_tokenizer()) as (url, _), httpx.Client(base_url=url, timeout=30) as http:
        yield http


def chat(http: httpx.Client, kwargs: dict) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2,
                                                   "chat_template_kwargs": kwargs})


def test_http_refuses_request_templates_and_reserved_keys_by_default():
    with byte_tokenizer_server(ServerConfig()) as http:
        error = assert_openai_error(chat(http, {"chat_template": "{{ 'x' }}"}), 400, "chat_template_kwargs")
        assert TRUST_FLAG in error["message"]
        assert_openai_error(chat(http, {"messages": []}), 400, "chat_template_kwargs")
        tokenize = http.post("/tokenize", json={"messages": MESSAGES, "chat_template_kwargs": {"chat_template": "x"}})
        assert_openai_error(tokenize, 400, "chat_template_kwargs")
        assert chat(http, {"enable_thinking": False}).status_code == 200


def test_http_renders_a_request_template_with_the_flag():
    with byte_tokenizer_server(ServerConfig(trust_request_chat_template=True)) as http:
        resp = http.post("/tokenize", json={"messages": MESSAGES,
                                            "chat_template_kwargs": {"chat_template": "<{{ messages[0].content }}>"}})
        assert resp.status_code == 200, resp.text
        assert resp.json()["tokens"] == list(b"<hi>")
        assert_openai_error(chat(http, {"chat_template": "{% for %}"}), 400, "chat_template_kwargs")
