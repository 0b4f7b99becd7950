"""Incremental detokenization and stop strings, one instance per request.

Text is decoded over a small sliding window of token ids, so a multi-byte character split
across tokens is emitted only once complete, and the cost per token does not grow with the
output. The window is bounded: tokens that add no printable text (skipped special tokens, bytes
that never complete a UTF-8 character) are let go after MAX_PENDING_TOKENS, their bytes as U+FFFD;
otherwise a model emitting them would make every token decode the whole output again, and one long
request would stall the step loop of every other. While a request runs, the last `stop_holdback_chars` characters are held back,
because they may be the start of a stop string that the next token completes.
"""

from __future__ import annotations

from typing import Protocol

from fitserve.sampling_params import SamplingParams

PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first outputs, for correct leading spaces
INCOMPLETE_CHAR = "\ufffd"  # what decoding yields for a cut-off UTF-8 sequence
# A UTF-8 character is at most 4 bytes, so at most 4 tokens: this many without printable text can
# only be tokens that print nothing or bytes that are not UTF-8.
MAX_PENDING_TOKENS = 8


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, decoder: Decoder, prompt_token_ids: tuple[int, ...], params: SamplingParams) -> None:
        self._decoder = decoder
        self._params = params
        self._token_ids = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0  # window start: decoded only as context
        self._read_offset = len(self._token_ids)  # tokens before this are already in `text`
        self.text = ""  # output text so far (cut at a stop string once one is found)
        self._num_emitted_chars = 0
        self._num_output_tokens = 0

    def append(self, token_id: int) -> str | None:
        """Add one sampled token; return the stop string it completed, if any."""
        self._token_ids.append(token_id)
        self._num_output_tokens += 1
        skip = self._params.skip_special_tokens
        prefix_text = self._decoder.decode(self._token_ids[self._prefix_offset : self._read_offset], skip)
        window_text = self._decoder.decode(self._token_ids[self._prefix_offset :], skip)
        nothing_yet = len(window_text) <= len(prefix_text) or window_text.endswith(INCOMPLETE_CHAR)
        if nothing_yet and len(self._token_ids) - self._read_offset < MAX_PENDING_TOKENS:
            return None  # nothing printable yet (special token skipped, or a partial character)
        num_old_chars = len(self.text)
        self.text += window_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        return self._find_stop_string(num_old_chars)

    def _find_stop_string(self, num_old_chars: int) -> str | None:
        # As in vLLM, stop strings are looked for only once the output is past min_tokens.
        if not self._params.stop or self._num_output_tokens <= self._params.min_tokens:
            return None
        found = None  # (start, stop string) of the earliest match that ends in the new text
        for stop in self._params.stop:
            # A match that ends in the new text may start in the old text.
            start = self.text.find(stop, max(num_old_chars - len(stop) + 1, 0))
            if start != -1 and (found is None or start < found[0]):
                found = (start, stop)
        if found is None:
            return None
        start, stop = found
        end = start + len(stop) if self._params.include_stop_str_in_output else start
        self.text = self.text[:end]
        return stop

    @property
    def num_output_tokens(self) -> int:
        """Tokens appended so far."""
        return self._num_output_tokens

    def take_delta(self, finished: bool) -> str:
        """Text not yet handed out, holding back a possible stop-string prefix unless finished."""
        end = len(self.text) if finished else max(len(self.text) - self._params.stop_holdback_chars, 0)
        end = max(end, self._num_emitted_chars)
        delta = self.text[self._num_emitted_chars : end]
        self._num_emitted_chars = end
        return delta
