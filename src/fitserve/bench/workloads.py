"""The benchmark workloads W1-W6 of BENCHMARKS.md, shared-prefix, custom overrides, and their requests.

Token-id prompts are drawn at random (seeded) from `[0, vocab_size)`, so a workload is the
same on any model, real or `--load-format dummy`. Chat prompts are random common English
words: their token counts are approximate, and the report uses the server's usage counts.
With `prefix_len` (vLLM's `--random-prefix-len`), every prompt starts with the same
`prefix_len` tokens (a shared system prompt) before its own `input_len` random ones.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

# Ids below this are in every Llama-family vocabulary (Llama 2: 32000, Llama 3: 128256,
# SmolLM2: 49152), so the same seed sends the same prompts to any of them.
DEFAULT_VOCAB_SIZE = 32000

# W5's short requests ("what is 2+2" while an essay streams) each generate this many tokens.
W5_SHORT_OUTPUT_TOKENS = 32

# Chat prompts: words that are one token each (with their leading space) in common BPE vocabularies.
CHAT_WORDS = (
    "the of and to in is was for on as with by at from his her they this that which an be are "
    "have had not but all were when we there can one been who more will their if out so up said "
    "what about into than them only other new some time could these two may first then do any like "
    "my now over such our man me even most made after also did many before must through back years "
    "where much your way well down should because each just those people how too little state good "
    "very make world still own see men work long get here between both life being under never day "
    "same another know while last might us great old year off come since against go came right used "
    "take three small water house city light music river paper table window garden winter summer"
).split()


@dataclass(frozen=True, slots=True)
class Workload:
    name: str                       # "W1".."W6", or "custom"
    description: str
    num_prompts: int                # requests sent (W5: 1 long + num_prompts - 1 short)
    max_concurrency: int | None     # requests in flight at most; None: no client-side limit
    input_len: int                  # prompt tokens (the mean when range_ratio > 0)
    output_len: int                 # output tokens (the mean when range_ratio > 0); W5: the long one
    range_ratio: float = 0.0        # lengths uniform in [len * (1 - r), len * (1 + r)], as vLLM's random dataset
    request_rate: float = math.inf  # mean arrivals per second; inf: all at once
    burstiness: float = 1.0         # gamma shape of the gaps between arrivals; 1: Poisson
    interference: bool = False      # W5: the short requests start once the long one streams
    prefix_len: int = 0             # tokens every prompt starts with (the same ones), before its input_len own
    server_note: str = ""           # what the server must be started with for this workload

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["request_rate"] = _json_rate(self.request_rate)
        return out


def _json_rate(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate


W1 = Workload("W1", "the seed guide's test: 100 requests, 20 concurrent", 100, 20, 512, 128)
WORKLOADS: dict[str, Workload] = {
    "W1": W1,
    "W2": Workload("W2", "saturated throughput", 1000, 256, 512, 128),
    "W3": Workload("W3", "long prompts (prefill-heavy, RAG-like)", 200, 32, 3072, 64),
    "W4": Workload("W4", "long generations (decode-heavy, chat essays)", 200, 64, 128, 1024),
    "W5": Workload("W5", "one 1024-token generation, then 20 short requests (32 tokens) arriving while it runs",
                   21, None, 64, 1024, interference=True),
    "W6": dataclasses.replace(
        W1, name="W6", description="W1 on a 20 GB budget",
        server_note="start the server with --gpu-memory-utilization = 18 GiB / the card's total memory"),
    "shared-prefix": Workload("shared-prefix", "one system prompt (prefix_len tokens) shared by every request, "
                              "then input_len tokens of its own (prefix caching)", 100, 8, 32, 32, prefix_len=1000,
                              server_note="compare --enable-prefix-caching (the default) with "
                                          "--no-enable-prefix-caching"),
}
CUSTOM = Workload("custom", "custom", 100, None, 512, 128)


class WorkloadError(ValueError):
    """A workload setting a user can get wrong (the message names the flag)."""


def resolve_workload(name: str | None, **overrides) -> Workload:
    """W1..W6 by name (case-insensitive) or `custom`; overrides that are not None replace its fields."""
    key = (name or "custom").upper()
    by_key = {k.upper(): w for k, w in WORKLOADS.items()}
    if key == "CUSTOM":
        base = CUSTOM
    elif key in by_key:
        base = by_key[key]
    else:
        raise WorkloadError(f"unknown workload {name!r}: use one of {', '.join(WORKLOADS)} or custom")
    workload = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    check_workload(workload)
    return workload


def check_workload(w: Workload) -> None:
    if w.num_prompts < 1 or (w.interference and w.num_prompts < 2):
        raise WorkloadError(f"--num-prompts must be at least {2 if w.interference else 1}, not {w.num_prompts}")
    if w.input_len < 1 or w.output_len < 1:
        raise WorkloadError("--input-len and --output-len must be at least 1")
    if w.prefix_len < 0:
        raise WorkloadError(f"--prefix-len must be 0 or more, not {w.prefix_len}")
    if not 0.0 <= w.range_ratio < 1.0:
        raise WorkloadError(f"--range-ratio must be in [0, 1), not {w.range_ratio}")
    if w.max_concurrency is not None and w.max_concurrency < 1:
        raise WorkloadError(f"--max-concurrency must be at least 1, not {w.max_concurrency}")
    if not w.request_rate > 0 or not w.burstiness > 0:
        raise WorkloadError("--request-rate and --burstiness must be positive")


@dataclass(frozen=True, slots=True)
class RequestSpec:
    index: int                         # position in the workload
    prompt: list[int] | str            # token ids (completions) or text (chat)
    prompt_len: int                    # tokens sent, the shared prefix included (chat: words, an estimate)
    output_len: int                    # max_tokens; exact with ignore_eos
    role: str = "main"                 # W5: "long" or "short"


def sample_lengths(mean_len: int, range_ratio: float, count: int, rng: np.random.Generator) -> list[int]:
    """Uniform integers in [floor(mean * (1 - r)), ceil(mean * (1 + r))], at least 1."""
    low = max(1, math.floor(mean_len * (1.0 - range_ratio)))
    high = max(low, math.ceil(mean_len * (1.0 + range_ratio)))
    return [int(n) for n in rng.integers(low, high + 1, size=count)]


def make_prompt(num_tokens: int, chat: bool, vocab_size: int, rng: np.random.Generator,
                prefix: list[int] | str = "") -> list[int] | str:
    """`prefix` followed by `num_tokens` random tokens (chat: words)."""
    if chat:
        words = " ".join(CHAT_WORDS[i] for i in rng.integers(0, len(CHAT_WORDS), size=num_tokens))
        return f"{prefix} {words}" if prefix else words
    return list(prefix or []) + [int(t) for t in rng.integers(0, vocab_size, size=num_tokens)]


def build_requests(w: Workload, *, seed: int, chat: bool = False,
                   vocab_size: int = DEFAULT_VOCAB_SIZE) -> list[RequestSpec]:
    """The workload's requests, the same for the same seed; W5's long request comes first."""
    rng = np.random.default_rng(seed)
    input_lens = sample_lengths(w.input_len, w.range_ratio, w.num_prompts, rng)
    # Drawn from a generator of its own, so prefix_len leaves the rest of the workload unchanged.
    prefix = make_prompt(w.prefix_len, chat, vocab_size, np.random.default_rng([seed, 1])) if w.prefix_len else ""
    if w.interference:
        output_lens = [w.output_len] + [W5_SHORT_OUTPUT_TOKENS] * (w.num_prompts - 1)
        roles = ["long"] + ["short"] * (w.num_prompts - 1)
    else:
        output_lens = sample_lengths(w.output_len, w.range_ratio, w.num_prompts, rng)
        roles = ["main"] * w.num_prompts
    return [
        RequestSpec(i, make_prompt(n_in, chat, vocab_size, rng, prefix), w.prefix_len + n_in, n_out, role)
        for i, (n_in, n_out, role) in enumerate(zip(input_lens, output_lens, roles))
    ]


def arrival_offsets_s(count: int, request_rate: float, burstiness: float,
                      rng: np.random.Generator) -> list[float]:
    """When each request is sent, in seconds from the start.

    Gaps are gamma-distributed with shape `burstiness` and mean 1 / rate (exponential, so a
    Poisson process, at burstiness 1; burstier below 1, more regular above). The offsets are
    rescaled so the last one is at count / rate, so runs with different seeds offer the same load.
    """
    if math.isinf(request_rate):
        return [0.0] * count
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=count)
    offsets = np.cumsum(gaps)
    offsets *= (count / request_rate) / offsets[-1]
    return [float(t) for t in offsets]
