"""Per-request sampling settings and their validation (torch-free).

The field names and defaults follow the OpenAI API and vLLM's SamplingParams, so the HTTP
layer maps request fields onto them one to one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fitserve.structured_params import StructuredOutputParams

GREEDY_TEMPERATURE = 0.0  # temperature at or below this samples the argmax
MAX_ABS_PENALTY = 2.0  # OpenAI's range for presence_penalty and frequency_penalty
MAX_ABS_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values
# generation_config.json keys used as defaults (vLLM's set); max_new_tokens becomes max_tokens.
GENERATION_CONFIG_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class InvalidSamplingParam(ValueError):
    """A client-supplied sampling value is out of range; `param` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int | None = 16  # None: up to the context length
    temperature: float = 1.0
    top_p: float = 1.0  # nucleus mass kept, (0, 1]
    top_k: int = -1  # -1 (or 0): no top-k cut
    min_p: float = 0.0  # drop tokens with prob < min_p * max prob
    seed: int | None = None  # per-request generator: same seed, same tokens
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    structured_output: StructuredOutputParams | None = None  # a grammar the output must follow
    # Penalties, applied to the raw logits before temperature (vLLM's order):
    presence_penalty: float = 0.0  # [-2, 2], subtracted once from each token present in the output
    frequency_penalty: float = 0.0  # [-2, 2], subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # > 0; HF's: logits of prompt or output tokens divided (>0) or multiplied (<0)
    # (token id, bias in [-100, 100]) added to the logits; a mapping is accepted and stored sorted.
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0  # EOS, stop_token_ids and stop strings cannot end the output before this many tokens
    allowed_token_ids: tuple[int, ...] = ()  # vLLM's: only these may be sampled (empty: any token)
    logprobs: int | None = None  # per output token, the sampled token's logprob and this many top ones
    prompt_logprobs: int | None = None  # per prompt token likewise (the first has none)
    # EOS ids of the model; filled by the engine from the generation config, not by clients.
    eos_token_ids: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if isinstance(self.logit_bias, Mapping):
            object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidSamplingParam("max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}.")
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidSamplingParam("temperature", f"temperature must be in [0, 2], got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidSamplingParam("top_p", f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < -1:
            raise InvalidSamplingParam("top_k", f"top_k must be -1 (disabled) or at least 1, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidSamplingParam("min_p", f"min_p must be in [0, 1], got {self.min_p}.")
        if any(not s for s in self.stop):
            raise InvalidSamplingParam("stop", "stop strings must not be empty.")
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidSamplingParam("stop_token_ids", "stop_token_ids must be non-negative.")
        self._check_output_controls()

    def _check_output_controls(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -MAX_ABS_PENALTY <= value <= MAX_ABS_PENALTY:
                raise InvalidSamplingParam(name, f"{name} must be in [-2, 2], got {value}.")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise InvalidSamplingParam(
                "repetition_penalty", f"repetition_penalty must be greater than 0, got {self.repetition_penalty}.")
        for token_id, bias in self.logit_bias:
            if token_id < 0:
                raise InvalidSamplingParam("logit_bias", f"logit_bias token ids must be non-negative, got {token_id}.")
            if not -MAX_ABS_LOGIT_BIAS <= bias <= MAX_ABS_LOGIT_BIAS:
                raise InvalidSamplingParam(
                    "logit_bias", f"logit_bias values must be in [-100, 100], got {bias} for token {token_id}.")
        if any(t < 0 for t in self.allowed_token_ids):
            raise InvalidSamplingParam("allowed_token_ids", "allowed_token_ids must be non-negative.")
        if self.min_tokens < 0:
            raise InvalidSamplingParam("min_tokens", f"min_tokens must be 0 or more, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidSamplingParam(
                "min_tokens", f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens}).")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InvalidSamplingParam(name, f"{name} must be 0 or more, got {value}.")

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_TEMPERATURE

    @property
    def needs_token_counts(self) -> bool:
        """Whether sampling reads how often each token occurred (the three penalties)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def needs_prompt_tokens(self) -> bool:
        """Whether the runner needs the whole prompt (repetition penalty, prompt logprobs)."""
        return self.repetition_penalty != 1.0 or self.prompt_logprobs is not None

    @property
    def processes_logits(self) -> bool:
        """Anything beyond temperature and the top-k/top-p/min-p filters touches this row's logits."""
        return self.needs_token_counts or bool(self.logit_bias) or self.min_tokens > 0 or bool(self.allowed_token_ids)

    @property
    def min_tokens_stop_ids(self) -> tuple[int, ...]:
        """The token ids masked while the output is shorter than min_tokens."""
        eos = () if self.ignore_eos else self.eos_token_ids
        return tuple(dict.fromkeys(self.stop_token_ids + eos))

    @property
    def stop_holdback_chars(self) -> int:
        """Characters a stream must hold back: they may be the start of a stop string."""
        return max((len(s) for s in self.stop), default=1) - 1


def _bias_pairs(bias: Mapping[Any, Any]) -> tuple[tuple[int, float], ...]:
    pairs = []
    for key, value in bias.items():
        try:
            token_id = int(key)
            value = float(value)
        except (TypeError, ValueError):
            raise InvalidSamplingParam(
                "logit_bias", f"logit_bias keys must be token ids (integers), got {key!r}.") from None
        pairs.append((token_id, value))
    return tuple(sorted(pairs))


def generation_config_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling defaults a model's generation_config.json sets (vLLM's `--generation-config auto`).

    Only the keys vLLM reads: temperature, top_p, top_k, min_p, repetition_penalty, and
    max_new_tokens as max_tokens. Values that are not numbers are ignored.
    """
    defaults: dict[str, Any] = {}
    for key in GENERATION_CONFIG_KEYS:
        value = config.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            defaults[key] = int(value) if key == "top_k" else float(value)
    max_new = config.get("max_new_tokens")
    if isinstance(max_new, int) and not isinstance(max_new, bool) and max_new > 0:
        defaults["max_tokens"] = max_new
    return defaults
