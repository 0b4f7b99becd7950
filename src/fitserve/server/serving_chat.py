"""POST /v1/chat/completions: chat template -> engine -> one JSON response or SSE chunks.

`n` > 1 runs n engine requests on the same prompt (ids `<id>-<i>`), merged into one response
whose choices carry their index; closing the response aborts them all.
"""

from __future__ import annotations

import contextlib
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
from fitserve.server.logprobs import chat_logprobs
from fitserve.server.tool_parsers import ToolParser, tool_parser
from fitserve.server.reasoning import ReasoningStream, reasoning_format, split_reasoning
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
    SSEResponse,
    ServingBase,
    collect,
    gather_or_cancel,
    merge_streams,
    sse_body,
    sse_event,
    until_disconnected,
)
from fitserve.server.request_caps import check_fan_out, check_prompt_tokens


class OpenAIServingChat(ServingBase):
    async def create(self, body: ChatCompletionRequest, raw_request: Request, request_id: str) -> Response:
        deadline = self.deadline()
        self.check_model(body.model)
        check_fan_out(self.options.caps, self.engine, 1, body.n, "messages")  # before the template runs
        plan = plan_tools(body)
        token_ids = await self.off_loop(chat_prompt_ids, self.engine.tokenizer, body.messages, plan,
                                        body.add_generation_prompt, body.chat_template_kwargs,
                                        body.continue_final_message)
        token_ids = body.truncated(token_ids, self.engine.max_model_len)
        check_prompt_tokens(self.options.caps, len(token_ids), "messages")
        params = self.sampling_params(body, len(token_ids))
        params = replace(params, structured_output=structured_output(body, plan))
        completion_id = f"chatcmpl-{request_id}"
        request_ids = [completion_id] if body.n == 1 else [f"{completion_id}-{i}" for i in range(body.n)]
        streams = self.fan_out(request_ids, token_ids, params, deadline, body.field_names())
        if body.stream:
            # The first outputs come before the 200 headers, so early engine errors are 400s.
            primed = await self.prime_all(raw_request, streams)
            events = self.stream_events(completion_id, primed, body, len(token_ids), plan)
            return SSEResponse(sse_body(events, primed, request_id), primed)
        finals = await until_disconnected(raw_request, gather_or_cancel(*map(collect, streams)))
        choices = []
        for index, final in enumerate(finals):
            reasoning, text = self.split_reasoning(final.text)
            message, finish_reason = chat_reply(text, final.finish_reason, plan, self.tool_parser)
            message = message.model_copy(update={"reasoning_content": reasoning})
            logprobs = None if final.logprobs is None else chat_logprobs(final.logprobs, self.token_texts)
            choices.append(ChatChoice(index=index, message=message, logprobs=logprobs, finish_reason=finish_reason,
                                      stop_reason=final.stop_reason))
        # The prompt is counted once however many choices share it, as OpenAI and vLLM do.
        usage = UsageInfo.of(len(token_ids), sum(final.num_output_tokens for final in finals))
        response = ChatCompletionResponse(id=completion_id, model=self.model_name, choices=choices, usage=usage)
        return JSONResponse(response.model_dump())

    @property
    def tool_parser(self) -> ToolParser:
        return tool_parser(self.options.tool_call_parser)

    def split_reasoning(self, text: str) -> tuple[str | None, str]:
        name = self.options.reasoning_parser
        return (None, text) if name is None else split_reasoning(text, reasoning_format(name))

    async def stream_events(self, completion_id: str, streams: list[AsyncIterator[RequestOutput]],
                            body: ChatCompletionRequest, num_prompt_tokens: int,
                            plan: ToolPlan | None = None) -> AsyncIterator[str]:
        created = int(time.time())
        include_usage, continuous = body.include_usage, body.continuous_usage
        num_output_tokens = [0] * len(streams)

        def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
            return sse_event(ChatCompletionChunk(id=completion_id, created=created, model=self.model_name,
                                                 choices=choices, usage=usage), include_usage)

        def running_usage(index: int) -> UsageInfo | None:
            return UsageInfo.of(num_prompt_tokens, num_output_tokens[index]) if continuous else None

        # Per choice: its text as content deltas, or, when it is a tool call, tool-call deltas.
        tool_streams = [ToolCallStream(plan or ToolPlan((), "none"), self.tool_parser) for _ in streams]
        name = self.options.reasoning_parser
        reasoning_streams = [None if name is None else ReasoningStream(reasoning_format(name)) for _ in streams]
        for index in range(len(streams)):
            role = DeltaMessage(role="assistant", content="")
            yield chunk([ChatStreamChoice(index=index, delta=role)], running_usage(index))
        async with contextlib.aclosing(merge_streams(streams)) as merged:
            async for index, out in merged:
                num_output_tokens[index] = out.num_output_tokens
                tool_stream = tool_streams[index]
                logprobs = None if out.new_logprobs is None else chat_logprobs(out.new_logprobs, self.token_texts)
                reasoning_stream, text, reasoning = reasoning_streams[index], out.new_text, ""
                if reasoning_stream is not None:
                    reasoning, text = reasoning_stream.feed(text)
                    if out.finished:
                        more_reasoning, more_text = reasoning_stream.finish()
                        reasoning, text = reasoning + more_reasoning, text + more_text
                deltas = [DeltaMessage(reasoning_content=reasoning)] if reasoning else []
                deltas += tool_stream.feed(text) + (tool_stream.finish() if out.finished else [])
                for delta in deltas[:-1]:
                    yield chunk([ChatStreamChoice(index=index, delta=delta)], running_usage(index))
                if deltas or out.finished or logprobs is not None:
                    finish_reason = "tool_calls" if out.finished and tool_stream.calls else out.finish_reason
                    choice = ChatStreamChoice(index=index, delta=deltas[-1] if deltas else DeltaMessage(),
                                              logprobs=logprobs, finish_reason=finish_reason,
                                              stop_reason=out.stop_reason)
                    yield chunk([choice], running_usage(index))
        if include_usage:
            yield chunk([], UsageInfo.of(num_prompt_tokens, sum(num_output_tokens)))
