"""The synchronous engine: requests in, one step at a time, RequestOutputs out.

It owns the scheduler and the per-request detokenizers and talks to the device only
through the ModelRunner protocol, so tests drive it with a fake runner. It never
imports torch.

Async output processing (vLLM's name; on for CUDA unless --disable-async-output-proc):
a step's sampled tokens are detokenized and handed out during the *next* step, while the
GPU runs it, instead of between steps while the GPU waits. The tokens still reach the
scheduler at once (the next step's inputs need them); only text, stop strings and the
outputs lag one step. A stop string found that late ends its request, and the token the
request sampled in the step already launched is dropped.

Async scheduling (vLLM's name; on for CUDA on one GPU unless --no-async-scheduling) goes
further: step n+1 is planned and launched before step n's tokens are read, so the GPU runs
steps back to back and all host work (planning, building inputs, reading tokens,
detokenizing) hides behind a step's GPU time. A decode in step n+1 feeds a placeholder for
the token step n samples; the runner fills it on the device (core/scheduler.py). While a
request with a grammar runs, each step waits for the last one first: its mask needs the
grammar advanced by the last token.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Callable

from fitserve.config import DEFAULT_MAX_LOGPROBS
from fitserve.core.engine_stats import EngineStats
from fitserve.core.interfaces import KVCapacity, ModelRunner, PendingOutput
from fitserve.core.kv_cache_manager import KVCacheManager
from fitserve.core.outputs import RunnerOutput, SchedulerOutput, TokenLogprobs
from fitserve.core.scheduler import Scheduler, SchedulerLimits
from fitserve.engine.detokenizer import Decoder, IncrementalDetokenizer
from fitserve.engine.errors import InvalidRequestError
from fitserve.engine.metrics import EngineMetrics
from fitserve.engine.outputs import RequestOutput
from fitserve.engine.request_limits import RequestLimits, check_request
from fitserve.engine.structured_output import GrammarCompiler
from fitserve.kv_groups import max_request_tokens
from fitserve.request import Request, RequestStatus
from fitserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)




@dataclass(frozen=True, slots=True)
class EngineLimits:
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    scheduler: SchedulerLimits
    max_logprobs: int = DEFAULT_MAX_LOGPROBS  # most top logprobs a request may ask for per token


def _handed_out(outputs: list[RequestOutput], deliver: Callable[[list[RequestOutput]], None] | None,
                ) -> list[RequestOutput]:
    """The outputs to return from step(): none once `deliver` has taken them."""
    if deliver is None:
        return outputs
    if outputs:
        deliver(outputs)
    return []


def _kv_token_limit(capacity: KVCapacity, limits: SchedulerLimits) -> int | None:
    """The most tokens a request may hold in the cache, None for no limit: with a sliding window a
    request holds at most its window plus one step's chunk (core/kv_cache_manager.py), so when that
    fits in every group, a request of any length runs."""
    return max_request_tokens(capacity.windows, capacity.num_blocks, capacity.block_size,
                              limits.max_num_batched_tokens)


class LLMEngine:
    def __init__(self, runner: ModelRunner, decoder: Decoder, limits: EngineLimits,
                 metrics: EngineMetrics | None = None, async_output: bool = False,
                 grammar_compiler: GrammarCompiler | None = None, enable_prefix_caching: bool = True,
                 async_scheduling: bool = False) -> None:
        capacity = runner.kv_capacity()
        self.runner = runner
        self.decoder = decoder
        self.limits = limits
        self.block_size = capacity.block_size
        if enable_prefix_caching and len(capacity.windows) > 1:
            logger.info("Prefix caching is off: this model mixes sliding-window and full-attention layers "
                        "(%d KV cache groups), and fitserve caches prefixes of one group only "
                        "(docs/prefix-caching.md).", len(capacity.windows))
            enable_prefix_caching = False
        self.kv_cache = KVCacheManager(capacity.num_blocks, capacity.block_size, enable_caching=enable_prefix_caching,
                                       sliding_window_tokens=capacity.sliding_window_tokens,
                                       group_windows=capacity.group_windows or None)
        self.scheduler = Scheduler(limits.scheduler, self.kv_cache)
        self.request_limits = RequestLimits(limits.scheduler.max_model_len, limits.vocab_size, limits.max_logprobs,
                                            num_kv_tokens=_kv_token_limit(capacity, limits.scheduler))
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        # Prompt logprobs gathered over prefill chunks, by position, until the first output carries them.
        self._prompt_logprobs: dict[str, dict[int, TokenLogprobs]] = {}
        self.num_steps = 0
        self.metrics = metrics or EngineMetrics(limits.scheduler.max_model_len)
        self.async_output = async_output
        # Tokens sampled by the last step, not yet detokenized (async output processing only).
        self._pending: list[tuple[Request, int]] = []
        self.grammar_compiler = grammar_compiler  # None: structured output requests are refused
        # Requests with a grammar, as long as they have a detokenizer: no grammar work when empty.
        self._grammar_request_ids: set[str] = set()
        self._pending_logprobs: dict[str, TokenLogprobs] = {}  # their logprobs, for requests that asked
        # Async scheduling: the step launched and not yet resolved (its plan, its pending output).
        self.async_scheduling = async_scheduling
        self._in_flight: tuple[SchedulerOutput, PendingOutput] | None = None

    @property
    def max_model_len(self) -> int:
        return self.limits.scheduler.max_model_len

    # -- requests ------------------------------------------------------------------------------

    def make_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Request:
        """Validate a request (engine/request_limits.py) and resolve its defaults; raises
        InvalidRequestError (RequestLimitError for a limit).

        Reads only immutable limits, so the HTTP thread may call it before queueing.
        """
        max_tokens = check_request(prompt_token_ids, params, self.request_limits)
        resolved = replace(params, max_tokens=max_tokens, eos_token_ids=self.limits.eos_token_ids)
        return Request(request_id, tuple(prompt_token_ids), resolved, grammar=self._compile_grammar(params))

    def _compile_grammar(self, params: SamplingParams) -> object | None:
        if params.structured_output is None:
            return None
        if self.grammar_compiler is None:
            raise InvalidRequestError("Structured output is not available on this server.",
                                      param=params.structured_output.param)
        return self.grammar_compiler.compile(params.structured_output)

    def add_request(self, request: Request) -> None:
        self._detokenizers[request.request_id] = IncrementalDetokenizer(
            self.decoder, request.prompt_token_ids, request.sampling_params
        )
        self.scheduler.add_request(request)
        self.metrics.request_added(request)
        if request.grammar is not None:
            self._grammar_request_ids.add(request.request_id)

    def abort_request(self, request_id: str) -> None:
        request = self.scheduler.requests.get(request_id) or next(
            (r for r, _ in self._pending if r.request_id == request_id), None)  # finished, last output not out yet
        self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
        self._prompt_logprobs.pop(request_id, None)
        self._grammar_request_ids.discard(request_id)
        if self._detokenizers.pop(request_id, None) is not None and request is not None:
            self.metrics.request_finished(request, self.metrics.clock())

    def shutdown(self) -> None:
        """Release the runner's processes, if it has any (tensor-parallel workers); idempotent."""
        self.runner.shutdown()

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished or bool(self._pending) or self._in_flight is not None

    # -- one step --------------------------------------------------------------------------------

    def step(self, deliver: Callable[[list[RequestOutput]], None] | None = None) -> list[RequestOutput]:
        """Run one step; returns its outputs, or hands them to `deliver` as soon as they are ready.

        With async output processing the outputs are the previous step's tokens, ready before
        this step's GPU work ends: `deliver` gets them then, instead of one GPU step later.
        With async scheduling they are the tokens of the step launched by the previous call,
        handed out while the step launched by this call runs.
        """
        if self.async_scheduling:
            return self._step_ahead(deliver)
        scheduler_output = self._plan()
        if scheduler_output is None:
            return _handed_out(self._process_outputs(), deliver)
        pending = self._launch(scheduler_output)
        outputs: list[RequestOutput] = []
        if self.async_output:  # while the device runs this step, hand out the previous step's tokens
            outputs = _handed_out(self._process_outputs(), deliver)
        self._apply(scheduler_output, pending.result())
        if not self.async_output:
            outputs = _handed_out(self._process_outputs(), deliver)
        return outputs

    def _step_ahead(self, deliver: Callable[[list[RequestOutput]], None] | None) -> list[RequestOutput]:
        """Plan and launch the next step, then resolve the one launched by the last call."""
        outputs: list[RequestOutput] = []
        if self._in_flight is not None and self._grammar_request_ids:
            outputs = self._resolve_in_flight()  # grammar masks need the last step's tokens
        scheduler_output = self._plan()
        launched = None
        if scheduler_output is not None:
            previous = self._in_flight[1] if self._in_flight is not None else None
            launched = (scheduler_output, self._launch(scheduler_output, previous))
        if self._in_flight is not None:
            outputs += self._resolve_in_flight()
        self._in_flight = launched
        return _handed_out(outputs, deliver)

    def _plan(self) -> SchedulerOutput | None:
        """The next step's plan, with grammar masks; None when it has nothing to tell the runner."""
        scheduler_output = self.scheduler.schedule()
        self.metrics.prefix_cache_queried(self.kv_cache.take_prefix_cache_stats())
        if scheduler_output.is_empty and not scheduler_output.finished_request_ids:
            return None
        self.metrics.step_scheduled(scheduler_output, self.metrics.clock())
        return self._with_grammar_masks(scheduler_output)

    def drain(self) -> list[RequestOutput]:
        """Resolve the step in flight, if any (async scheduling); returns its outputs."""
        return self._resolve_in_flight() if self._in_flight is not None else []

    def _resolve_in_flight(self) -> list[RequestOutput]:
        """Wait for the step in flight, apply its tokens, and detokenize them."""
        assert self._in_flight is not None
        scheduler_output, pending = self._in_flight
        self._in_flight = None
        self._apply(scheduler_output, pending.result())
        return self._process_outputs()

    def _apply(self, scheduler_output: SchedulerOutput, runner_output: RunnerOutput) -> None:
        """A finished step's tokens reach the scheduler (and grammars); their outputs wait in _pending."""
        self.num_steps += 1
        self._gather_prompt_logprobs(runner_output)
        self._pending = self.scheduler.update_from_output(scheduler_output, runner_output)
        if self._grammar_request_ids:
            for request, token_id in self._pending:  # before the next plan: its masks follow these tokens
                self._advance_grammar(request, token_id)
        self._pending_logprobs = runner_output.logprobs

    def _launch(self, scheduler_output: SchedulerOutput, previous: PendingOutput | None = None) -> PendingOutput:
        """Queue the step; `previous` is the step in flight whose sampled ids fill placeholders."""
        return self.runner.execute_async(scheduler_output, previous)

    def _process_outputs(self) -> list[RequestOutput]:
        """Detokenize the tokens of the last step and check stop strings: one output per token."""
        sampled, self._pending = self._pending, []
        logprobs, self._pending_logprobs = self._pending_logprobs, {}
        now_s = self.metrics.clock()
        outputs = []
        for request, token_id in sampled:
            detokenizer = self._detokenizers.get(request.request_id)
            if detokenizer is None:
                continue  # aborted after its token was sampled: its consumer has gone
            self.metrics.token_sampled(request, now_s)
            stop_string = detokenizer.append(token_id)
            if stop_string is not None and not request.status.finished:
                self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED, stop_string)
            outputs.append(self._output(request, token_id, detokenizer, logprobs))
            if request.status.finished:
                del self._detokenizers[request.request_id]
                self._prompt_logprobs.pop(request.request_id, None)
                self._grammar_request_ids.discard(request.request_id)
                self.metrics.request_finished(request, now_s)
        return outputs

    # -- structured output -------------------------------------------------------------------

    def _with_grammar_masks(self, scheduler_output: SchedulerOutput) -> SchedulerOutput:
        """The plan with each constrained sampling chunk's allowed tokens for this step."""
        if not self._grammar_request_ids:
            return scheduler_output
        requests = self.scheduler.requests
        masks = {chunk.request_id: grammar.allowed_token_bitmask() for chunk in scheduler_output.scheduled
                 if chunk.samples and (grammar := requests[chunk.request_id].grammar) is not None}
        if not masks:
            return scheduler_output
        scheduled = tuple(replace(chunk, allowed_token_bitmask=masks[chunk.request_id])
                          if chunk.request_id in masks else chunk for chunk in scheduler_output.scheduled)
        return replace(scheduler_output, scheduled=scheduled)

    def _advance_grammar(self, request: Request, token_id: int) -> None:
        """Feed the sampled token to the request's grammar; a complete grammar ends it with "stop"."""
        grammar = request.grammar
        if grammar is None or request.status.finished:
            return
        if not grammar.accept(token_id):  # the runner ignored the mask: an engine bug, not the client's
            logger.error("Request %s: token %d is outside its grammar (%s); ending the request.",
                         request.request_id, token_id, grammar.error)
            self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_ABORTED)
        elif grammar.finished:
            self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED)

    # -- outputs -----------------------------------------------------------------------------

    def _output(self, request: Request, token_id: int, detokenizer: IncrementalDetokenizer,
                step_logprobs: dict[str, TokenLogprobs]) -> RequestOutput:
        finished = request.status.finished
        params = request.sampling_params
        logprobs = step_logprobs.get(request.request_id) if params.logprobs is not None else None
        prompt_logprobs = None
        if params.prompt_logprobs is not None and detokenizer.num_output_tokens == 1:
            prompt_logprobs = self._take_prompt_logprobs(request)
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=(token_id,),
            new_text=detokenizer.take_delta(finished),
            finished=finished,
            finish_reason=request.status.finish_reason,
            stop_reason=request.stop_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=len(request.output_token_ids),
            new_logprobs=None if logprobs is None else (logprobs,),
            prompt_logprobs=prompt_logprobs,
        )

    def _gather_prompt_logprobs(self, runner_output: RunnerOutput) -> None:
        for request_id, chunk in runner_output.prompt_logprobs.items():
            if request_id not in self.scheduler.requests:
                continue  # finished from outside since the step was planned
            by_position = self._prompt_logprobs.setdefault(request_id, {})
            for offset, entry in enumerate(chunk.entries):
                by_position[chunk.start_pos + offset] = entry

    def _take_prompt_logprobs(self, request: Request) -> tuple[TokenLogprobs | None, ...]:
        """None for the first prompt token (nothing precedes it), then one entry per prompt token.

        A position the runner never computed (a prompt whose KV came from elsewhere) is None too.
        """
        by_position = self._prompt_logprobs.pop(request.request_id, {})
        return (None,) + tuple(by_position.get(p) for p in range(1, request.num_prompt_tokens))

    def stats(self) -> EngineStats:
        """Gauges and counters for /metrics, the page, the stats line and benchmarks; safe to call
        from another thread."""
        scheduler, kv_cache = self.scheduler, self.kv_cache
        return EngineStats(
            num_requests_running=len(scheduler.running),
            num_requests_waiting=len(scheduler.waiting),
            kv_cache_used_fraction=kv_cache.usage,
            num_kv_blocks=kv_cache.pool.num_blocks,
            num_free_kv_blocks=kv_cache.num_free_blocks,
            num_free_kv_tokens=kv_cache.num_free_tokens,
            num_cached_kv_blocks=kv_cache.pool.num_cached_blocks,
            block_size_tokens=self.block_size,
            enable_prefix_caching=kv_cache.enable_caching,
            max_num_seqs=self.limits.scheduler.max_num_seqs,
            max_model_len_tokens=self.max_model_len,
            num_preemptions_total=scheduler.num_preemptions_total,
            num_steps_total=self.num_steps,
            metrics=self.metrics.snapshot(),
            monotonic_time_s=time.monotonic(),
        )

    def check_invariants(self) -> None:
        self.scheduler.check_invariants()
        # Requests finished by the last step keep their detokenizer until their final output is out.
        finishing = {r.request_id for r, _ in self._pending if r.status.finished}
        detokenized, live = set(self._detokenizers), set(self.scheduler.requests)
        assert live <= detokenized and detokenized - live <= finishing, "detokenizers leak or are missing"
        assert set(self._prompt_logprobs) <= detokenized, "prompt logprobs of finished requests"
        assert self._grammar_request_ids <= detokenized, "grammar ids of finished requests"
        assert self.metrics.num_tracked_requests == len(self._detokenizers), "metrics track finished requests"

