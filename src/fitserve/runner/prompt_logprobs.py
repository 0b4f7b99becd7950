"""Logprobs of prompt tokens (`prompt_logprobs`, and the completions API's echo with logprobs).

The logits at position p give the distribution of token p + 1, so a prefill chunk feeding
positions [s, s + L) yields the logprobs of prompt tokens s + 1 .. min(s + L, P - 1). The logits
are computed in slices of rows, so the extra memory stays that of a sampling step however long
the chunk is. Values are the raw log-softmax, as for output tokens. Reading them back is a host
sync inside the step, paid only by steps that carry prompt-logprob requests.
"""

from __future__ import annotations

import torch

from fitserve.core.outputs import PromptLogprobs, ScheduledRequest
from fitserve.runner.sampler import top_logprobs

PROMPT_LOGPROBS_ROWS = 64  # positions per logits slice: 64 x vocab float32 (33 MiB at a 128k vocab)


def wants_prompt_logprobs(chunk: ScheduledRequest) -> bool:
    return chunk.prompt_token_ids is not None and chunk.sampling_params.prompt_logprobs is not None


def compute_prompt_logprobs(model: torch.nn.Module, hidden: torch.Tensor,
                            scheduled: tuple[ScheduledRequest, ...]) -> dict[str, PromptLogprobs]:
    """hidden: [T, H], the forward's output for the whole flat batch of `scheduled`."""
    out: dict[str, PromptLogprobs] = {}
    offset = 0
    for chunk in scheduled:
        if wants_prompt_logprobs(chunk):
            entries = _chunk_prompt_logprobs(model, hidden[offset : offset + chunk.num_tokens], chunk)
            if entries is not None:
                out[chunk.request_id] = entries
        offset += chunk.num_tokens
    return out


def _chunk_prompt_logprobs(model: torch.nn.Module, hidden: torch.Tensor,
                           chunk: ScheduledRequest) -> PromptLogprobs | None:
    prompt = chunk.prompt_token_ids
    assert prompt is not None
    start = chunk.num_computed_tokens
    num_rows = min(chunk.num_tokens, len(prompt) - 1 - start)  # positions whose next token is in the prompt
    if num_rows <= 0:
        return None
    k = chunk.sampling_params.prompt_logprobs or 0
    entries = []
    for first in range(0, num_rows, PROMPT_LOGPROBS_ROWS):
        last = min(first + PROMPT_LOGPROBS_ROWS, num_rows)
        logprobs = model.compute_logits(hidden[first:last]).log_softmax(dim=-1)  # [rows, V] float32
        targets = torch.tensor(prompt[start + first + 1 : start + last + 1], dtype=torch.int64,
                               device=logprobs.device)
        entries.extend(top_logprobs(logprobs, targets, [k] * (last - first), list(range(last - first))).to_host())
    return PromptLogprobs(start_pos=start + 1, entries=tuple(entries))
