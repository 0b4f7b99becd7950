"""The engine's logprobs (token ids and floats) in the API's two shapes.

Chat: `choices[i].logprobs.content`, one {token, logprob, bytes, top_logprobs} per output token.
Completions: four parallel lists (tokens, token_logprobs, top_logprobs, text_offset), where
each top_logprobs entry is a dict of up to `logprobs` + 1 tokens (the sampled one included, as
OpenAI documents). A token's text is that token decoded alone, special tokens kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fitserve.core.outputs import TokenLogprobs
from fitserve.server.protocol import ChatChoiceLogprobs, ChatTokenLogprob, ChatTopLogprob, CompletionLogprobs

LOGPROB_FLOOR = -9999.0  # JSON has no -inf; vLLM reports impossible tokens at this value


class TokenTexts:
    """Token id -> its text and its raw bytes, worked out once per id.

    A token may hold part of a UTF-8 character: its text is then a replacement character, and
    its bytes (OpenAI's `bytes` field, which clients join to rebuild such characters) are the
    raw bytes, from the tokenizer's `token_bytes` where it has one.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._texts[token_id] = text
        return text

    def token_bytes(self, token_id: int) -> list[int]:
        raw = self._bytes.get(token_id)
        if raw is None:
            raw = self._raw_bytes(token_id)
            self._bytes[token_id] = raw
        return raw

    def _raw_bytes(self, token_id: int) -> list[int]:
        text = self(token_id)
        if "\ufffd" in text:
            return self._tokenizer.token_bytes(token_id)
        return list(text.encode("utf-8"))


def _value(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


def _top(texts: TokenTexts, token_id: int, logprob: float) -> ChatTopLogprob:
    return ChatTopLogprob(token=texts(token_id), logprob=_value(logprob), bytes=texts.token_bytes(token_id))


def chat_logprobs(entries: Sequence[TokenLogprobs], texts: TokenTexts) -> ChatChoiceLogprobs:
    content = []
    for entry in entries:
        token = _top(texts, entry.token_id, entry.logprob)
        content.append(ChatTokenLogprob(**token.model_dump(),
                                        top_logprobs=[_top(texts, t, v) for t, v in entry.top]))
    return ChatChoiceLogprobs(content=content)


class CompletionLogprobsBuilder:
    """Accumulates one choice's completion logprobs; text offsets run on across stream chunks."""

    def __init__(self, texts: TokenTexts) -> None:
        self._texts = texts
        self._offset = 0

    def build(self, token_ids: Sequence[int], entries: Sequence[TokenLogprobs | None]) -> CompletionLogprobs:
        """entries[i] is None for a token without logprobs (the first prompt token under echo)."""
        out = CompletionLogprobs()
        for token_id, entry in zip(token_ids, entries, strict=True):
            text = self._texts(token_id)
            out.tokens.append(text)
            out.text_offset.append(self._offset)
            self._offset += len(text)
            if entry is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(_value(entry.logprob))
            top: dict[str, float] = {}
            for top_id, value in ((token_id, entry.logprob), *entry.top):
                # Keyed by text, as the API has it: tokens that decode alike (partial UTF-8
                # sequences, "\ufffd") share a key, which keeps the sampled token's value, then the likelier.
                top.setdefault(self._texts(top_id), _value(value))
            out.top_logprobs.append(top)
        return out
