"""POST /v1/chat/completions: chat template -> engine -> one JSON response or SSE chunks.

`n` > 1 runs n engine requests on the same prompt (ids `<id>-<i>`), merged into one response
whose choices carry their index; closing the response aborts them all.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from fitserve.engine.outputs import RequestOutput
from fitserve.server.errors import sse_error_event
from fitserve.server.logprobs import chat_logprobs
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
    close_all,
    collect,
    gather_or_cancel,
    merge_streams,
    sse_event,
    until_disconnected,
)


def usage_of(num_prompt_tokens: int, num_completion_tokens: int) -> UsageInfo:
    usage = UsageInfo()
    usage.add(num_prompt_tokens, num_completion_tokens)
    return usage


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
        request_ids = [completion_id] if body.n == 1 else [f"{completion_id}-{i}" for i in range(body.n)]
        streams = self.fan_out(request_ids, token_ids, params, deadline)
        if body.stream:
            primed = await self.prime_all(raw_request, streams)
            return SSEResponse(self.stream_events(completion_id, primed, body, len(token_ids), request_id))
        finals = await until_disconnected(raw_request, gather_or_cancel(*map(collect, streams)))
        choices = [
            ChatChoice(index=index, message=AssistantMessage(content=final.text),
                       logprobs=None if final.logprobs is None else chat_logprobs(final.logprobs, self.token_texts),
                       finish_reason=final.finish_reason, stop_reason=final.stop_reason)
            for index, final in enumerate(finals)
        ]
        # The prompt is counted once however many choices share it, as OpenAI and vLLM do.
        usage = usage_of(len(token_ids), sum(final.num_output_tokens for final in finals))
        response = ChatCompletionResponse(id=completion_id, model=self.model_name, choices=choices, usage=usage)
        return JSONResponse(response.model_dump())

    async def stream_events(self, completion_id: str, streams: list[AsyncIterator[RequestOutput]],
                            body: ChatCompletionRequest, num_prompt_tokens: int,
                            request_id: str | None = None) -> AsyncIterator[str]:
        created = int(time.time())
        include_usage, continuous = body.include_usage, body.continuous_usage
        num_output_tokens = [0] * len(streams)

        def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
            return sse_event(ChatCompletionChunk(id=completion_id, created=created, model=self.model_name,
                                                 choices=choices, usage=usage), include_usage)

        def running_usage(index: int) -> UsageInfo | None:
            return usage_of(num_prompt_tokens, num_output_tokens[index]) if continuous else None

        merged = merge_streams(streams)
        try:
            for index in range(len(streams)):
                role = DeltaMessage(role="assistant", content="")
                yield chunk([ChatStreamChoice(index=index, delta=role)], running_usage(index))
            async for index, out in merged:
                num_output_tokens[index] = out.num_output_tokens
                logprobs = None if out.new_logprobs is None else chat_logprobs(out.new_logprobs, self.token_texts)
                if out.new_text or out.finished or logprobs is not None:
                    delta = DeltaMessage(content=out.new_text) if out.new_text else DeltaMessage()
                    choice = ChatStreamChoice(index=index, delta=delta, logprobs=logprobs,
                                              finish_reason=out.finish_reason, stop_reason=out.stop_reason)
                    yield chunk([choice], running_usage(index))
            if include_usage:
                yield chunk([], usage_of(num_prompt_tokens, sum(num_output_tokens)))
        except Exception as exc:  # the 200 headers are gone: report in-band, as vLLM does
            yield sse_error_event(exc, request_id)
        finally:
            await merged.aclose()
            await close_all(streams)  # merged closes them only if it was started
        yield SSE_DONE
