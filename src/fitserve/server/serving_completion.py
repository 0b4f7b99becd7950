"""POST /v1/completions: one engine request per prompt and choice (`n` per prompt, choice index
= prompt position x n + i), as one JSON response or SSE chunks interleaved across choices.

`echo` puts the prompt before the completion (its text first, and with `logprobs` its tokens
too, the first without a logprob, as OpenAI and vLLM do).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from fitserve.core.outputs import TokenLogprobs
from fitserve.engine.outputs import RequestOutput
from fitserve.sampling_params import SamplingParams
from fitserve.server.logprobs import CompletionLogprobsBuilder
from fitserve.server.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from fitserve.server.serving_common import (
    FinalOutput,
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


@dataclass(frozen=True, slots=True)
class PlannedPrompt:
    text: str  # what echo shows: the prompt string, or the token-id prompt decoded
    token_ids: list[int]
    params: SamplingParams


class OpenAIServingCompletion(ServingBase):
    def _plan(self, body: CompletionRequest, prompts: list[str | list[int]]) -> list[PlannedPrompt]:
        """Tokenize every prompt before any reaches the engine (in a worker thread: see off_loop),
        keeping a running total of prompt tokens under --max-prompt-tokens-per-request."""
        plan = []
        tokenizer = self.engine.tokenizer
        num_prompt_tokens = 0
        for prompt in prompts:
            token_ids = list(tokenizer.encode(prompt, add_special_tokens=True)) if isinstance(prompt, str) \
                else list(prompt)
            truncated = body.truncated(token_ids, self.engine.max_model_len)
            if len(truncated) < len(token_ids):  # echo shows the prompt the model saw
                token_ids, prompt = truncated, truncated
            num_prompt_tokens += len(token_ids)
            check_prompt_tokens(self.options.caps, num_prompt_tokens, "prompt")
            text = "" if not body.echo else prompt if isinstance(prompt, str) else \
                tokenizer.decode(token_ids, skip_special_tokens=body.skip_special_tokens)
            plan.append(PlannedPrompt(text, token_ids, self.sampling_params(body, len(token_ids))))
        return plan

    async def create(self, body: CompletionRequest, raw_request: Request, request_id: str) -> Response:
        deadline = self.deadline()
        self.check_model(body.model)
        prompts = body.prompts()
        # Counted before anything is tokenized: the engine requests, then the token-id prompts' tokens.
        check_fan_out(self.options.caps, self.engine, len(prompts), body.n, "prompt")
        check_prompt_tokens(self.options.caps, sum(len(p) for p in prompts if not isinstance(p, str)), "prompt")
        plan = await self.off_loop(self._plan, body, prompts)
        completion_id = f"cmpl-{request_id}"
        n = body.n
        field_names = body.field_names()
        streams = [stream for p, prompt in enumerate(plan) for stream in self.fan_out(
            [f"{completion_id}-{p * n + i}" for i in range(n)], prompt.token_ids, prompt.params, deadline,
            field_names)]
        if body.stream:
            primed = await self.prime_all(raw_request, streams)
            events = self.stream_events(completion_id, primed, body, plan)
            return SSEResponse(sse_body(events, primed, request_id), primed)
        finals = await until_disconnected(raw_request, gather_or_cancel(*map(collect, streams)))
        choices = [self._choice(index, body, plan[index // n], final) for index, final in enumerate(finals)]
        # Each prompt is counted once however many choices share it, as OpenAI and vLLM do.
        usage = UsageInfo.of(sum(len(p.token_ids) for p in plan), sum(f.num_output_tokens for f in finals))
        response = CompletionResponse(id=completion_id, model=self.model_name, choices=choices, usage=usage)
        return JSONResponse(response.model_dump())

    def _choice(self, index: int, body: CompletionRequest, prompt: PlannedPrompt,
                final: FinalOutput) -> CompletionChoice:
        logprobs = None
        if body.logprobs is not None:
            ids, entries = self._logprob_tokens(body, prompt, final.token_ids, final.logprobs, final.prompt_logprobs)
            logprobs = CompletionLogprobsBuilder(self.token_texts).build(ids, entries)
        return CompletionChoice(index=index, text=prompt.text + final.text, logprobs=logprobs,
                                finish_reason=final.finish_reason, stop_reason=final.stop_reason)

    @staticmethod
    def _logprob_tokens(body: CompletionRequest, prompt: PlannedPrompt | None, token_ids: Sequence[int],
                        logprobs: Sequence[TokenLogprobs] | None,
                        prompt_logprobs: Sequence[TokenLogprobs | None] | None,
                        ) -> tuple[list[int], list[TokenLogprobs | None]]:
        """The tokens to report (the prompt's first under echo) and their logprobs."""
        ids: list[int] = list(token_ids)
        entries: list[TokenLogprobs | None] = list(logprobs) if logprobs is not None else [None] * len(ids)
        if body.echo and prompt is not None:
            prompt_entries = list(prompt_logprobs) if prompt_logprobs is not None else [None] * len(prompt.token_ids)
            ids = prompt.token_ids + ids
            entries = prompt_entries + entries
        return ids, entries

    async def stream_events(self, completion_id: str, streams: list[AsyncIterator[RequestOutput]],
                            body: CompletionRequest, plan: list[PlannedPrompt]) -> AsyncIterator[str]:
        created = int(time.time())
        include_usage, n = body.include_usage, body.n
        num_output_tokens = [0] * len(streams)
        started = [False] * len(streams)
        builders = [CompletionLogprobsBuilder(self.token_texts) for _ in streams]

        def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
            return sse_event(CompletionChunk(id=completion_id, created=created, model=self.model_name,
                                             choices=choices, usage=usage), include_usage)

        async with contextlib.aclosing(merge_streams(streams)) as merged:
            async for index, out in merged:
                prompt = plan[index // n]
                num_output_tokens[index] = out.num_output_tokens
                first, started[index] = not started[index], True
                text = prompt.text + out.new_text if first else out.new_text
                logprobs = self._stream_logprobs(body, builders[index], prompt if first else None, out)
                if text or out.finished or logprobs is not None:
                    choice = CompletionChoice(index=index, text=text, logprobs=logprobs,
                                              finish_reason=out.finish_reason, stop_reason=out.stop_reason)
                    running = UsageInfo.of(len(prompt.token_ids), out.num_output_tokens) \
                        if body.continuous_usage else None
                    yield chunk([choice], running)
        if include_usage:
            yield chunk([], UsageInfo.of(sum(len(p.token_ids) for p in plan), sum(num_output_tokens)))

    def _stream_logprobs(self, body: CompletionRequest, builder: CompletionLogprobsBuilder,
                         echoed: PlannedPrompt | None, out: RequestOutput) -> CompletionLogprobs | None:
        if body.logprobs is None:
            return None
        ids, entries = self._logprob_tokens(body, echoed, out.new_token_ids, out.new_logprobs, out.prompt_logprobs)
        return builder.build(ids, entries)
