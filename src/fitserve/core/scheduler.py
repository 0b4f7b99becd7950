"""Continuous batching with one token budget per step.

Each step feeds at most `max_num_batched_tokens` tokens from at most `max_num_seqs`
requests. Running requests go first, in arrival order: a decoding request takes one token
of the budget, a request still prefilling takes the next chunk of its prompt. What is left
admits waiting requests, first come first served. There is no separate prefill or decode
phase: a step may mix both.

When the cache has no free block for a running request, the newest running request is
preempted: its blocks are freed and it goes back to the front of the queue, to be
recomputed (prompt and the tokens it had generated) when blocks are free again. Its
output is unchanged by this, since the recomputed K/V equal the lost ones.

With prefix caching, a request admitted from the queue first takes the cached blocks of its
longest cached prefix (core/kv_cache_manager.py): its `num_computed_tokens` starts after
them, and only the rest of its tokens use the budget. A preempted request's full blocks stay
cached when freed, so it usually comes back with most of its tokens already computed.

Async scheduling (the engine plans step n+1 while step n runs): a request that samples in
step n has a pending output (`num_pending_outputs`), and its decode in step n+1 feeds a
placeholder that the runner fills from step n's sampled ids on the device. A request that
will certainly end with step n's token (max_tokens, the context length) is not planned
again; one that ends on EOS or a stop string is planned once more and that token is dropped.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from fitserve.core.kv_cache_manager import KVCacheManager
from fitserve.core.outputs import PLACEHOLDER_TOKEN_ID, RunnerOutput, ScheduledRequest, SchedulerOutput
from fitserve.request import Request, RequestStatus


@dataclass(frozen=True, slots=True)
class SchedulerLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int  # prompt + output tokens a request may reach


class Scheduler:
    def __init__(self, limits: SchedulerLimits, kv_cache: KVCacheManager) -> None:
        self.limits = limits
        self.kv_cache = kv_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_since_last_step: set[str] = set()
        self.num_preemptions_total = 0

    # -- queue changes -------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        assert request.request_id not in self.requests, f"duplicate request id {request.request_id}"
        assert request.sampling_params.max_tokens is not None, "the engine resolves max_tokens"
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_request(self, request_id: str, status: RequestStatus, stop_reason: int | str | None = None) -> None:
        """End a request from outside the step (abort, or a stop string the detokenizer found)."""
        assert status.finished
        request = self.requests.pop(request_id, None)
        if request is None:
            return  # already finished: aborts race with natural ends
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._release(request, status, stop_reason)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- one step --------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget_tokens = self.limits.max_num_batched_tokens
        chunks: list[tuple[Request, int]] = []
        budget_tokens, preempted = self._schedule_running(budget_tokens, chunks)
        if not preempted:  # a cache that just ran dry admits nobody new
            self._schedule_waiting(budget_tokens, chunks)
        scheduled = tuple(self._to_scheduled(request, num_new) for request, num_new in chunks)
        for (request, num_new), chunk in zip(chunks, scheduled):
            request.num_computed_tokens += num_new
            request.num_pending_outputs += chunk.samples
        finished = frozenset(self._finished_since_last_step)
        self._finished_since_last_step.clear()
        return SchedulerOutput(scheduled=scheduled, finished_request_ids=finished)

    def _schedule_running(self, budget_tokens: int, chunks: list[tuple[Request, int]]) -> tuple[int, bool]:
        preempted = False
        index = 0
        while index < len(self.running) and budget_tokens > 0:
            request = self.running[index]
            if self._ends_with_pending_output(request):
                index += 1
                continue
            num_new = min(_num_known_or_pending(request) - request.num_computed_tokens, budget_tokens)
            total = request.num_computed_tokens + num_new
            while not self.kv_cache.allocate_slots(request, total):
                victim = self.running.pop()  # the newest running request loses its blocks
                self._preempt(victim)
                preempted = True
                if victim is request:
                    return budget_tokens, preempted
            chunks.append((request, num_new))
            budget_tokens -= num_new
            index += 1
        return budget_tokens, preempted

    def _schedule_waiting(self, budget_tokens: int, chunks: list[tuple[Request, int]]) -> None:
        while self.waiting and budget_tokens > 0 and len(self.running) < self.limits.max_num_seqs:
            request = self.waiting[0]
            assert request.num_computed_tokens == 0, "a waiting request has nothing in the cache"
            assert request.num_pending_outputs == 0, "a step that sampled for it has not been resolved"
            cached_blocks = self.kv_cache.find_cached_prefix(request)
            num_cached_tokens = len(cached_blocks) * self.kv_cache.block_size
            num_new = min(request.num_tokens - num_cached_tokens, budget_tokens)
            if not self.kv_cache.allocate_slots(request, num_cached_tokens + num_new, cached_blocks):
                break  # first come first served: nobody overtakes the head of the queue
            self.kv_cache.record_lookup(request, num_cached_tokens)
            request.num_computed_tokens = num_cached_tokens
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            chunks.append((request, num_new))
            budget_tokens -= num_new

    def _ends_with_pending_output(self, request: Request) -> bool:
        """Whether the token a launched step samples for the request will certainly end it."""
        pending = request.num_pending_outputs
        return pending > 0 and (
            len(request.output_token_ids) + pending >= request.sampling_params.max_tokens
            or request.num_tokens + pending >= self.limits.max_model_len)

    def _to_scheduled(self, request: Request, num_new: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        end = start + num_new
        params = request.sampling_params
        # Sent until the first output: the runner keeps what it needs from it (also across preemption).
        sends_prompt = params.needs_prompt_tokens and not request.output_token_ids
        token_ids = request.token_ids_slice(start, end)
        if end > request.num_tokens:  # the token sampled by the step in flight (async scheduling)
            assert end == request.num_tokens + 1 == start + 1, "a placeholder is a decode's only token"
            token_ids = (PLACEHOLDER_TOKEN_ID,)
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=token_ids,
            num_computed_tokens=start,
            block_table=tuple(self.kv_cache.block_table(request.request_id)),
            group_block_tables=self._group_block_tables(request.request_id) if self.kv_cache.num_groups > 1 else (),
            samples=end == _num_known_or_pending(request),
            sampling_params=params,
            prompt_token_ids=request.prompt_token_ids if sends_prompt else None,
        )

    def _group_block_tables(self, request_id: str) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(table) for table in self.kv_cache.block_tables(request_id)[1:])

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request.request_id, keep_keys=True)  # its full blocks stay cached for its return
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.appendleft(request)

    # -- after the step ----------------------------------------------------------------------

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: RunnerOutput
    ) -> list[tuple[Request, int]]:
        """Append each sampled token; finish requests that hit a stop condition.

        Returns (request, new token id) for every request that sampled this step.
        """
        sampled: list[tuple[Request, int]] = []
        for chunk in scheduler_output.scheduled:
            if not chunk.samples:
                continue
            request = self.requests.get(chunk.request_id)
            if request is None:  # finished from outside between schedule and update
                continue
            token_id = runner_output.sampled_token_ids[chunk.request_id]
            request.output_token_ids.append(token_id)
            request.num_pending_outputs -= 1
            sampled.append((request, token_id))
            status, stop_reason = self._stop_condition(request, token_id)
            if status is not None:
                self.requests.pop(request.request_id)
                # Preempted while the step ran (async scheduling): it waits to be recomputed.
                queue = self.running if request.status == RequestStatus.RUNNING else self.waiting
                queue.remove(request)
                self._release(request, status, stop_reason)
        return sampled

    def _stop_condition(self, request: Request, token_id: int) -> tuple[RequestStatus | None, int | None]:
        params = request.sampling_params
        # Before min_tokens outputs the sampler masks EOS and stop ids; a runner that ignores the
        # mask (the fake one) must not end the request either.
        may_stop = len(request.output_token_ids) > params.min_tokens
        if may_stop and not params.ignore_eos and token_id in params.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED, None
        if may_stop and token_id in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED, token_id
        if len(request.output_token_ids) >= params.max_tokens or request.num_tokens >= self.limits.max_model_len:
            return RequestStatus.FINISHED_LENGTH, None
        return None, None

    def _release(self, request: Request, status: RequestStatus, stop_reason: int | str | None) -> None:
        request.status = status
        request.stop_reason = stop_reason
        self.kv_cache.free(request.request_id)
        self._finished_since_last_step.add(request.request_id)

    # -- checks ------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        self.kv_cache.check_invariants()
        running_ids = {r.request_id for r in self.running}
        waiting_ids = {r.request_id for r in self.waiting}
        assert len(running_ids) == len(self.running) and len(waiting_ids) == len(self.waiting)
        assert not running_ids & waiting_ids, "a request is both running and waiting"
        assert running_ids | waiting_ids == set(self.requests), "queues and the request map disagree"
        self.kv_cache.check_request_ids(set(self.requests))
        assert len(self.running) <= self.limits.max_num_seqs
        for request in self.running:
            assert request.status == RequestStatus.RUNNING
            table = self.kv_cache.block_table(request.request_id)
            assert len(table) * self.kv_cache.block_size >= request.num_computed_tokens, "tokens beyond the table"
            assert request.num_computed_tokens <= _num_known_or_pending(request)
        for request in self.waiting:
            assert request.status == RequestStatus.WAITING
            assert not self.kv_cache.block_table(request.request_id), "a waiting request holds blocks"


def _num_known_or_pending(request: Request) -> int:
    """The request's tokens, counting those sampled by launched steps and not known yet."""
    return request.num_tokens + request.num_pending_outputs
