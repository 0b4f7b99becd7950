"""One frozen, validated configuration tree; the only module that reads the environment.

A changed setting is a new object (`dataclasses.replace`). Values a user can get wrong
raise `ConfigError`, whose message is shown as it is, without a stack trace.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # served name of the embedded default model
DEFAULT_BLOCK_SIZE = 16  # tokens per KV block: vLLM's default, small enough to waste little
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30  # 1 GiB holds ~46k tokens of the default model in bf16
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default: the rest is left to the CUDA context and other processes
DEFAULT_MAX_NUM_SEQS = 256  # vLLM's default requests per step
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048  # vLLM's default token budget per step (chunked prefill)
DEFAULT_MAX_LOGPROBS = 20  # vLLM's --max-logprobs default (and OpenAI's top_logprobs maximum)
LOAD_FORMATS = ("auto", "gguf", "safetensors", "dummy")
DTYPES = ("auto", "bfloat16", "float16", "float32")
CPU_COMPILE_MODES = ("auto", "off", "decode", "aot")  # runner/cpu_compile.py, runner/cpu_aot.py
CPU_COMPILE_ENV = "FITSERVE_CPU_COMPILE"  # the default of --cpu-compile where the flag is left out
# fp8: linear layers in one byte per weight; gguf: a .gguf file's blocks kept packed; gptq, awq,
# compressed-tensors: an integer checkpoint served as stored (docs/quantization.md). With
# --load-format dummy, a packed value makes random weights in that layout (weights/dummy_layouts.py).
QUANTIZATIONS = (None, "fp8", "fp8_per_tensor", "gguf", "gptq", "awq", "compressed-tensors")
INT_QUANTIZATIONS = ("gptq", "awq", "compressed-tensors")  # integer checkpoints (weights/int_checkpoint.py)
# vLLM's names for its Marlin kernels over the same checkpoints: fitserve reads them one way
QUANTIZATION_ALIASES = {"gptq_marlin": "gptq", "awq_marlin": "awq"}
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # vLLM's names; auto = --dtype; fp8 = fp8_e4m3
# vLLM's other fp8 KV format; the KV store and attention kernels read and write e4m3 only.
UNSUPPORTED_KV_CACHE_DTYPES = {
    "fp8_e5m2": "--kv-cache-dtype fp8_e5m2 is not supported: fitserve's fp8 KV cache is e4m3 (float8_e4m3fn, "
                "more mantissa, scaled per layer). Use --kv-cache-dtype fp8 (or fp8_e4m3).",
}
DTYPE_ALIASES = {"bf16": "bfloat16", "half": "float16", "fp16": "float16", "float": "float32", "fp32": "float32"}


class ConfigError(ValueError):
    """A setting that cannot work; the message says what and which flag fixes it."""


# -- command-line flags: declared on the field they set (fitserve/flags.py builds the parsers) ----

FLAG_KEY = "flag"  # the dataclasses.field metadata key that holds a field's Flag
FLAG_KINDS = ("value", "switch", "on_off", "disable", "words")


@dataclass(frozen=True, slots=True)
class Flag:
    """A config field's command-line flag, with vLLM's name where vLLM has one.

    kind: "value" (one value; absent: the field's default), "switch" (present: True),
    "on_off" (--x / --no-x), "disable" (--disable-x: present sets the field False),
    "words" (one or more words; repeats add more).
    """

    names: tuple[str, ...]  # the long name first, then aliases: ("--tensor-parallel-size", "-tp")
    help: str
    kind: str = "value"
    type: Callable[[str], Any] | None = None  # argparse's type: int, float; None: the text as given
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    convert: Callable[[Any], Any] | None = None  # the parsed value -> the field's (a size, a list)

    def __post_init__(self) -> None:
        assert self.kind in FLAG_KINDS and self.names[0].startswith("--"), self

    @property
    def dest(self) -> str:
        """The attribute argparse stores the value in (its own rule for the first long name)."""
        return self.names[0].removeprefix("--").replace("-", "_")


def flag(*names: str, help: str, kind: str = "value", type: Callable[[str], Any] | None = None,
         choices: tuple[str, ...] | None = None, metavar: str | None = None,
         convert: Callable[[Any], Any] | None = None) -> dict[str, Flag]:
    """`field(metadata=flag(...))`: the one declaration of a flag."""
    return {FLAG_KEY: Flag(names, help, kind, type, choices, metavar, convert)}


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
class CacheConfig:
    block_size: int = field(default=DEFAULT_BLOCK_SIZE, metadata=flag(
        "--block-size", type=int, help="tokens per KV-cache block"))
    # vLLM's meaning: a fraction of the device's total memory, not of its free memory.
    gpu_memory_utilization: float = field(default=DEFAULT_GPU_MEMORY_UTILIZATION, metadata=flag(
        "--gpu-memory-utilization", type=float,
        help="fraction of the GPU's total memory this server may use (weights, activations, KV)"))
    kv_cache_memory_bytes: int | None = field(default=None, metadata=flag(  # the CPU's: DEFAULT_CPU_KV_CACHE_BYTES
        "--kv-cache-memory-bytes", convert=parse_size_bytes, help="KV cache size, e.g. 2GiB; on the CPU the default is 1GiB"))
    num_gpu_blocks_override: int | None = field(default=None, metadata=flag(  # for tests and debugging
        "--num-gpu-blocks-override", type=int, help="exact number of KV blocks"))
    kv_cache_dtype: str = field(default="auto", metadata=flag(
        # No argparse choices: CacheConfig's own check names what is refused and why (fp8_e5m2).
        "--kv-cache-dtype", metavar="{" + ",".join(KV_CACHE_DTYPES) + "}",
        help="auto (= --dtype) or fp8 (e4m3, one byte per element, a scale per layer: 1.0 or the checkpoint's)"))
    enable_prefix_caching: bool = field(default=True, metadata=flag(
        "--enable-prefix-caching", kind="on_off",
        help="reuse the KV cache of full blocks shared with earlier requests (a common system prompt is computed "
             "once); on by default, --no-enable-prefix-caching turns it off (docs/prefix-caching.md)"))

    def __post_init__(self) -> None:
        if self.kv_cache_dtype in UNSUPPORTED_KV_CACHE_DTYPES:
            raise ConfigError(UNSUPPORTED_KV_CACHE_DTYPES[self.kv_cache_dtype])
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
    max_num_seqs: int = field(default=DEFAULT_MAX_NUM_SEQS, metadata=flag(
        "--max-num-seqs", type=int, help="requests batched in one step"))
    max_num_batched_tokens: int = field(default=DEFAULT_MAX_NUM_BATCHED_TOKENS, metadata=flag(
        "--max-num-batched-tokens", type=int, help="tokens fed in one step (prefill chunks and decodes together)"))
    max_model_len: int | None = field(default=None, metadata=flag(  # None: the model's max_position_embeddings
        "--max-model-len", type=int, help="prompt + output tokens per request"))

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ConfigError(f"--max-num-seqs must be at least 1, got {self.max_num_seqs}.")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(f"--max-num-batched-tokens must be at least 1, got {self.max_num_batched_tokens}.")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"--max-model-len must be at least 2, got {self.max_model_len}.")


def read_chat_template(value: str) -> str:
    """--chat-template's template: a file's text, or the value itself when it holds Jinja (as vLLM reads
    it). ConfigError for a path that does not exist or a template Jinja cannot parse."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as handle:
            template = handle.read()
    elif "{{" in value or "{%" in value:
        template = value
    else:
        raise ConfigError(f"--chat-template: {value!r} is no file, nor a template (no {{{{ or {{% in it).")
    import jinja2  # a dependency of transformers' chat templates

    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"--chat-template does not parse: {exc.message} (line {exc.lineno}).") from None
    return template


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str | None = field(default=None, metadata=flag(
        "--model", help="a Hugging Face folder, a .gguf file or a hub id; default: the embedded SmolLM2-135M-Instruct"))
    served_model_name: str | None = field(default=None, metadata=flag(
        "--served-model-name", help="the name clients send as `model`"))
    tokenizer: str | None = field(default=None, metadata=flag(
        "--tokenizer", help="a tokenizer folder or hub id, if not the model's own"))
    download_dir: str | None = field(default=None, metadata=flag(
        "--download-dir", help="where a hub model is downloaded and looked for (vLLM's flag; default: the "
                               "Hugging Face cache, $HF_HUB_CACHE or $HF_HOME/hub)"))
    revision: str | None = field(default=None, metadata=flag(
        "--revision", help="the hub model's branch, tag or commit (default: main)"))
    chat_template: str | None = field(default=None, metadata=flag(
        "--chat-template", help="a Jinja chat template file, or the template itself, used instead of the "
                                "model's (vLLM's flag); read and checked at start-up"))
    load_format: str = field(default="auto", metadata=flag(
        "--load-format", choices=LOAD_FORMATS,
        help="'dummy' builds random weights from the model's config.json, for benchmarks"))
    dtype: str = field(default="auto", metadata=flag(
        "--dtype", help="auto (bfloat16), bfloat16, float16 or float32"))
    device: str = field(default="auto", metadata=flag("--device", help="auto (cuda if available), cpu or cuda"))
    cpu_threads: int = field(default=0, metadata=flag(  # runner/cpu_settings.py
        "--cpu-threads", type=int,
        help="torch's intra-op threads on the CPU path (0: torch's default, one per core; docs/benchmarks.md)"))
    cpu_compile: str = field(default_factory=lambda: os.environ.get(CPU_COMPILE_ENV) or "auto", metadata=flag(
        "--cpu-compile", choices=CPU_COMPILE_MODES,
        help="the CPU's decode-only steps. aot: an AOTInductor package of the step, built once into "
             "$TORCHINDUCTOR_CACHE_DIR (default ~/.cache/fitserve/inductor) by a child process while eager steps "
             "serve, and loaded in seconds at later start-ups; decode: torch.compile'd at every start-up, cached "
             "in that folder; off: eager; auto (the default, or $FITSERVE_CPU_COMPILE): aot, off with "
             "--tensor-parallel-size (docs/benchmarks.md)"))
    seed: int = field(default=0, metadata=flag(
        "--seed", type=int, help="seed of the sampler for requests without a seed"))
    enforce_eager: bool = field(default=False, metadata=flag(
        "--enforce-eager", kind="switch",
        help="no CUDA graphs: launch every decode step from Python (slower; for debugging)"))
    disable_async_output_proc: bool = field(default=False, metadata=flag(  # CUDA only
        "--disable-async-output-proc", kind="switch",
        help="detokenize each step between steps instead of while the GPU runs the next one"))
    async_scheduling: bool = field(default=True, metadata=flag(  # CUDA with one GPU; off elsewhere
        "--async-scheduling", kind="on_off",
        help="plan and launch each step before the last one's tokens are read, so host work overlaps the GPU "
             "(CUDA on one GPU; on by default, --no-async-scheduling turns it off)"))
    quantization: str | None = field(default=None, metadata=flag(
        "--quantization", choices=(*(q for q in QUANTIZATIONS if q), *QUANTIZATION_ALIASES),
        help="fp8: linear layers quantized at load to e4m3, per-channel weight and per-token activation scales; "
             "fp8_per_tensor: one scale per tensor; a checkpoint stored in fp8 picks its own unless given; "
             "gguf: a .gguf model's quantized blocks kept packed in memory (the default for a .gguf on CUDA); "
             "gptq, awq, compressed-tensors (gptq_marlin, awq_marlin: the same): must agree with the checkpoint's "
             "quantization_config, which is served as stored even when left out; with --load-format dummy, "
             "random weights in that layout (docs/quantization.md)"))
    generation_config: str = field(default="auto", metadata=flag(
        "--generation-config",
        help="auto: the model's generation_config.json gives defaults (temperature, top_p, top_k, min_p, "
             "repetition_penalty, max_new_tokens) for fields a request leaves unset; vllm: ignore it; "
             "or a folder with a generation_config.json"))
    max_logprobs: int = field(default=DEFAULT_MAX_LOGPROBS, metadata=flag(
        "--max-logprobs", type=int, help="most logprobs / top_logprobs a request may ask for per token (more: 400)"))
    tensor_parallel_size: int = field(default=1, metadata=flag(  # docs/parallelism.md
        "--tensor-parallel-size", "-tp", type=int,
        help="split the model over this many GPUs, one process each, started by fitserve (attention heads and "
             "MLP columns; docs/parallelism.md)"))
    # None: on with one CUDA GPU, where it measured faster (docs/engine_process.md), off on the CPU, with
    # tensor parallelism and with --replicas (EngineConfig.uses_engine_process)
    engine_process: bool | None = field(default=None, metadata=flag(  # docs/engine_process.md
        "--engine-process", kind="on_off",
        help="run the engine core (scheduler, KV cache, model) in its own process, the HTTP API in this one, "
             "so that streaming work never slows the step loop (default: on with one GPU, off on the CPU and "
             "with --tensor-parallel-size; not with --replicas)"))
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
        object.__setattr__(self, "quantization", QUANTIZATION_ALIASES.get(self.quantization, self.quantization))
        if self.cpu_threads < 0:
            raise ConfigError(f"--cpu-threads must be 0 (torch's default) or more, got {self.cpu_threads}.")
        if self.cpu_compile not in CPU_COMPILE_MODES:
            raise ConfigError(f"--cpu-compile must be one of {', '.join(CPU_COMPILE_MODES)}, got {self.cpu_compile!r}.")
        if self.quantization not in QUANTIZATIONS:
            names = ", ".join((*(q for q in QUANTIZATIONS if q), *QUANTIZATION_ALIASES))
            raise ConfigError(f"--quantization must be one of {names}, or left out; got {self.quantization!r}.")
        if self.cpu_compile == "aot" and self.tensor_parallel_size > 1:  # one process's step, one builder child
            raise ConfigError("--cpu-compile aot packages one process's decode step: leave out --tensor-parallel-size "
                              "or --cpu-compile.")
        if self.quantization == "gguf" and self.tensor_parallel_size > 1:
            raise ConfigError(
                "--quantization gguf runs on one GPU: leave out --tensor-parallel-size or --quantization.")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}.")
        if self.max_logprobs < 0:
            raise ConfigError(f"--max-logprobs must be 0 or more, got {self.max_logprobs}.")
        if not self.generation_config:
            raise ConfigError("--generation-config must be auto, vllm or a folder with a generation_config.json.")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ConfigError(f"--tensor-parallel-size must be 1 or more, got {self.tensor_parallel_size!r}.")
        if self.chat_template is not None:
            object.__setattr__(self, "chat_template", read_chat_template(self.chat_template))

    def uses_engine_process(self, on_cuda: bool) -> bool:
        """--engine-process, or by default: on with one CUDA GPU (an H200's W2 through HTTP took 19.8 s with
        it, 25.5 s without: docs/engine_process.md), off on the CPU and with tensor parallelism (where the
        core starts its workers itself, but the split is not measured yet)."""
        if self.engine_process is not None:
            return self.engine_process
        return on_cuda and self.tensor_parallel_size == 1

    @property
    def cpu_compile_mode(self) -> str:
        """--cpu-compile with auto resolved: aot for one process, off with tensor parallelism."""
        if self.cpu_compile == "auto":
            return "aot" if self.tensor_parallel_size == 1 else "off"
        return self.cpu_compile

    @property
    def model_name(self) -> str:
        """The name clients use in the `model` field."""
        if self.served_model_name:
            return self.served_model_name
        return self.model or DEFAULT_MODEL_NAME


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def inductor_cache_dir() -> str:
    """Where inductor keeps the compiled CPU decode step (--cpu-compile): $TORCHINDUCTOR_CACHE_DIR, else
    fitserve/inductor under the user's cache dir ($XDG_CACHE_HOME or ~/.cache), so a restart reuses it."""
    return os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fitserve", "inductor")


