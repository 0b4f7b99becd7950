"""Composition root for the engine, and the offline API.

`build_engine(config)` is the one place where the torch side (weights, model, runner) meets
the torch-free engine: everything else receives what it needs as arguments.

    from fitserve.llm import LLM
    from fitserve.sampling_params import SamplingParams
    llm = LLM()                                   # the embedded SmolLM2-135M-Instruct
    outs = llm.generate(["The capital of France is"], SamplingParams(max_tokens=16, temperature=0))
    print(outs[0].text)
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

import torch

from fitserve.config import ConfigError, EngineConfig
from fitserve.core.interfaces import KVCapacity
from fitserve.core.scheduler import SchedulerLimits
from fitserve.engine.llm_engine import EngineLimits, LLMEngine
from fitserve.engine.metrics import EngineMetrics
from fitserve.engine.structured_output import GrammarCompiler
from fitserve.engine.tokenizer import Tokenizer
from fitserve.models.loader import load_model
from fitserve.plan.planner import MemoryPlan, PlanInputs, plan_memory, resolve_max_model_len
from fitserve.plan.shapes import model_param_counts, resolve_dtype
from fitserve.runner.memory import (
    TORCH_KV_DTYPES,
    DeviceMemory,
    StartupMemory,
    gpu_processes,
    read_device_memory,
    start_reading,
)
from fitserve.runner.model_runner import TorchModelRunner
from fitserve.runner.profiling import profile_activation_peak
from fitserve.sampling_params import SamplingParams, generation_config_defaults
from fitserve.weights.source import ModelSource, load_generation_config, resolve_model_source

logger = logging.getLogger(__name__)
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True, slots=True)
class BuiltEngine:
    engine: LLMEngine
    tokenizer: Tokenizer
    source: ModelSource
    model_name: str
    memory: StartupMemory | None = None  # planned and measured memory (None: no plan was made)
    # Sampling defaults from the model's generation_config.json (--generation-config), for unset fields.
    default_sampling_params: dict[str, object] | None = None


def resolve_device(config: EngineConfig) -> torch.device:
    """The device with an explicit index for CUDA ("cuda" alone means the current device)."""
    name = config.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for, but torch sees no CUDA device.")
        device = torch.device(name)
        return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def refuse_unsupported(config: EngineConfig) -> None:
    """Settings the planner knows but the engine does not run yet."""
    if config.cache.kv_cache_dtype == "fp8_e5m2":
        raise ConfigError(
            "--kv-cache-dtype fp8_e5m2 is not supported: fitserve's fp8 KV cache is e4m3 "
            "(float8_e4m3fn, more mantissa, scaled per layer). Use --kv-cache-dtype fp8 (or fp8_e4m3)."
        )


def plan_inputs(config: EngineConfig, source: ModelSource, max_model_len: int, device: torch.device,
                start: DeviceMemory | None) -> PlanInputs:
    folder = source.weights_path if source.kind == "hf" else None
    return PlanInputs(
        arch=source.arch, model_name=source.name, param_counts=model_param_counts(source.arch, folder),
        max_model_len=max_model_len, dtype=resolve_dtype(config.dtype), quantization=config.quantization,
        kv_cache_dtype=config.cache.kv_cache_dtype,
        device_total_bytes=None if start is None else start.total_bytes,
        device_free_bytes=None if start is None else start.free_bytes,
        gpu_name=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        gpu_memory_utilization=config.cache.gpu_memory_utilization,
        kv_cache_memory_bytes=config.cache.kv_cache_memory_bytes,
        num_gpu_blocks_override=config.cache.num_gpu_blocks_override,
        max_num_seqs=config.scheduler.max_num_seqs, max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
        block_size=config.cache.block_size, cuda_graphs=device.type == "cuda" and not config.enforce_eager,
    )


def plan_startup(config: EngineConfig, source: ModelSource, max_model_len: int, device: torch.device) -> StartupMemory:
    """The plan before any weight is read; a setting that cannot fit stops here (ConfigError)."""
    start = start_reading(device) if device.type == "cuda" else None
    planned = plan_memory(plan_inputs(config, source, max_model_len, device, start))
    if any(p.fatal and p.kind == "free_memory" for p in planned.problems):
        holders = gpu_processes(device)
        if holders:  # NVML can tell who holds the memory: add it to the paragraph
            raise ConfigError(f"{planned.problems[0].message} On the GPU now: {holders}.")
    planned.raise_if_fatal()
    for problem in planned.problems:
        logger.warning("%s", problem.message)
    return StartupMemory(planned=planned, start=start)


def size_after_profiling(memory: StartupMemory, model: torch.nn.Module, config: EngineConfig,
                         max_model_len: int, device: torch.device) -> MemoryPlan:
    """Measure weights, the activation peak and the memory outside torch; size the KV cache with them."""
    assert memory.start is not None
    after_load = read_device_memory(device)
    memory.weights_bytes = after_load.allocated_bytes - memory.start.allocated_bytes
    memory.profile = profile_activation_peak(
        model, model.arch, config.scheduler.max_num_batched_tokens, config.scheduler.max_num_seqs, max_model_len, device)
    memory.activation_peak_bytes = int(memory.profile["activation_peak_bytes"])
    after_profile = read_device_memory(device)
    memory.runtime_non_torch_bytes = after_profile.non_torch_bytes - memory.start.non_torch_bytes
    return memory.size_kv_cache()


def build_runner(memory: StartupMemory, config: EngineConfig, source: ModelSource, max_model_len: int,
                 device: torch.device, progress: bool) -> TorchModelRunner:
    """Load, measure, size the KV cache and build the runner; logs planned vs measured memory."""
    dtype = TORCH_DTYPES[memory.planned.inputs.dtype]
    model = load_model(source, dtype, device, progress=progress, quantization=config.quantization)
    measures = device.type == "cuda" and memory.planned.inputs.kv_cache_memory_bytes is None \
        and memory.planned.inputs.num_gpu_blocks_override is None
    sized = size_after_profiling(memory, model, config, max_model_len, device) if measures else memory.planned
    capacity = KVCapacity(sized.num_kv_blocks, config.cache.block_size)
    before_runner = read_device_memory(device) if device.type == "cuda" else None
    runner = TorchModelRunner(
        model, source.arch, capacity, TORCH_KV_DTYPES[sized.kv_dtype], device, config.seed,
        max_num_seqs=config.scheduler.max_num_seqs, max_model_len=max_model_len,
        use_cuda_graphs=not config.enforce_eager,
    )
    if before_runner is not None:
        memory.end = read_device_memory(device)
        graph_bytes = memory.end.used_bytes - before_runner.used_bytes - sized.kv_cache_bytes
        memory.cuda_graph_bytes = graph_bytes if memory.planned.inputs.cuda_graphs else None
        logger.info("Memory on %s:\n%s", memory.planned.inputs.gpu_name, memory.table())
    return runner


def build_engine(config: EngineConfig, progress: bool = True) -> BuiltEngine:
    start_s = time.monotonic()
    refuse_unsupported(config)
    source = resolve_model_source(config)
    device = resolve_device(config)
    max_model_len = resolve_max_model_len(config.scheduler.max_model_len, source.arch)
    memory = plan_startup(config, source, max_model_len, device)  # fails here, before any weight is read
    tokenizer = Tokenizer.from_source(source)
    runner = build_runner(memory, config, source, max_model_len, device, progress)
    capacity = runner.kv_capacity()
    scheduler_limits = SchedulerLimits(
        max_num_seqs=config.scheduler.max_num_seqs,
        max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
        max_model_len=max_model_len,
    )
    eos_ids = source.eos_token_ids or tuple(tokenizer.eos_token_ids)
    limits = EngineLimits(vocab_size=source.arch.vocab_size, eos_token_ids=eos_ids, scheduler=scheduler_limits,
                          max_logprobs=config.max_logprobs)
    sized = memory.sized or memory.planned
    metrics = EngineMetrics(max_model_len, cache_info={
        "block_size": str(capacity.block_size), "cache_dtype": config.cache.kv_cache_dtype,
        "gpu_memory_utilization": str(config.cache.gpu_memory_utilization),
        "num_gpu_blocks": str(capacity.num_blocks), "num_gpu_blocks_override": str(config.cache.num_gpu_blocks_override),
        "kv_cache_memory_bytes": str(sized.kv_cache_bytes), "enable_prefix_caching": "False",
    })
    # On a CPU the runner computes inside execute_async, so there is nothing to overlap with.
    async_output = device.type == "cuda" and not config.disable_async_output_proc
    grammar_compiler = GrammarCompiler(tokenizer.hf, source.arch.vocab_size, eos_ids)
    engine = LLMEngine(runner, tokenizer, limits, metrics=metrics, async_output=async_output,
                       grammar_compiler=grammar_compiler)
    logger.info(
        "Model %s on %s (%s) ready in %.1f s. KV cache: %d tokens (%d blocks of %d, %.2f GiB); "
        "maximum concurrency at --max-model-len %d: %.2fx",
        source.name, device, sized.inputs.dtype, time.monotonic() - start_s,
        capacity.num_tokens, capacity.num_blocks, capacity.block_size, sized.kv_cache_bytes / 2**30,
        max_model_len, capacity.num_tokens / max_model_len,
    )
    return BuiltEngine(engine, tokenizer, source, config.served_model_name or source.name, memory,
                       sampling_defaults(config, source))


def sampling_defaults(config: EngineConfig, source: ModelSource) -> dict[str, object]:
    """vLLM's --generation-config: the model's sampling defaults, logged once at start-up."""
    generation_config, path = load_generation_config(config.generation_config, source)
    defaults = generation_config_defaults(generation_config)
    if defaults:
        logger.info("Default sampling parameters from %s: %s. Requests that leave these fields unset use "
                    "them; --generation-config vllm ignores the file.", path,
                    ", ".join(f"{k}={v}" for k, v in defaults.items()))
    return defaults


@dataclass(frozen=True, slots=True)
class CompletionOutput:
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None


class LLM:
    """Offline batch generation on the same engine the server uses."""

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None, **config_fields: object) -> None:
        """LLM("path") or LLM(dtype="float32") build an EngineConfig; LLM(config=...) takes one whole."""
        if config is None:
            config = EngineConfig(model=model, **config_fields)
        elif model is not None or config_fields:
            raise TypeError("pass either config= or model and EngineConfig fields, not both")
        built = build_engine(config, progress=False)
        self.engine = built.engine
        self.tokenizer = built.tokenizer
        self.default_sampling_params = built.default_sampling_params or {}

    def generate(
        self, prompts: list[str] | list[list[int]] | str, params: SamplingParams | None = None
    ) -> list[CompletionOutput]:
        """Run every prompt (text, or token ids) to completion, batched; results in prompt order."""
        params = params or SamplingParams(**self.default_sampling_params)  # type: ignore[arg-type]
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        requests = []
        for prompt in prompt_list:
            token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            request = self.engine.make_request(uuid.uuid4().hex, token_ids, params)
            self.engine.add_request(request)
            requests.append(request)
        tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
        texts: dict[str, list[str]] = {r.request_id: [] for r in requests}
        finish: dict[str, str | None] = {}
        while self.engine.has_unfinished:
            for output in self.engine.step():
                tokens[output.request_id].extend(output.new_token_ids)
                texts[output.request_id].append(output.new_text)
                if output.finished:
                    finish[output.request_id] = output.finish_reason
        return [
            CompletionOutput(
                r.prompt_token_ids, tuple(tokens[r.request_id]), "".join(texts[r.request_id]), finish.get(r.request_id)
            )
            for r in requests
        ]
