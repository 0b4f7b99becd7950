"""Token sampling for a batch of requests, each with its own settings, on the logits' device.

Sampling uses the exponential race: argmax(p / q) with q ~ Exp(1) draws token i with
probability p_i, which lets every row use its own random stream (a request with a seed
gets its own generator, so its tokens do not depend on what else is in the batch) while
the arithmetic stays batched.

Order per row, as in vLLM: logprobs are taken from the raw logits; then penalties, logit_bias
and min_tokens change the logits (runner/logits_processors.py); then temperature, top-k,
top-p and min-p; then the draw (or the argmax for greedy rows). A batch of greedy rows that
ask for none of these takes one argmax and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fitserve.core.outputs import ScheduledRequest, TokenLogprobs
from fitserve.runner.grammar_mask import apply_allowed_token_masks
from fitserve.runner.input_batch import to_device
from fitserve.runner.logits_processors import (TokenCounts, allowed_token_mask, apply_allowed_token_ids,
                                               apply_logit_bias, apply_min_tokens, apply_penalties)
from fitserve.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class SamplerOutput:
    token_ids: list[int]  # one per row
    logprobs: list[TokenLogprobs | None] | None = None  # per row, for rows that asked; None: no row asked


@dataclass(frozen=True, slots=True)
class DeviceLogprobs:
    """Logprobs still on the device: per row that asked, its target's logprob and the top-k."""

    rows: list[int]  # the batch rows these belong to
    ks: list[int]  # top logprobs each row asked for
    targets: torch.Tensor  # [R] int64, the sampled (or actual next) tokens
    values: torch.Tensor  # [R, 1 + max k] float32: the target's logprob, then the top-k, best first
    top_ids: torch.Tensor  # [R, max k] int64

    def to_host(self) -> list[TokenLogprobs]:
        values, top_ids, targets = self.values.tolist(), self.top_ids.tolist(), self.targets.tolist()
        return [TokenLogprobs(targets[r], row[0], tuple(zip(top_ids[r][:k], row[1 : 1 + k])))
                for r, (row, k) in enumerate(zip(values, self.ks))]


@dataclass(frozen=True, slots=True)
class DeviceSample:
    """A step's sampling result before the host reads it (reading it is the step's sync)."""

    token_ids: torch.Tensor  # [N] int64 on the logits' device
    logprobs: DeviceLogprobs | None = None

    def copy_to_host(self) -> HostSample:
        """Queue the copy of the results to host memory; HostSample.wait() waits for it alone."""
        if self.token_ids.device.type != "cuda":
            return HostSample(self, None)
        logprobs = self.logprobs
        if logprobs is not None:
            logprobs = replace(logprobs, targets=_to_pinned(logprobs.targets), values=_to_pinned(logprobs.values),
                               top_ids=_to_pinned(logprobs.top_ids))
        host = DeviceSample(_to_pinned(self.token_ids), logprobs)
        event = torch.cuda.Event()
        event.record()
        return HostSample(host, event)

    def to_host(self) -> SamplerOutput:
        token_ids = self.token_ids.tolist()
        if self.logprobs is None:
            return SamplerOutput(token_ids)
        rows: list[TokenLogprobs | None] = [None] * len(token_ids)
        for row, entry in zip(self.logprobs.rows, self.logprobs.to_host()):
            rows[row] = entry
        return SamplerOutput(token_ids, rows)


@dataclass(frozen=True, slots=True)
class HostSample:
    """A step's results being copied to the host; `wait()` blocks until this copy is done, not until
    later work queued on the device is (reading a CUDA tensor directly would wait for all of it)."""

    sample: DeviceSample  # in pinned host memory once `event` has passed (on the CPU: the results)
    event: torch.cuda.Event | None

    def wait(self) -> SamplerOutput:
        if self.event is not None:
            self.event.synchronize()
        return self.sample.to_host()


def _to_pinned(tensor: torch.Tensor) -> torch.Tensor:
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


