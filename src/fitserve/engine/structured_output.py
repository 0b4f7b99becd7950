"""Structured output: a JSON Schema, regex or Lark grammar -> an llguidance grammar matcher per
request (torch-free).

llguidance compiles a schema, regex or grammar into a grammar over the model's own tokens. The engine keeps one
`RequestGrammar` per constrained request: before each step that samples for it, the matcher
gives the bitmask of tokens that can continue a valid output (carried to the runner in
`ScheduledRequest.allowed_token_bitmask`, applied in runner/grammar_mask.py); after the step
it consumes the sampled token. When the grammar is complete the request ends with "stop".

The tokenizer conversion costs about 0.2 s for a 49k vocabulary, so it happens on the first
constrained request, not at start-up.
"""

from __future__ import annotations

import threading
from typing import Any

import llguidance
import llguidance.hf

from fitserve.engine.errors import InvalidRequestError
from fitserve.structured_params import StructuredOutputParams

# One-line JSON with a space after `,` and `:`: natural text for the model, and no free
# whitespace, in which a small model can loop until max_tokens. A schema's own "x-guidance"
# options override these.
JSON_COMPILE_DEFAULTS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def json_schema_grammar(schema: str | dict[str, Any]) -> str:
    """The llguidance grammar of a JSON Schema; ValueError when the schema is not JSON."""
    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_COMPILE_DEFAULTS)


def grammar_of(params: StructuredOutputParams) -> str:
    """The llguidance grammar of a request's spec; ValueError when a schema is not JSON."""
    if params.json_schema is not None:
        return json_schema_grammar(params.json_schema)
    if params.regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(params.regex)
    assert params.lark is not None
    return llguidance.LLMatcher.grammar_from_lark(params.lark)


def grammar_error(params: StructuredOutputParams) -> str | None:
    """Why this spec cannot constrain output (None when it can). Needs no tokenizer."""
    try:
        message = llguidance.LLMatcher.validate_grammar(grammar_of(params))
    except ValueError as exc:
        return str(exc)
    return None if not message or message.startswith("WARNING") else message


def json_schema_error(schema: str | dict[str, Any]) -> str | None:
    """Why this JSON Schema cannot constrain output (None when it can). Needs no tokenizer."""
    return grammar_error(StructuredOutputParams.from_schema(schema))


class RequestGrammar:
    """One request's matcher: the allowed tokens for the next step, advanced token by token."""

    __slots__ = ("_matcher",)

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher

    def allowed_token_bitmask(self) -> bytes:
        """Little-endian int32 words (at least ceil(vocab / 32)); bit t of the whole = token t allowed."""
        return self._matcher.compute_bitmask()

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False when the grammar does not allow it."""
        return self._matcher.consume_token(token_id)

    @property
    def finished(self) -> bool:
        """The output is complete: the grammar accepts no further token (EOS aside)."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str:
        return self._matcher.get_error()


class GrammarCompiler:
    """Compiles StructuredOutputParams against the model's tokenizer (thread-safe).

    `hf_tokenizer` is a transformers fast tokenizer; `vocab_size` is the model's (its logits'
    width), which may exceed the tokenizer's: tokens past the tokenizer are never allowed.
    """

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self._hf_tokenizer = hf_tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    def _ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=list(self.eos_token_ids) or None)
            return self._tokenizer

    def compile(self, params: StructuredOutputParams) -> RequestGrammar:
        """A fresh matcher for one request; InvalidRequestError (-> 400) for a bad schema, regex or grammar."""
        try:
            grammar = grammar_of(params)
        except ValueError as exc:
            raise InvalidRequestError(f"Invalid {params.kind} in `{params.param}`: {exc}", param=params.param) from None
        matcher = llguidance.LLMatcher(self._ll_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"Invalid {params.kind} in `{params.param}`: {matcher.get_error()}",
                                      param=params.param)
        return RequestGrammar(matcher)