def openmp_threads_sleep() -> bool:
    """OpenMP's threads sleep between ops: OMP_WAIT_POLICY=PASSIVE and no spin count (the user's choice for
    a shared machine; fitserve's default adds GOMP_SPINCOUNT=1000, fitserve/__init__.py), where
    runner/cpu_settings.py StepThreads saves their wake-ups."""
    return os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" and "GOMP_SPINCOUNT" not in os.environ


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
# The work one request may create (docs/reliability.md, "Request caps"); every prompt and choice
# of a request is an engine request, counted before anything is tokenized.
DEFAULT_MAX_N = 128  # choices (`n`) per request: OpenAI's own limit
DEFAULT_MAX_PROMPTS_PER_REQUEST = 256  # prompts in one completions `prompt` list
DEFAULT_MAX_CHOICES_PER_REQUEST = 256  # n x prompts: the engine requests one HTTP request creates
DEFAULT_MAX_PROMPT_TOKENS_PER_REQUEST = 262_144  # all of a request's prompts together: two 128k contexts
DEFAULT_TIMEOUT_KEEP_ALIVE_S = 5.0  # vLLM's and uvicorn's: an idle kept-alive connection is closed after this
DEFAULT_TIMEOUT_HEADER_S = 10.0  # request line and headers, from the first byte (or the connection) on
DEFAULT_TIMEOUT_BODY_S = 60.0  # a whole body after its headers: 16 MiB at about 2 Mbit/s
DEFAULT_MAX_CONNECTIONS = 1024  # open HTTP connections; lowered to fit under the open-file limit at start-up


