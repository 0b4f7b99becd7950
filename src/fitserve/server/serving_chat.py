"""POST /v1/chat/completions: chat template -> engine -> one JSON response or SSE chunks."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from fitserve.engine.outputs import RequestOutput
from fitserve.server.errors import sse_error_event
from fitserve.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatStreamChoice,
    DeltaMessage,
    UsageInfo,
)
from fitserve.server.serving_common import (
    SSE_DONE,
    SSEResponse,
    ServingBase,
    collect,
    prime,
    sse_event,
    until_disconnected,
)


class OpenAIServingChat(ServingBase):
    def prompt_token_ids(self, body: ChatCompletionRequest) -> list[int]:
        messages = [m.to_template_dict() for m in body.messages]
        kwargs = {**(body.chat_template_kwargs or {}), "add_generation_prompt": body.add_generation_prompt}
        token_ids = list(self.engine.tokenizer.apply_chat_template(messages, **kwargs))
        self.check_prompt_ids(token_ids, "messages")
        return token_ids

    async def create(self, body: ChatCompletionRequest, raw_request: Request, request_id: str) -> Response:
        deadline = self.deadline()
        self.check_model(body.model)
        token_ids = self.prompt_token_ids(body)
        max_tokens_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        params = self.sampling_params(body, len(token_ids), "messages", max_tokens_param)
        completion_id = f"chatcmpl-{request_id}"
        stream = self.engine_stream(completion_id, token_ids, params, deadline)
        if body.stream:
            # The first output comes before the 200 headers, so early engine errors are 400s.
            primed = await until_disconnected(raw_request, prime(stream))
            return SSEResponse(self.stream_events(completion_id, primed, body.include_usage, request_id))
        final = await until_disconnected(raw_request, collect(stream))
        usage = UsageInfo()
        usage.add(final.num_prompt_tokens, final.num_output_tokens)
        response = ChatCompletionResponse(
            id=completion_id,
            model=self.model_name,
            choices=[ChatChoice(index=0, message=AssistantMessage(content=final.text),
                                finish_reason=final.finish_reason, stop_reason=final.stop_reason)],
            usage=usage,
        )
        return JSONResponse(response.model_dump())

    async def stream_events(self, completion_id: str, stream: AsyncIterator[RequestOutput],
                            include_usage: bool, request_id: str | None = None) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
            return sse_event(ChatCompletionChunk(id=completion_id, created=created, model=self.model_name,
                                                 choices=choices, usage=usage), include_usage)

        last: RequestOutput | None = None
        try:
            yield chunk([ChatStreamChoice(index=0, delta=DeltaMessage(role="assistant", content=""))])
            async for out in stream:
                last = out
                if out.new_text or out.finished:
                    delta = DeltaMessage(content=out.new_text) if out.new_text else DeltaMessage()
                    yield chunk([ChatStreamChoice(index=0, delta=delta, finish_reason=out.finish_reason,
                                                  stop_reason=out.stop_reason)])
            if include_usage and last is not None:
                usage = UsageInfo()
                usage.add(last.num_prompt_tokens, last.num_output_tokens)
                yield chunk([], usage)
        except Exception as exc:  # the 200 headers are gone: report in-band, as vLLM does
            yield sse_error_event(exc, request_id)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        yield SSE_DONE
