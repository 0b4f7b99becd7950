"""POST /v1/chat/completions: chat template -> engine -> one JSON response or SSE chunks."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from fitserve.engine.outputs import RequestOutput
from fitserve.server.chat_tools import (
    ToolCallStream,
    ToolPlan,
    chat_prompt_ids,
    chat_reply,
    plan_tools,
    structured_output,
)
from fitserve.server.errors import sse_error_event
from fitserve.server.protocol import (
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
    def prompt_token_ids(self, body: ChatCompletionRequest, plan: ToolPlan) -> list[int]:
        token_ids = chat_prompt_ids(self.engine.tokenizer, body.messages, plan, body.add_generation_prompt,
                                    body.chat_template_kwargs)
        self.check_prompt_ids(token_ids, "messages")
        return token_ids

    async def create(self, body: ChatCompletionRequest, raw_request: Request, request_id: str) -> Response:
        deadline = self.deadline()
        self.check_model(body.model)
        plan = plan_tools(body)
        token_ids = self.prompt_token_ids(body, plan)
        max_tokens_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        params = self.sampling_params(body, len(token_ids), "messages", max_tokens_param)
        params = replace(params, structured_output=structured_output(body, plan))
        completion_id = f"chatcmpl-{request_id}"
        stream = self.engine_stream(completion_id, token_ids, params, deadline)
        if body.stream:
            # The first output comes before the 200 headers, so early engine errors are 400s.
            primed = await until_disconnected(raw_request, prime(stream))
            return SSEResponse(self.stream_events(completion_id, primed, body.include_usage, request_id, plan))
        final = await until_disconnected(raw_request, collect(stream))
        usage = UsageInfo()
        usage.add(final.num_prompt_tokens, final.num_output_tokens)
        message, finish_reason = chat_reply(final.text, final.finish_reason, plan)
        response = ChatCompletionResponse(
            id=completion_id,
            model=self.model_name,
            choices=[ChatChoice(index=0, message=message, finish_reason=finish_reason,
                                stop_reason=final.stop_reason)],
            usage=usage,
        )
        return JSONResponse(response.model_dump())

    async def stream_events(self, completion_id: str, stream: AsyncIterator[RequestOutput],
                            include_usage: bool, request_id: str | None = None,
                            plan: ToolPlan | None = None) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
            return sse_event(ChatCompletionChunk(id=completion_id, created=created, model=self.model_name,
                                                 choices=choices, usage=usage), include_usage)

        last: RequestOutput | None = None
        tool_stream = ToolCallStream(plan or ToolPlan((), "none"))  # content, or tool-call deltas
        try:
            yield chunk([ChatStreamChoice(index=0, delta=DeltaMessage(role="assistant", content=""))])
            async for out in stream:
                last = out
                deltas = tool_stream.feed(out.new_text) + (tool_stream.finish() if out.finished else [])
                for delta in deltas[:-1]:
                    yield chunk([ChatStreamChoice(index=0, delta=delta)])
                if out.finished or deltas:
                    finish_reason = "tool_calls" if out.finished and tool_stream.calls else out.finish_reason
                    yield chunk([ChatStreamChoice(index=0, delta=deltas[-1] if deltas else DeltaMessage(),
                                                  finish_reason=finish_reason, stop_reason=out.stop_reason)])
            if include_usage and last is not None:
                usage = UsageInfo()
                usage.add(last.num_prompt_tokens, last.num_output_tokens)
                yield chunk([], usage)
        except Exception as exc:  # the 200 headers are gone: report in-band, as vLLM does
            yield sse_error_event(exc, request_id)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        yield SSE_DONE
