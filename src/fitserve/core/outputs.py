"""What crosses the seam between the scheduler (CPU bookkeeping) and the runner (device work).

Both types are torch-free and frozen: the runner must not mutate the scheduler's plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fitserve.sampling_params import SamplingParams

# In ScheduledRequest.token_ids: the token the request samples in the step launched just before
# this one, unknown when this step was planned (async scheduling). The runner takes it from that
# step's sampled ids on the device. It is always a decode chunk's only token.
PLACEHOLDER_TOKEN_ID = -1


@dataclass(frozen=True, slots=True)
class ScheduledRequest:
    """One request's share of a step."""

    request_id: str
    token_ids: tuple[int, ...]  # fed this step: a prompt chunk, or the last sampled token (or its placeholder)
    num_computed_tokens: int  # tokens already in the cache before this step (= position of token_ids[0])
    block_table: tuple[int, ...]  # KV block ids covering num_computed_tokens + len(token_ids) tokens
    samples: bool  # False for a prefill chunk that does not reach the end of the known tokens
    sampling_params: SamplingParams
    # Structured output: packed little-endian int32 words (at least ceil(vocab / 32)), bit t set =
    # token t may be sampled this step; None = every token. Only on chunks that sample.
    allowed_token_bitmask: bytes | None = None
    # The whole prompt, only for requests whose sampling reads it (sampling_params.needs_prompt_tokens)
    # and only on chunks that feed prompt tokens before the first output: the runner keeps what it needs.
    prompt_token_ids: tuple[int, ...] | None = None
    # Models with several KV cache groups (kv_groups.py: Gemma 2/3), the tables of groups 1, 2, ... (group
    # 0's is block_table), each as long as block_table, FREED_BLOCK where a window was left; () for one group.
    group_block_tables: tuple[tuple[int, ...], ...] = ()

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def feeds_placeholder(self) -> bool:
        """Whether the fed token is the previous step's sample, still on the device."""
        return self.token_ids[-1] == PLACEHOLDER_TOKEN_ID

    @property
    def seq_len(self) -> int:
        """Context length after this step."""
        return self.num_computed_tokens + len(self.token_ids)


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    """One engine step: the requests to run and what the runner may forget."""

    scheduled: tuple[ScheduledRequest, ...]
    finished_request_ids: frozenset[str]  # finished or aborted since the last step: drop their state

    @property
    def num_batched_tokens(self) -> int:
        return sum(r.num_tokens for r in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """The log-probabilities at one position, from the model's raw log-softmax (before penalties,
    logit_bias and temperature, as vLLM reports them)."""

    token_id: int  # the sampled token (outputs) or the actual next token (prompt)
    logprob: float
    top: tuple[tuple[int, float], ...]  # the k most likely (token id, logprob), most likely first


@dataclass(frozen=True, slots=True)
class PromptLogprobs:
    """Logprobs of prompt tokens start_pos .. start_pos + len(entries) - 1 (start_pos >= 1)."""

    start_pos: int
    entries: tuple[TokenLogprobs, ...]


@dataclass(frozen=True, slots=True)
class RunnerOutput:
    """Per sampling request (those with `samples=True`, in scheduled order), the sampled token."""

    sampled_token_ids: dict[str, int]
    # Only for requests that asked (sampling_params.logprobs / prompt_logprobs).
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[str, PromptLogprobs] = field(default_factory=dict)
