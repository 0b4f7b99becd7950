"""LongRoPE rope scaling (`rope_type: longrope`, older alias "su"): Phi-3-mini-128k, Phi-3.5-mini,
Phi-3-medium-128k, Phi-4-mini. Torch-free: read from config.json (longrope_from_hf) or a GGUF file
(weights/gguf_phi3.py); layers/rotary.py builds the cos/sin table from it.

What it computes, as transformers' `_compute_longrope_parameters`: each inverse frequency divided by
its own extension factor, inv_freq[i] = 1 / (ext[i] * base^(2i/d)) over the d rotated dims of a head
(head_dim, or Phi-4-mini's partial rotary 96 of 128), with `ext` one of two lists of d/2 factors,
`short_factor` or `long_factor`; cos and sin multiplied by `attention_factor` (config.json's,
else sqrt(1 + ln(s) / ln(original)) with s = max_position_embeddings / original_max_position_embeddings,
or 1 when s <= 1).

Which list: transformers switches per forward pass, to the long factors once the sequence is longer
than original_max_position_embeddings (and recomputes the cache then). A paged KV cache already holds
keys rotated with the other list, so fitserve chooses once per server, as llama.cpp does: the long
factors when the served context (`--max-model-len`, `served_context_tokens`) is longer than
original_max_position_embeddings, else the short ones. So fitserve equals transformers for every
sequence when --max-model-len <= original_max_position_embeddings, and for sequences longer than
original_max_position_embeddings otherwise (shorter ones are then rotated with the long factors, as
llama.cpp does with a long context).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from fitserve.config import ConfigError

LONGROPE_TYPES = ("longrope", "su")  # "su": the name of Phi-3-mini-128k's first config.json
PHI3_ORIGINAL_MAX_POSITIONS = 4096  # transformers' Phi3Config default for original_max_position_embeddings


@dataclass(frozen=True, slots=True)
class LongRopeScaling:
    """The two factor lists and what picks between them (module docstring)."""

    short_factor: tuple[float, ...]  # [rotary_dim / 2] divisors of the inverse frequencies, short context
    long_factor: tuple[float, ...]  # [rotary_dim / 2] the same, long context
    original_max_position_embeddings: int  # tokens of the pre-training context
    attention_factor: float  # cos and sin are multiplied by it (with either list)
    # the context served, tokens: --max-model-len once start-up sets it (ArchConfig.served_at), until then
    # the config's max_position_embeddings (the default --max-model-len)
    served_context_tokens: int

    def __post_init__(self) -> None:
        for name in ("short_factor", "long_factor"):
            values = getattr(self, name)
            if not values or not all(math.isfinite(v) and v > 0 for v in values):
                raise ConfigError(f"LongRoPE rope scaling: {name} must be a non-empty list of positive numbers.")
        if self.original_max_position_embeddings < 1:
            raise ConfigError("LongRoPE rope scaling: original_max_position_embeddings must be at least 1, got "
                              f"{self.original_max_position_embeddings}.")
        assert self.served_context_tokens >= 1, "--max-model-len is at least 2 (config.py)"
        if not (math.isfinite(self.attention_factor) and self.attention_factor > 0):
            raise ConfigError(f"LongRoPE rope scaling: attention_factor must be positive, got {self.attention_factor}.")

    def check_rotary_dim(self, rotary_dim: int) -> None:
        """ConfigError unless each list has one factor per frequency of `rotary_dim` rotated dimensions
        (ArchConfig checks it against its head_dim)."""
        for name in ("short_factor", "long_factor"):
            if len(getattr(self, name)) != rotary_dim // 2:
                raise ConfigError(
                    f"LongRoPE rope scaling: {name} has {len(getattr(self, name))} entries, but the model rotates "
                    f"{rotary_dim} dimensions of each head, which need {rotary_dim // 2} (one per frequency).")

    @property
    def uses_long_factors(self) -> bool:
        return self.served_context_tokens > self.original_max_position_embeddings

    @property
    def ext_factors(self) -> tuple[float, ...]:
        """The list this server rotates with (module docstring)."""
        return self.long_factor if self.uses_long_factors else self.short_factor

    def served_at(self, max_model_len: int) -> LongRopeScaling:
        return replace(self, served_context_tokens=max_model_len)

    def describe(self) -> str:
        """One line for the start-up log: which list, and why."""
        which, relation = ("long", ">") if self.uses_long_factors else ("short", "<=")
        return (f"LongRoPE: the {which} factors, for a served context of {self.served_context_tokens} tokens "
                f"{relation} the {self.original_max_position_embeddings} of pre-training (attention factor "
                f"{self.attention_factor:.4f}); the choice is fixed for the server (docs/models.md)")


def default_attention_factor(max_position_embeddings: int, original_max_position_embeddings: int,
                             factor: float | None = None) -> float:
    """transformers' (and llama.cpp's converter's) default: sqrt(1 + ln(s) / ln(original)), s = `factor`
    or max / original; 1 when s <= 1."""
    if original_max_position_embeddings < 2:
        raise ConfigError("LongRoPE rope scaling: original_max_position_embeddings must be at least 2, got "
                          f"{original_max_position_embeddings}.")
    scale = factor if factor is not None else max_position_embeddings / original_max_position_embeddings
    if scale <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(scale) / math.log(original_max_position_embeddings))


def longrope_from_hf(raw: dict[str, Any], cfg: dict[str, Any]) -> LongRopeScaling:
    """From a Phi-3 config.json's rope_scaling (or transformers 5's lifted rope_parameters) `raw` and the
    whole config `cfg`. original_max_position_embeddings as transformers reads it for Phi-3: the
    config's top-level key, over rope_scaling's (Phi3Config's default, 4096, when the top level has none)."""
    max_positions = int(cfg.get("max_position_embeddings", 8192))
    original = cfg.get("original_max_position_embeddings", PHI3_ORIGINAL_MAX_POSITIONS)
    factors = {}
    for name in ("short_factor", "long_factor"):
        values = raw.get(name)
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
            raise ConfigError(f"rope_scaling of type {raw.get('rope_type', raw.get('type'))!r} needs {name}, a list "
                              f"of numbers (one per rotary frequency); got {values!r}.")
        factors[name] = tuple(float(v) for v in values)
    factor = raw.get("factor")
    attention = raw.get("attention_factor")
    if attention is None:
        attention = default_attention_factor(max_positions, int(original), None if factor is None else float(factor))
    return LongRopeScaling(factors["short_factor"], factors["long_factor"], int(original), float(attention),
                           served_context_tokens=max_positions)