# Rows processed at once past the greedy fast path: the penalties, filters (a full sort of each
# row), softmax and noise hold about 48 bytes per logit on CUDA, so a pass bounds them at
# ROWS_PER_PASS rows (0.4 GB for a 128K vocabulary) instead of the batch's (1.6 GB at 256 rows,
# memory that the KV cache gets instead). plan/estimates.py counts it.
ROWS_PER_PASS = 64


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(seed)
        self._request_generators: dict[str, torch.Generator] = {}
        self.token_counts = TokenCounts(device)  # penalty rows only
        self._num_outputs: dict[str, int] = {}  # tokens sampled so far, for rows with min_tokens
        # allowed_token_ids as a [V] bool mask on the device, made once per request: a list of every
        # token id must not be converted again at each of its steps
        self._allowed_masks: dict[str, torch.Tensor] = {}

    def forget(self, request_ids: frozenset[str]) -> None:
        if not request_ids:
            return
        for request_id in request_ids:
            self._request_generators.pop(request_id, None)
            self._num_outputs.pop(request_id, None)
            self._allowed_masks.pop(request_id, None)
        self.token_counts.forget(request_ids)

    def sample(self, logits: torch.Tensor, chunks: list[ScheduledRequest]) -> SamplerOutput:
        """logits: [N, vocab] float32, one row per sampling request, in `chunks` order."""
        return self.sample_device(logits, chunks).to_host()

    def sample_device(self, logits: torch.Tensor, chunks: list[ScheduledRequest]) -> DeviceSample:
        """Like `sample`, but nothing waits for the device: the results stay there."""
        logits = apply_allowed_token_masks(logits, chunks)  # structured output: forbidden tokens -> -inf
        params = [chunk.sampling_params for chunk in chunks]
        if all(p.greedy and not p.processes_logits and p.logprobs is None for p in params):
            return DeviceSample(logits.argmax(dim=-1))
        logprob_rows = [row for row, p in enumerate(params) if p.logprobs is not None]
        raw_logprobs = logits[logprob_rows].log_softmax(dim=-1) if logprob_rows else None  # [L, V]
        sampled = torch.empty(len(chunks), dtype=torch.int64, device=logits.device)  # [N]
        for start in range(0, len(chunks), ROWS_PER_PASS):
            rows = slice(start, start + ROWS_PER_PASS)
            pass_logits = logits[rows]  # a view: penalties, bias and min_tokens write through
            penalty_slots = self._process_logits(pass_logits, chunks[rows], params[rows])
            sampled[rows] = pass_sampled = self._draw(pass_logits, chunks[rows], params[rows])
            if penalty_slots is not None:
                pass_rows, slots = penalty_slots
                self.token_counts.record(slots, pass_sampled[pass_rows])
        logprobs = None
        if raw_logprobs is not None:
            index = to_device(logprob_rows, torch.int64, logits.device)
            logprobs = top_logprobs(raw_logprobs, sampled[index], [params[r].logprobs or 0 for r in logprob_rows],
                                    logprob_rows)
        return DeviceSample(sampled, logprobs)

    def _process_logits(self, logits: torch.Tensor, chunks: list[ScheduledRequest], params: list[SamplingParams]
                        ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Penalties, logit_bias, min_tokens, allowed_token_ids, in place (counting min_tokens rows'
        outputs); returns (rows, slots) of penalty rows."""
        if not any(p.processes_logits for p in params):
            return None
        penalty_rows = [row for row, p in enumerate(params) if p.needs_token_counts]
        result = None
        if penalty_rows:
            slots = apply_penalties(logits, penalty_rows, chunks, self.token_counts)
            result = (to_device(penalty_rows, torch.int64, logits.device), to_device(slots, torch.int64, logits.device))
        bias_rows = [row for row, p in enumerate(params) if p.logit_bias]
        if bias_rows:
            apply_logit_bias(logits, bias_rows, chunks)
        short_rows = []
        for row, chunk in enumerate(chunks):
            if chunk.sampling_params.min_tokens > 0:  # every sampling row gets one token this step
                num_outputs = self._num_outputs.get(chunk.request_id, 0)
                if num_outputs < chunk.sampling_params.min_tokens:
                    short_rows.append(row)
                self._num_outputs[chunk.request_id] = num_outputs + 1
        if short_rows:
            apply_min_tokens(logits, short_rows, chunks)
        allowed_rows = [row for row, p in enumerate(params) if p.allowed_token_ids]
        if allowed_rows:
            apply_allowed_token_ids(logits, allowed_rows, [self._allowed_mask(chunks[row], logits.shape[-1])
                                                           for row in allowed_rows])
        return result

    def _allowed_mask(self, chunk: ScheduledRequest, vocab_size: int) -> torch.Tensor:
        mask = self._allowed_masks.get(chunk.request_id)
        if mask is None:
            mask = self._allowed_masks[chunk.request_id] = allowed_token_mask(
                chunk.sampling_params.allowed_token_ids, vocab_size, self.device)
        return mask

    def _draw(self, logits: torch.Tensor, chunks: list[ScheduledRequest], params: list[SamplingParams]
              ) -> torch.Tensor:
        greedy = [p.greedy for p in params]
        if all(greedy):
            return logits.argmax(dim=-1)  # [N] int64
        temperatures = to_device([1.0 if p.greedy else p.temperature for p in params], torch.float32, logits.device)
        probs = apply_filters(logits / temperatures[:, None], params).softmax(dim=-1)  # [N, V]
        noise = self._exponential_noise(probs, chunks)
        sampled_ids = (probs / noise).argmax(dim=-1)
        if not any(greedy):
            return sampled_ids
        greedy_rows = to_device(greedy, torch.bool, logits.device)
        return torch.where(greedy_rows, logits.argmax(dim=-1), sampled_ids)

    def _exponential_noise(self, probs: torch.Tensor, chunks: list[ScheduledRequest]) -> torch.Tensor:
        noise = torch.empty_like(probs)  # [N, V] float32, each row ~ Exp(1)
        noise.exponential_(generator=self._generator)
        for row, chunk in enumerate(chunks):
            seed = chunk.sampling_params.seed
            if seed is None or chunk.sampling_params.greedy:
                continue
            generator = self._request_generators.get(chunk.request_id)
            if generator is None:
                generator = torch.Generator(device=probs.device)
                generator.manual_seed(seed)
                self._request_generators[chunk.request_id] = generator
            noise[row].exponential_(generator=generator)
        return noise


def top_logprobs(logprobs: torch.Tensor, targets: torch.Tensor, ks: list[int], rows: list[int]) -> DeviceLogprobs:
    """Per row of logprobs [R, V]: the target token's logprob and the ks[r] most likely tokens,
    left on the device (the top-k is taken once, at the largest k)."""
    max_k = max(ks, default=0)
    target_logprobs = logprobs.gather(1, targets[:, None])  # [R, 1]
    top_values, top_ids = logprobs.topk(max_k, dim=-1)  # [R, max_k], sorted, most likely first
    return DeviceLogprobs(rows, ks, targets, torch.cat([target_logprobs, top_values], dim=1), top_ids)


def apply_filters(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k, then top-p, then min-p set."""
    vocab_size = logits.shape[-1]
    top_ks = [p.top_k if p.top_k > 0 else vocab_size for p in params]
    top_ps = [p.top_p for p in params]
    min_ps = [p.min_p for p in params]
    if any(k < vocab_size for k in top_ks) or any(p < 1.0 for p in top_ps):
        logits = _top_k_top_p(logits, to_device(top_ks, torch.int64, logits.device),
                               to_device(top_ps, logits.dtype, logits.device))
    if any(m > 0.0 for m in min_ps):
        min_p = to_device(min_ps, logits.dtype, logits.device)
        probs = logits.softmax(dim=-1)
        too_unlikely = probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(too_unlikely, float("-inf"))
    return logits


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """top_k: [N] int64 (vocab size = off); top_p: [N] (1.0 = off)."""
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)  # [N, V]
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
    sorted_probs = sorted_logits.softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # the most likely token always stays
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p[:, None], float("-inf"))
    return torch.empty_like(logits).scatter_(-1, sorted_ids, sorted_logits)
