"""A fake EngineClient for HTTP tests: deterministic, torch-free, milliseconds per request.

The tokenizer is byte-level (token id = byte value) plus BOS/EOS; the "model" emits
`(last token + 1) % VOCAB_SIZE`, so a prompt ending in "a" continues "bcdef...". Stop strings,
stop token ids, EOS and max_tokens behave as the real engine's detokenizer does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fitserve.core.engine_stats import EngineStats
from fitserve.engine.errors import InvalidRequestError
from fitserve.engine.llm_engine import DEFAULT_MAX_LOGPROBS
from fitserve.engine.outputs import RequestOutput
from fitserve.engine.request_limits import RequestLimits, check_request
from fitserve.sampling_params import SamplingParams
from fitserve.testing import idle_engine_stats

BOS_TOKEN_ID = 256
EOS_TOKEN_ID = 257
VOCAB_SIZE = 258  # 256 byte values + BOS + EOS


class FakeTokenizer:
    vocab_size = VOCAB_SIZE
    eos_token_id = EOS_TOKEN_ID
    chat_template: str | None = None  # its chat format is apply_chat_template below, not a Jinja template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([BOS_TOKEN_ID] if add_special_tokens else []) + list(text.encode())

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [chr(i) if i < 256 else ("<bos>" if i == BOS_TOKEN_ID else "<eos>") for i in ids]

    def token_bytes(self, token_id: int) -> list[int]:
        return [token_id] if token_id < 256 else list(self.convert_ids_to_tokens([token_id])[0].encode())

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> list[int]:
        if any(m["role"] not in ("system", "user", "assistant", "tool") for m in messages):
            raise InvalidRequestError("The chat template does not support this role.", "messages")
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        if kwargs.get("continue_final_message"):
            text = text[:-1]  # the final message stays open
        if add_generation_prompt:
            text += "<assistant>"
        return self.encode(text)


class FakeEngine:
    """Implements EngineClient; records every request and every abort."""

    def __init__(self, model_name: str = "fake-model", max_model_len: int = 128,
                 token_delay_s: float = 0.0, tokenizer: Any = None) -> None:
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.max_logprobs = DEFAULT_MAX_LOGPROBS
        self.max_num_in_flight: int | None = None  # no queue bound
        self.default_sampling_params: dict[str, Any] = {}
        self.startup_info: dict[str, Any] | None = None
        self.request_limits = RequestLimits(max_model_len, VOCAB_SIZE, DEFAULT_MAX_LOGPROBS)
        self.token_delay_s = token_delay_s  # sleep per token, so tests can disconnect mid-stream
        self.healthy = True
        self.requests: dict[str, tuple[list[int], SamplingParams]] = {}
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.running: set[str] = set()
        self.num_shutdowns = 0
        self._tokenizer = tokenizer or FakeTokenizer()

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def is_healthy(self) -> bool:
        return self.healthy

    @property
    def num_requests_in_flight(self) -> int:
        return len(self.running)

    def stats(self) -> EngineStats:
        """An engine without a KV cache; only its running requests show."""
        return idle_engine_stats(num_requests_running=len(self.running), max_model_len_tokens=self.max_model_len)

    def shutdown(self) -> None:
        self.num_shutdowns += 1

    async def abort(self, request_id: str) -> None:
        if request_id in self.running:
            self.running.discard(request_id)
            self.aborted.append(request_id)

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       sampling_params: SamplingParams) -> AsyncIterator[RequestOutput]:
        # The real engine's checks (engine/request_limits.py), so the HTTP layer's mapping of them is tested.
        max_tokens = check_request(prompt_token_ids, sampling_params, self.request_limits)
        sampling_params = replace(sampling_params, max_tokens=max_tokens)
        self.requests[request_id] = (list(prompt_token_ids), sampling_params)
        self.running.add(request_id)
        try:
            async for out in self._run(request_id, list(prompt_token_ids), sampling_params):
                yield out
            self.finished.append(request_id)
            self.running.discard(request_id)
        finally:
            await self.abort(request_id)  # a no-op unless the consumer left early

    async def _run(self, request_id: str, prompt: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        max_tokens = params.max_tokens or self.max_model_len - len(prompt)
        output_ids: list[int] = []
        text, num_sent_chars = "", 0
        last = prompt[-1]
        while True:
            await asyncio.sleep(self.token_delay_s)
            last = (last + 1) % VOCAB_SIZE
            output_ids.append(last)
            finish_reason: str | None = None
            stop_reason: int | str | None = None
            if last in params.stop_token_ids or (last == EOS_TOKEN_ID and not params.ignore_eos):
                finish_reason, stop_reason = "stop", (last if last != EOS_TOKEN_ID else None)
            else:
                text += self.tokenizer.decode([last])
            end_chars = len(text) - params.stop_holdback_chars
            for stop in params.stop:
                pos = text.find(stop)
                if finish_reason is None and pos >= 0:
                    finish_reason, stop_reason = "stop", stop
                    text = text[: pos + len(stop)] if params.include_stop_str_in_output else text[:pos]
            if finish_reason is None and len(output_ids) >= max_tokens:
                finish_reason = "length"
            if finish_reason is not None:
                end_chars = len(text)
            new_text, num_sent_chars = text[num_sent_chars:max(end_chars, num_sent_chars)], max(end_chars, num_sent_chars)
            yield RequestOutput(request_id, (last,), new_text, finish_reason is not None, finish_reason,
                                stop_reason, len(prompt), len(output_ids))
            if finish_reason is not None:
                return
