"""Per-request sampling settings and their validation (torch-free).

The field names and defaults follow the OpenAI API and vLLM's SamplingParams, so the HTTP
layer maps request fields onto them one to one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fitserve.structured_params import StructuredOutputParams

GREEDY_TEMPERATURE = 0.0  # temperature at or below this samples the argmax


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
    # EOS ids of the model; filled by the engine from the generation config, not by clients.
    eos_token_ids: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
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

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_TEMPERATURE

    @property
    def stop_holdback_chars(self) -> int:
        """Characters a stream must hold back: they may be the start of a stop string."""
        return max((len(s) for s in self.stop), default=1) - 1
