"""One frozen, validated configuration tree; the only module that reads the environment.

A changed setting is a new object (`dataclasses.replace`). Values a user can get wrong
raise `ConfigError`, whose message is shown as it is, without a stack trace.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # served name of the embedded default model
DEFAULT_BLOCK_SIZE = 16  # tokens per KV block: vLLM's default, small enough to waste little
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30  # 1 GiB holds ~46k tokens of the default model in bf16
LOAD_FORMATS = ("auto", "gguf", "safetensors", "dummy")
DTYPES = ("auto", "bfloat16", "float16", "float32")
QUANTIZATIONS = (None, "fp8", "fp8_per_tensor")  # linear layers in one byte per weight (docs/quantization.md)
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")  # vLLM's names; auto = --dtype
DTYPE_ALIASES = {"bf16": "bfloat16", "half": "float16", "fp16": "float16", "float": "float32", "fp32": "float32"}


class ConfigError(ValueError):
    """A setting that cannot work; the message says what and which flag fixes it."""


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
               "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def parse_size_bytes(text: str | int) -> int:
    """'1GiB' -> 1073741824, '512M' -> 512000000, 4096 -> 4096."""
    if isinstance(text, int):
        return text
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ConfigError(f"Cannot read {text!r} as a size: use a number of bytes or e.g. 512MiB, 2GiB.")
    unit = (match.group(2) or "").upper().removesuffix("B")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Llama 3 style frequency scaling (`rope_type: llama3`); other types are rejected."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True, slots=True)
class ArchConfig:
    """The shapes of a Llama-architecture model, read from config.json or GGUF metadata."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = "LlamaForCausalLM"
    torch_dtype: str = "bfloat16"  # the checkpoint's own dtype
    qkv_bias: bool = False  # q, k and v projections carry a bias (Qwen2)
    qk_norm: bool = False  # an RMSNorm over head_dim on each q and k head, before rotary (Qwen3)

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ArchConfig:
        """Build from a Hugging Face config.json dict (transformers 4 or 5 layout)."""
        cfg = _lift_rope_parameters(cfg)
        arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"Architecture {arch!r} is not supported; fitserve serves {', '.join(SUPPORTED_ARCHITECTURES)}."
            )
        _refuse_unsupported_attention(arch, cfg)
        num_heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or _DEFAULT_HEAD_DIMS.get(arch) or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=cfg.get("rope_theta", 10000.0),
            rope_scaling=_parse_rope_scaling(cfg.get("rope_scaling")),
            max_position_embeddings=_max_positions(arch, cfg),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            architecture=arch,
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
            qkv_bias=arch == "Qwen2ForCausalLM",  # transformers' Qwen2 always has them
            qk_norm=arch == "Qwen3ForCausalLM",
        )

    def shard(self, tensor_parallel_size: int) -> ArchConfig:
        """One GPU's shapes under tensor parallelism: attention heads, KV heads and MLP columns
        divided by N (the same head_dim, hidden size and vocabulary on every rank)."""
        n = tensor_parallel_size
        if n == 1:
            return self
        counts = (("num_attention_heads", self.num_attention_heads),
                  ("num_key_value_heads", self.num_key_value_heads), ("intermediate_size", self.intermediate_size))
        indivisible = [f"{name} = {value}" for name, value in counts if value % n]
        if indivisible:
            common = math.gcd(*(value for _, value in counts))
            sizes = [str(d) for d in range(1, min(common, 64) + 1) if common % d == 0]
            raise ConfigError(
                f"--tensor-parallel-size {n} does not divide this model's {', '.join(indivisible)}: each GPU "
                f"holds 1/{n} of the attention heads, of the KV heads and of the MLP columns. "
                f"Sizes that divide them all: {', '.join(sizes)}."
            )
        return replace(self, num_attention_heads=self.num_attention_heads // n,
                       num_key_value_heads=self.num_key_value_heads // n,
                       intermediate_size=self.intermediate_size // n)

    @property
    def kv_elements_per_token(self) -> int:
        """K and V elements per token over all layers; times the KV dtype's size gives bytes."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim


SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           "Phi3ForCausalLM")

_DEFAULT_HEAD_DIMS = {"Qwen3ForCausalLM": 128}  # transformers' default for a config.json without head_dim


def _max_positions(arch: str, cfg: dict[str, Any]) -> int:
    """Phi-3's sliding window (Phi-3-mini-4k: 2047 of 4096) caps the context: up to the window,
    its attention is full attention, which fitserve computes."""
    max_positions = cfg.get("max_position_embeddings", 8192)
    window = cfg.get("sliding_window")
    return min(max_positions, window) if arch == "Phi3ForCausalLM" and window else max_positions


def _refuse_unsupported_attention(arch: str, cfg: dict[str, Any]) -> None:
    """Config switches of the Qwen configs that fitserve's attention does not implement (real
    Qwen2/2.5/3 checkpoints leave them off): serving them would give wrong numbers."""
    sliding = cfg.get("use_sliding_window") or "sliding_attention" in (cfg.get("layer_types") or ())
    if arch.startswith("Qwen") and sliding:
        raise ConfigError(f"{arch} with use_sliding_window (sliding-window attention) is not supported yet; "
                          "fitserve attends over the whole context.")
    if arch == "Qwen3ForCausalLM" and cfg.get("attention_bias"):
        raise ConfigError("Qwen3ForCausalLM with attention_bias is not supported (q, k, v and o biases).")
    rope = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
    partial = cfg.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ConfigError(f"{arch} with partial_rotary_factor {partial} (rotary on part of each head, as "
                          "Phi-4-mini) is not supported.")


def _lift_rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 writes `rope_parameters` {rope_type, rope_theta, factor, ...} in place of
    rope_theta / rope_scaling; lift them back to the keys of the 4.x layout."""
    params = cfg.get("rope_parameters")
    if not isinstance(params, dict):
        return cfg
    out = dict(cfg)
    if "rope_theta" in params:
        out.setdefault("rope_theta", params["rope_theta"])
    if params.get("rope_type", "default") != "default" and not out.get("rope_scaling"):
        out["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    return out


def _parse_rope_scaling(raw: dict[str, Any] | None) -> RopeScaling | None:
    if not raw:
        return None
    rope_type = raw.get("rope_type", raw.get("type"))
    if rope_type in (None, "default"):
        return None
    if rope_type != "llama3":
        raise ConfigError(f"rope_scaling type {rope_type!r} is not supported (only 'llama3').")
    return RopeScaling(
        factor=float(raw["factor"]),
        low_freq_factor=float(raw["low_freq_factor"]),
        high_freq_factor=float(raw["high_freq_factor"]),
        original_max_position_embeddings=int(raw["original_max_position_embeddings"]),
    )


@dataclass(frozen=True, slots=True)
class CacheConfig:
    block_size: int = DEFAULT_BLOCK_SIZE
    gpu_memory_utilization: float = 0.9  # vLLM's meaning: fraction of total device memory
    kv_cache_memory_bytes: int | None = None  # explicit KV size; the CPU default is DEFAULT_CPU_KV_CACHE_BYTES
    num_gpu_blocks_override: int | None = None  # exact block count, for tests and debugging
    kv_cache_dtype: str = "auto"  # vLLM's --kv-cache-dtype: auto (= --dtype) or fp8 (e4m3, 1 byte per element)
    enable_prefix_caching: bool = True  # vLLM's default: reuse the cached K/V of full blocks of a shared prefix

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}.")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"--block-size must be a power of two, got {self.block_size}.")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}.")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ConfigError("--kv-cache-memory-bytes must be positive.")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ConfigError("--num-gpu-blocks-override must be at least 1.")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 256  # requests in one step
    max_num_batched_tokens: int = 2048  # tokens fed in one step, prefill chunks and decodes together
    max_model_len: int | None = None  # None: the model's max_position_embeddings

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ConfigError(f"--max-num-seqs must be at least 1, got {self.max_num_seqs}.")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(f"--max-num-batched-tokens must be at least 1, got {self.max_num_batched_tokens}.")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"--max-model-len must be at least 2, got {self.max_model_len}.")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str | None = None  # None: the embedded default; else a folder, a .gguf file or a hub id
    served_model_name: str | None = None
    tokenizer: str | None = None  # a folder or hub id; None: the model's own
    load_format: str = "auto"
    dtype: str = "auto"
    device: str = "auto"  # "auto": cuda when available, else cpu
    seed: int = 0
    enforce_eager: bool = False  # vLLM's name: no CUDA graphs, every step launched from Python
    # vLLM's name: detokenize a step's tokens while the GPU runs the next one (CUDA only).
    disable_async_output_proc: bool = False
    # vLLM's name: plan step n+1 while step n runs (CUDA with one GPU; off elsewhere).
    async_scheduling: bool = True
    quantization: str | None = None  # vLLM's --quantization: None, fp8 (per-channel) or fp8_per_tensor
    # vLLM's --generation-config: "auto" (the model's generation_config.json gives sampling defaults),
    # "vllm" (ignore it), or a folder holding a generation_config.json.
    generation_config: str = "auto"
    max_logprobs: int = 20  # vLLM's --max-logprobs: most (top) logprobs a request may ask for per token
    tensor_parallel_size: int = 1  # vLLM's -tp: GPUs (processes) one model is split over (docs/parallelism.md)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    hf_offline: bool = field(default_factory=lambda: _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE"))

    def __post_init__(self) -> None:
        if self.load_format not in LOAD_FORMATS:
            raise ConfigError(f"--load-format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}.")
        dtype = DTYPE_ALIASES.get(self.dtype, self.dtype)
        if dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
        object.__setattr__(self, "dtype", dtype)
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"--quantization must be fp8, fp8_per_tensor or left out, got {self.quantization!r}.")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}.")
        if self.max_logprobs < 0:
            raise ConfigError(f"--max-logprobs must be 0 or more, got {self.max_logprobs}.")
        if not self.generation_config:
            raise ConfigError("--generation-config must be auto, vllm or a folder with a generation_config.json.")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ConfigError(f"--tensor-parallel-size must be 1 or more, got {self.tensor_parallel_size!r}.")

    @property
    def model_name(self) -> str:
        """The name clients use in the `model` field."""
        if self.served_model_name:
            return self.served_model_name
        return self.model or DEFAULT_MODEL_NAME


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hf_home_hint() -> str:
    """Where the Hugging Face cache lives, for error messages."""
    return os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
    )


