"""Token sampling for a batch of requests, each with its own settings, on the logits' device.

Sampling uses the exponential race: argmax(p / q) with q ~ Exp(1) draws token i with
probability p_i, which lets every row use its own random stream (a request with a seed
gets its own generator, so its tokens do not depend on what else is in the batch) while
the arithmetic stays batched.
"""

from __future__ import annotations

import torch

from fitserve.core.outputs import ScheduledRequest
from fitserve.runner.grammar_mask import apply_allowed_token_masks
from fitserve.sampling_params import SamplingParams


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(seed)
        self._request_generators: dict[str, torch.Generator] = {}

    def forget(self, request_ids: frozenset[str]) -> None:
        for request_id in request_ids:
            self._request_generators.pop(request_id, None)

    def sample(self, logits: torch.Tensor, chunks: list[ScheduledRequest]) -> list[int]:
        """logits: [N, vocab] float32, one row per sampling request, in `chunks` order."""
        return self.sample_tensor(logits, chunks).tolist()

    def sample_tensor(self, logits: torch.Tensor, chunks: list[ScheduledRequest]) -> torch.Tensor:
        """Like `sample`, but the ids stay on the logits' device ([N] int64): no host sync."""
        logits = apply_allowed_token_masks(logits, chunks)  # structured output: forbidden tokens -> -inf
        params = [chunk.sampling_params for chunk in chunks]
        greedy_ids = logits.argmax(dim=-1)  # [N] int64
        if all(p.greedy for p in params):
            return greedy_ids
        temperatures = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=logits.device)
        probs = apply_filters(logits / temperatures[:, None], params).softmax(dim=-1)  # [N, V]
        noise = self._exponential_noise(probs, chunks)
        sampled_ids = (probs / noise).argmax(dim=-1)
        greedy_rows = torch.tensor([p.greedy for p in params], device=logits.device)
        return torch.where(greedy_rows, greedy_ids, sampled_ids)

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


def apply_filters(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k, then top-p, then min-p set."""
    vocab_size = logits.shape[-1]
    top_ks = [p.top_k if p.top_k > 0 else vocab_size for p in params]
    top_ps = [p.top_p for p in params]
    min_ps = [p.min_p for p in params]
    if any(k < vocab_size for k in top_ks) or any(p < 1.0 for p in top_ps):
        logits = _top_k_top_p(logits, torch.tensor(top_ks, device=logits.device),
                               torch.tensor(top_ps, device=logits.device, dtype=logits.dtype))
    if any(m > 0.0 for m in min_ps):
        min_p = torch.tensor(min_ps, device=logits.device, dtype=logits.dtype)
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