def ray_address() -> str | None:
    """$RAY_ADDRESS: the Ray cluster `fitserve serve --replicas` joins (docs/scale-out.md); None: start one."""
    return os.environ.get("RAY_ADDRESS") or None


def _env_api_keys() -> tuple[str, ...]:
    return tuple(key.strip() for key in os.environ.get(API_KEY_ENV, "").split(",") if key.strip())


def _words_or_json(values: list[str]) -> tuple[str, ...]:
    """vLLM takes these lists either as words (`--allowed-origins a b`) or as one JSON list."""
    items: list[str] = []
    for value in values:
        if value.lstrip().startswith("["):
            try:
                items.extend(str(item) for item in json.loads(value))
            except (json.JSONDecodeError, TypeError) as error:
                raise ConfigError(f"Cannot read {value!r} as a JSON list of strings: {error}.") from None
        else:
            items.append(value)
    return tuple(items)


REASONING_PARSER_NAMES = ("qwen3", "deepseek_r1")  # server/reasoning.py
TOOL_CALL_PARSER_NAMES = ("llama3_json", "hermes", "mistral")  # server/tool_parsers/


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """What `fitserve serve` sets around the engine: exposure, limits, lifecycle."""

    api_keys: tuple[str, ...] = field(default_factory=_env_api_keys, metadata=flag(  # any one opens /v1/*; () = open
        "--api-key", kind="words", convert=tuple,
        help=f"require one of these keys as `Authorization: Bearer` on /v1/* (else ${API_KEY_ENV}, comma-separated)"))
    metrics_api_key: str | None = field(default=None, metadata=flag(
        "--metrics-api-key", help="require this key on /metrics (default: public)"))
    allowed_origins: tuple[str, ...] = field(default=("*",), metadata=flag(  # CORS, with vLLM's defaults
        "--allowed-origins", kind="words", convert=_words_or_json, help="CORS origins (default: *)"))
    allowed_methods: tuple[str, ...] = field(default=("*",), metadata=flag(
        "--allowed-methods", kind="words", convert=_words_or_json, help="CORS methods (default: *)"))
    allowed_headers: tuple[str, ...] = field(default=("*",), metadata=flag(
        "--allowed-headers", kind="words", convert=_words_or_json, help="CORS headers (default: *)"))
    allow_credentials: bool = field(default=False, metadata=flag(
        "--allow-credentials", kind="switch", help="CORS: allow credentials"))
    request_timeout_s: float | None = field(default=None, metadata=flag(  # None: no limit
        "--request-timeout", type=float,
        help="seconds from arrival to the last token; later, the request is aborted (408)"))
    max_queue_len: int | None = field(default=None, metadata=flag(  # None: 8 x --max-num-seqs (AsyncEngine)
        "--max-queue-len", type=int,
        help="requests that may wait beyond --max-num-seqs; past it, 503 with Retry-After (default 8 x --max-num-seqs)"))
    max_request_body_bytes: int = field(default=DEFAULT_MAX_REQUEST_BODY_BYTES, metadata=flag(
        "--max-request-body-bytes", convert=parse_size_bytes,
        help=f"larger bodies get 413 (default {DEFAULT_MAX_REQUEST_BODY_BYTES // 2**20}MiB)"))
    shutdown_timeout_s: float = field(default=DEFAULT_SHUTDOWN_TIMEOUT_S, metadata=flag(  # drain time after SIGTERM
        "--shutdown-timeout", type=float,
        help="seconds to finish in-flight requests after SIGTERM before aborting them "
             f"(default {DEFAULT_SHUTDOWN_TIMEOUT_S:g})"))
    enable_log_requests: bool = field(default=False, metadata=flag(
        "--enable-log-requests", kind="switch",
        help="log each request's prompt token ids and settings (off: prompts are never logged)"))
    max_log_len: int | None = field(default=None, metadata=flag(  # None: all
        "--max-log-len", type=int, help="prompt tokens shown per logged request"))
    enable_ui: bool = field(default=True, metadata=flag(  # GET / and /ui: the built-in page
        "--disable-ui", kind="disable",
        help="serve no web page at / and /ui (the dashboard and chat playground, docs/ui.md)"))
    reasoning_parser: str | None = field(default=None, metadata=flag(  # None: the reply is all content
        "--reasoning-parser", choices=REASONING_PARSER_NAMES,
        help="put the reply's <think>...</think> in reasoning_content (qwen3: the model opens the tag; "
             "deepseek_r1: the prompt did)"))
    tool_call_parser: str = field(default="llama3_json", metadata=flag(
        "--tool-call-parser", choices=TOOL_CALL_PARSER_NAMES,
        help="the model's tool-call format: llama3_json (default), hermes (Hermes, Qwen2.5, Qwen3), mistral"))
    enable_auto_tool_choice: bool = field(default=False, metadata=flag(  # accepted for vLLM; auto works without it
        "--enable-auto-tool-choice", kind="switch",
        help="accepted for vLLM compatibility: tool_choice auto is always on in fitserve (docs/api.md)"))
    strict: bool = field(default=False, metadata=flag(
        "--strict", kind="switch",
        help="answer 400 to a request field fitserve does not support (default: ignore it and log it once; "
             "GET /v1/compat lists the fields)"))
    max_n: int = field(default=DEFAULT_MAX_N, metadata=flag(
        "--max-n", type=int, help=f"most choices (`n`) one request may ask for (default {DEFAULT_MAX_N})"))
    max_prompts_per_request: int = field(default=DEFAULT_MAX_PROMPTS_PER_REQUEST, metadata=flag(
        "--max-prompts-per-request", type=int,
        help=f"most prompts in one completions request (default {DEFAULT_MAX_PROMPTS_PER_REQUEST})"))
    max_choices_per_request: int = field(default=DEFAULT_MAX_CHOICES_PER_REQUEST, metadata=flag(
        "--max-choices-per-request", type=int,
        help=f"most n x prompts in one request (default {DEFAULT_MAX_CHOICES_PER_REQUEST})"))
    max_prompt_tokens_per_request: int = field(default=DEFAULT_MAX_PROMPT_TOKENS_PER_REQUEST, metadata=flag(
        "--max-prompt-tokens-per-request", type=int,
        help=f"most prompt tokens of all a request's prompts (default {DEFAULT_MAX_PROMPT_TOKENS_PER_REQUEST})"))
    trust_request_chat_template: bool = field(default=False, metadata=flag(  # else a request's template is a 400
        "--trust-request-chat-template", kind="switch",
        help="let a request replace the chat template (chat_template_kwargs.chat_template); it is rendered "
             "sandboxed, with a time and size limit (default: 400)"))
    timeout_keep_alive_s: float = field(default=DEFAULT_TIMEOUT_KEEP_ALIVE_S, metadata=flag(
        "--timeout-keep-alive", type=float,
        help=f"seconds an idle kept-alive connection stays open (default {DEFAULT_TIMEOUT_KEEP_ALIVE_S:g})"))
    timeout_header_s: float = field(default=DEFAULT_TIMEOUT_HEADER_S, metadata=flag(
        "--timeout-header", type=float,
        help=f"seconds for a request's line and headers to arrive (default {DEFAULT_TIMEOUT_HEADER_S:g})"))
    timeout_body_s: float = field(default=DEFAULT_TIMEOUT_BODY_S, metadata=flag(
        "--timeout-body", type=float,
        help=f"seconds for a request's body to arrive after its headers (default {DEFAULT_TIMEOUT_BODY_S:g})"))
    max_connections: int = field(default=DEFAULT_MAX_CONNECTIONS, metadata=flag(  # more: 503 and closed at once
        "--max-connections", type=int,
        help=f"open connections; more get 503 and are closed (default {DEFAULT_MAX_CONNECTIONS}, lowered below "
             "the open-file limit)"))
    api_server_count: int = field(default=1, metadata=flag(  # docs/engine_process.md; above 1: the engine process
        "--api-server-count", type=int,
        help="HTTP API processes sharing the port and one engine-core process (default 1; more spread the "
             "SSE framing of many streams over several cores; docs/engine_process.md)"))

    def __post_init__(self) -> None:
        if not isinstance(self.api_server_count, int) or self.api_server_count < 1:
            raise ConfigError(f"--api-server-count must be 1 or more, got {self.api_server_count!r}.")
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
        if self.reasoning_parser not in (None, *REASONING_PARSER_NAMES):
            raise ConfigError(f"--reasoning-parser must be one of {REASONING_PARSER_NAMES}, "
                              f"got {self.reasoning_parser!r}.")
        if self.tool_call_parser not in TOOL_CALL_PARSER_NAMES:
            raise ConfigError(f"--tool-call-parser must be one of {TOOL_CALL_PARSER_NAMES}, "
                              f"got {self.tool_call_parser!r}.")
        for flag, value in (("--max-n", self.max_n), ("--max-prompts-per-request", self.max_prompts_per_request),
                            ("--max-choices-per-request", self.max_choices_per_request),
                            ("--max-prompt-tokens-per-request", self.max_prompt_tokens_per_request)):
            if value < 1:
                raise ConfigError(f"{flag} must be at least 1, got {value}.")
        for flag, seconds in (("--timeout-keep-alive", self.timeout_keep_alive_s),
                              ("--timeout-header", self.timeout_header_s), ("--timeout-body", self.timeout_body_s)):
            if not seconds > 0:
                raise ConfigError(f"{flag} must be positive, got {seconds}.")
        if self.max_connections < 1:
            raise ConfigError(f"--max-connections must be at least 1, got {self.max_connections}.")
