"""POST /v1/completions: one engine request per prompt, one choice per prompt (index = its
position in `prompt`), as one JSON response or SSE chunks interleaved across prompts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from fitserve.engine.outputs import RequestOutput
from fitserve.sampling_params import SamplingParams
from fitserve.server.errors import sse_error_event
from fitserve.server.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from fitserve.server.serving_common import (
    SSE_DONE,
    SSEResponse,
    ServingBase,
    collect,
    gather_or_cancel,
    merge_streams,
    prime,
    sse_event,
    until_disconnected,
)


class OpenAIServingCompletion(ServingBase):
    def prompt_token_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            token_ids = list(self.engine.tokenizer.encode(prompt, add_special_tokens=True))
        else:
            token_ids = list(prompt)
        self.check_prompt_ids(token_ids, "prompt")
        return token_ids

    def _plan(self, body: CompletionRequest) -> list[tuple[list[int], SamplingParams]]:
        """Tokenize and size every prompt before any reaches the engine: one bad prompt fails all."""
        plan = []
        for prompt in body.prompts():
            token_ids = self.prompt_token_ids(prompt)
            plan.append((token_ids, self.sampling_params(body, len(token_ids), "prompt")))
        return plan

    async def create(self, body: CompletionRequest, raw_request: Request, request_id: str) -> Response:
        deadline = self.deadline()
        self.check_model(body.model)
        plan = self._plan(body)
        completion_id = f"cmpl-{request_id}"
        streams = [self.engine_stream(f"{completion_id}-{i}", ids, params, deadline)
                   for i, (ids, params) in enumerate(plan)]
        if body.stream:
            try:
                primed = await until_disconnected(raw_request, gather_or_cancel(*map(prime, streams)))
            except BaseException:
                await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
                raise
            return SSEResponse(self.stream_events(completion_id, primed, body.include_usage, request_id))
        finals = await until_disconnected(raw_request, gather_or_cancel(*map(collect, streams)))
        usage = UsageInfo()
        choices = []
        for index, final in enumerate(finals):
            usage.add(final.num_prompt_tokens, final.num_output_tokens)
            choices.append(CompletionChoice(index=index, text=final.text, finish_reason=final.finish_reason,
                                            stop_reason=final.stop_reason))
        response = CompletionResponse(id=completion_id, model=self.model_name, choices=choices, usage=usage)
        return JSONResponse(response.model_dump())

    async def stream_events(self, completion_id: str, streams: list[AsyncIterator[RequestOutput]],
                            include_usage: bool, request_id: str | None = None) -> AsyncIterator[str]:
        created = int(time.time())
        last_by_index: dict[int, RequestOutput] = {}
        merged = merge_streams(streams)
        try:
            async for index, out in merged:
                last_by_index[index] = out
                if not (out.new_text or out.finished):
                    continue
                choice = CompletionChoice(index=index, text=out.new_text, finish_reason=out.finish_reason,
                                          stop_reason=out.stop_reason)
                chunk = CompletionChunk(id=completion_id, created=created, model=self.model_name, choices=[choice])
                yield sse_event(chunk, include_usage)
            if include_usage:
                usage = UsageInfo()
                for out in last_by_index.values():
                    usage.add(out.num_prompt_tokens, out.num_output_tokens)
                chunk = CompletionChunk(id=completion_id, created=created, model=self.model_name, choices=[],
                                        usage=usage)
                yield sse_event(chunk, include_usage)
        except Exception as exc:  # the 200 headers are gone: report in-band, as vLLM does
            yield sse_error_event(exc, request_id)
        finally:
            await merged.aclose()
        yield SSE_DONE