# -- the HTTP server ------------------------------------------------------------------------------

API_KEY_ENV = "FITSERVE_API_KEY"  # comma-separated keys, used when no --api-key is given
DEFAULT_MAX_REQUEST_BODY_BYTES = 16 * 2**20  # a 128k-token prompt as JSON token ids is ~1 MiB
# Fits inside Kubernetes' default 30 s termination grace period, with room to close connections.
DEFAULT_SHUTDOWN_TIMEOUT_S = 25.0
MIN_REQUEST_BODY_BYTES = 1024  # below this even a one-line chat request would be refused


def ray_address() -> str | None:
    """$RAY_ADDRESS: the Ray cluster `fitserve serve --replicas` joins (docs/scale-out.md); None: start one."""
    return os.environ.get("RAY_ADDRESS") or None


def _env_api_keys() -> tuple[str, ...]:
    return tuple(key.strip() for key in os.environ.get(API_KEY_ENV, "").split(",") if key.strip())


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """What `fitserve serve` sets around the engine: exposure, limits, lifecycle."""

    api_keys: tuple[str, ...] = field(default_factory=_env_api_keys)  # any one opens /v1/*; () = open
    metrics_api_key: str | None = None  # None: /metrics is public
    allowed_origins: tuple[str, ...] = ("*",)  # CORS, with vLLM's defaults
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    request_timeout_s: float | None = None  # from arrival to last token; None: no limit
    max_queue_len: int | None = None  # requests waiting beyond --max-num-seqs; None: no limit
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S  # drain time after SIGTERM
    enable_log_requests: bool = False  # log prompts (token ids) and sampling settings
    max_log_len: int | None = None  # prompt tokens shown per logged request; None: all
    enable_ui: bool = True  # GET / and /ui: the built-in page (off: --disable-ui)
    strict: bool = False  # an unsupported request field is a 400 naming it (default: ignored, logged once)

    def __post_init__(self) -> None:
        if any(not key for key in self.api_keys):
            raise ConfigError("--api-key must not be empty.")
        if self.metrics_api_key == "":
            raise ConfigError("--metrics-api-key must not be empty.")
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise ConfigError(f"--request-timeout must be positive, got {self.request_timeout_s}.")
        if self.max_queue_len is not None and self.max_queue_len < 0:
            raise ConfigError(f"--max-queue-len must be 0 or more, got {self.max_queue_len}.")
        if self.max_request_body_bytes < MIN_REQUEST_BODY_BYTES:
            raise ConfigError(
                f"--max-request-body-bytes must be at least {MIN_REQUEST_BODY_BYTES}, got {self.max_request_body_bytes}."
            )
        if not self.shutdown_timeout_s >= 0:
            raise ConfigError(f"--shutdown-timeout must be 0 or more, got {self.shutdown_timeout_s}.")
        if self.max_log_len is not None and self.max_log_len < 0:
            raise ConfigError(f"--max-log-len must be 0 or more, got {self.max_log_len}.")
