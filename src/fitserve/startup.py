"""Start-up: the one path from an EngineConfig to a serving engine.

`build_engine(config)` plans (a setting that cannot fit stops before any weight is read), loads,
measures and sizes the KV cache: the one place where the torch side (weights, model, runner)
meets the torch-free engine. `start_serving_engine(...)` builds it and starts the AsyncEngine
that serves it (the model's generation_config.json defaults, the page's start-up info, telemetry
on every GPU of the engine); with --engine-process it starts the engine-core process instead,
which builds the engine with `build_core` (docs/engine_process.md). `fitserve serve` and each
`--replicas` replica (scaleout/replica.py) start with `start_serving_engine`, the offline `LLM`
(llm.py) with `build_engine`.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch

from fitserve.arch_config import ArchConfig
from fitserve.config import CacheConfig, ConfigError, EngineConfig, SchedulerConfig, inductor_cache_dir
from fitserve.core.interfaces import KVCapacity
from fitserve.core.scheduler import SchedulerLimits
from fitserve.engine.async_engine import AsyncEngine
from fitserve.engine.client import EngineClient
from fitserve.engine.core_client import start_core_client
from fitserve.engine.core_messages import CoreReady
from fitserve.engine.llm_engine import EngineLimits, LLMEngine
from fitserve.engine.metrics import EngineMetrics
from fitserve.engine.structured_output import GrammarCompiler
from fitserve.engine.tokenizer import Tokenizer
from fitserve.kernels.cpu_matmul import cpu_has_bf16_units
from fitserve.layers.formats.registry import get_weight_format
from fitserve.layers.parallel import SINGLE, TensorParallel
from fitserve.longrope import LongRopeScaling
from fitserve.models.loader import checkpoint_input_scales, linear_format, load_model
from fitserve.plan.planner import (
    MemoryPlan,
    PlanInputs,
    plan_memory,
    resolve_max_model_len,
)
from fitserve.plan.shapes import model_param_counts, resolve_dtype
from fitserve.runner.calibration import (
    calibrate_fp8_activation_scales,
    calibration_token_ids,
)
from fitserve.runner.cpu_aot import BUILD_HERE_ENV, cpp_compiler
from fitserve.runner.cpu_settings import log_cpu_matmul, set_cpu_threads
from fitserve.runner.distributed import WorkerGroup, start_workers, worker_device
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
from fitserve.sampling_params import generation_config_defaults
from fitserve.server.api_servers import model_tokenizer
from fitserve.server.ui.info import startup_info
from fitserve.telemetry import Telemetry
from fitserve.weights.fp8_checkpoint import with_checkpoint_quantization
from fitserve.weights.gguf_packed import gguf_param_counts, with_gguf_quantization
from fitserve.weights.source import (
    ModelSource,
    load_generation_config,
    resolve_model_source,
)

logger = logging.getLogger(__name__)
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True, slots=True)
class BuiltEngine:
    engine: LLMEngine
    tokenizer: Tokenizer
    source: ModelSource
    model_name: str
    device: torch.device  # rank 0's runner's; tensor-parallel workers use the GPUs after it
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


def plan_inputs(config: EngineConfig, source: ModelSource, max_model_len: int, device: torch.device,
                start: DeviceMemory | None) -> PlanInputs:
    folder = source.weights_path if source.kind == "hf" else None
    return PlanInputs(
        arch=source.arch, model_name=source.name,
        param_counts=source.param_counts() or gguf_param_counts(model_param_counts(source.arch, folder), source,
                                                                config.quantization),
        max_model_len=max_model_len, dtype=resolve_dtype(config.dtype), quantization=config.quantization,
        kv_cache_dtype=config.cache.kv_cache_dtype,
        device_total_bytes=None if start is None else start.total_bytes,
        device_free_bytes=None if start is None else start.free_bytes,
        gpu_name=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        gpu_memory_utilization=config.cache.gpu_memory_utilization,
        kv_cache_memory_bytes=config.cache.kv_cache_memory_bytes,
        num_gpu_blocks_override=config.cache.num_gpu_blocks_override,
        max_num_seqs=config.scheduler.max_num_seqs, max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
        block_size=config.cache.block_size, cuda_graphs=device.type == "cuda" and uses_cuda_graphs(config),
        tensor_parallel_size=config.tensor_parallel_size,
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
    for problem in planned.problems:  # the default sizes queue by design: a WARNING only for chosen ones
        chosen = problem.kind != "concurrency" or sizes_chosen(config)
        logger.log(logging.WARNING if chosen else logging.INFO, "%s", problem.message)
    return StartupMemory(planned=planned, start=start)


def sizes_chosen(config: EngineConfig) -> bool:
    """Whether the operator set a size that decides how many requests run at once (not all defaults)."""
    cache, scheduler = CacheConfig(), SchedulerConfig()
    return (config.scheduler.max_num_seqs, config.scheduler.max_model_len, config.cache.kv_cache_memory_bytes,
            config.cache.gpu_memory_utilization, config.cache.num_gpu_blocks_override) != (
        scheduler.max_num_seqs, scheduler.max_model_len, cache.kv_cache_memory_bytes,
        cache.gpu_memory_utilization, cache.num_gpu_blocks_override)


def size_after_profiling(memory: StartupMemory, model: torch.nn.Module, config: EngineConfig,
                         max_model_len: int, device: torch.device) -> MemoryPlan:
    """Measure weights, the activation peak and the memory outside torch; size the KV cache with them."""
    assert memory.start is not None
    after_load = read_device_memory(device)
    memory.weights_bytes = after_load.allocated_bytes - memory.start.allocated_bytes
    memory.profile = profile_activation_peak(
        model, model.arch, config.scheduler.max_num_batched_tokens, config.scheduler.max_num_seqs, max_model_len, device,
        with_sampling=model.tp.is_driver)
    memory.activation_peak_bytes = int(memory.profile["activation_peak_bytes"])
    after_profile = read_device_memory(device)
    memory.runtime_non_torch_bytes = after_profile.non_torch_bytes - memory.start.non_torch_bytes
    return memory.size_kv_cache()


def fp8_calibration_ids(quantization: str | None, tokenizer: Tokenizer,
                        source: ModelSource) -> list[list[int]] | None:
    """runner/calibration.py's texts in this model's tokens (half through its chat template if it
    has one) when `quantization` (fp8_per_tensor) calibrates static scales; else None (also when
    an fp8 checkpoint brings its own)."""
    if quantization != "fp8_per_tensor" or checkpoint_input_scales(source, quantization):
        return None
    chat = None
    if tokenizer.hf.chat_template:
        def chat(text: str) -> list[int]:
            return tokenizer.apply_chat_template([{"role": "user", "content": text}])
    return calibration_token_ids(tokenizer.encode, chat)


def build_runner(memory: StartupMemory, config: EngineConfig, source: ModelSource, max_model_len: int,
                 device: torch.device, progress: bool, tp: TensorParallel = SINGLE,
                 peers: WorkerGroup | None = None, report: Callable[[str], None] | None = None,
                 calibration_ids: list[list[int]] | None = None) -> TorchModelRunner:
    """Load, measure, size the KV cache and build this rank's runner; logs planned vs measured memory.
    `calibration_ids` (fp8_calibration_ids) set fp8_per_tensor's static scales.

    With tensor parallelism every rank runs this (rank 0 with the workers as `peers`, a worker
    with `report` to tell rank 0 where it is): all ranks load before the first collective (the
    profiling forward), and all take the smallest KV block count any rank can hold."""
    dtype = TORCH_DTYPES[memory.planned.inputs.dtype]
    model = load_model(source, dtype, device, progress=progress and tp.is_driver, quantization=config.quantization,
                       tp=tp)
    if (config.quantization or source.checkpoint_int) and tp.is_driver:
        weight_format = get_weight_format(linear_format(source, config.quantization, tp))
        logger.info("Linear layers: %s", weight_format.for_device(device).describe())
    if peers is not None:
        peers.wait_for("loaded")
    if report is not None:
        report("loaded")
    measures = device.type == "cuda" and not memory.planned.inputs.fixed_kv_cache
    error: ConfigError | None = None
    try:
        sized = size_after_profiling(memory, model, config, max_model_len, device) if measures else memory.planned
    except ConfigError as exc:  # the other ranks must still reach the agreement below
        error, sized = exc, memory.planned
    num_blocks = tp.min_over_ranks(0 if error is not None else sized.num_kv_blocks, device)
    if error is not None:
        raise error
    if num_blocks == 0 and peers is not None:
        peers.wait_for("ready")  # raises the rank's ConfigError that stopped start-up
    if calibration_ids is not None:
        # After the memory readings (its first GEMMs allocate cuBLAS workspaces, not weights) and
        # before the KV cache exists; on every rank, since the forward has collectives.
        num_layers = calibrate_fp8_activation_scales(model, calibration_ids, device)
        if tp.is_driver:
            logger.info("fp8_per_tensor: static input scales of %d layers calibrated on %d tokens of built-in text",
                        num_layers, sum(len(i) for i in calibration_ids))
    before_runner = read_device_memory(device) if device.type == "cuda" else None
    cpu_compile = cpu_compile_mode(config, device)
    runner = TorchModelRunner(
        model, model.arch, KVCapacity(num_blocks, config.cache.block_size), TORCH_KV_DTYPES[sized.kv_dtype], device,
        config.seed, max_num_seqs=config.scheduler.max_num_seqs, max_model_len=max_model_len,
        use_cuda_graphs=uses_cuda_graphs(config),
        cpu_compile=cpu_compile, cpu_compile_cache_dir=inductor_cache_dir(),
        cpu_package_builder=partial(build_cpu_package_in_child, config) if cpu_compile == "aot" else None,
    )
    if before_runner is not None:
        memory.end = read_device_memory(device)
        graph_bytes = memory.end.used_bytes - before_runner.used_bytes - sized.kv_block_bytes * num_blocks
        memory.cuda_graph_bytes = graph_bytes if memory.planned.inputs.cuda_graphs else None
        if tp.is_driver:
            logger.info("Memory on %s:\n%s", memory.planned.inputs.gpu_name, memory.table())
    return runner


def uses_cuda_graphs(config: EngineConfig) -> bool:
    """Decode graphs unless --enforce-eager; not yet with tensor parallelism: capturing NCCL's
    all-reduce (torch.distributed) inside a graph hung on the 2 x H200 test machine, while the
    same ranks run eagerly (docs/parallelism.md)."""
    return not config.enforce_eager and config.tensor_parallel_size == 1


def build_worker_runner(tp: TensorParallel, device: torch.device, report: Callable[[str], None],
                        config: EngineConfig, source: ModelSource, max_model_len: int,
                        calibration_ids: list[list[int]] | None = None) -> TorchModelRunner:
    """A tensor-parallel worker's runner (runner.distributed.worker_main calls this in its process):
    its own plan on its own GPU, its shard, then the same sizing (and calibration ids) as rank 0."""
    memory = plan_startup(config, source, max_model_len, device)
    runner = build_runner(memory, config, source, max_model_len, device, progress=False, tp=tp, report=report,
                          calibration_ids=calibration_ids)
    report("ready")
    return runner


def check_tensor_parallel(config: EngineConfig, source: ModelSource, device: torch.device) -> None:
    """Before any process starts or weight is read: the heads split evenly, and the GPUs exist."""
    size = config.tensor_parallel_size
    source.arch.shard(size)  # ConfigError naming the sizes that work
    if device.type == "cuda":
        last = worker_device(device, size - 1).index
        if last >= torch.cuda.device_count():
            raise ConfigError(
                f"--tensor-parallel-size {size} needs {size} GPUs from {device} on, but torch sees "
                f"{torch.cuda.device_count()} (CUDA_VISIBLE_DEVICES picks them).")


MIN_GPU_HEAD_DIM = 16  # the attention kernels' tl.dot needs an inner dimension of at least 16


def check_gpu_kernels(arch: ArchConfig, device: torch.device) -> None:
    """Before any weight is read: the Triton kernels pad a head to the next power of two (Phi-3-mini's
    96 to 128), but rotate it in two halves and multiply it with tl.dot, so it must be even and at
    least MIN_GPU_HEAD_DIM."""
    if device.type == "cuda" and (arch.head_dim % 2 or arch.head_dim < MIN_GPU_HEAD_DIM):
        raise ConfigError(
            f"{arch.architecture} has head_dim {arch.head_dim}; fitserve's GPU kernels need an even head_dim "
            f"of at least {MIN_GPU_HEAD_DIM} and do not run this model. It runs on the CPU with --device cpu.")


def build_parallel_runner(memory: StartupMemory, config: EngineConfig, source: ModelSource, max_model_len: int,
                          device: torch.device, progress: bool,
                          calibration_ids: list[list[int]] | None = None) -> TorchModelRunner:
    """Rank 0's runner, with the worker processes started, built and attached; on any failure the
    workers are stopped before the error propagates."""
    size = config.tensor_parallel_size
    workers = start_workers(size, device, build_worker_runner, (config, source, max_model_len, calibration_ids))
    try:
        runner = build_runner(memory, config, source, max_model_len, device, progress,
                              tp=TensorParallel(0, size), peers=workers, calibration_ids=calibration_ids)
        workers.wait_for("ready")
    except BaseException:
        workers.shutdown()
        raise
    runner.peers = workers
    return runner


def served_source(source: ModelSource, max_model_len: int) -> ModelSource:
    """`source` with its ArchConfig served at `max_model_len` tokens: LongRoPE's factor list follows the
    served context (longrope.py), which is logged; any other model is unchanged."""
    arch = source.arch.served_at(max_model_len)
    if isinstance(arch.rope_scaling, LongRopeScaling):
        logger.info("%s", arch.rope_scaling.describe())
    return source if arch == source.arch else replace(source, arch=arch)


def cpu_compile_mode(config: EngineConfig, device: torch.device) -> str:
    """--cpu-compile as the runner takes it: auto is aot (config.cpu_compile_mode) where a C++ compiler can
    build the package, else off, said once in the log."""
    mode = config.cpu_compile_mode
    if config.cpu_compile == "auto" and mode == "aot" and device.type == "cpu" and cpp_compiler() is None:
        logger.info("No C++ compiler found (g++, or $CXX): decode steps stay eager. Install one to get the CPU "
                    "decode step's AOTInductor package (--cpu-compile auto; docs/benchmarks.md)")
        return "off"
    return mode


CPU_PACKAGE_BUILDER_NICENESS = 10  # the builder child yields the cores to the serving process


def build_cpu_package_in_child(config: EngineConfig, kv_blocks: int) -> multiprocessing.process.BaseProcess:
    """Start a child process that builds this engine again, with a KV cache of kv_blocks blocks, and in it
    the CPU decode step's package (--cpu-compile aot, runner/cpu_aot.py), while this process serves eager
    steps."""
    config = replace(config, cache=replace(config.cache, num_gpu_blocks_override=kv_blocks))
    process = multiprocessing.get_context("spawn").Process(target=_cpu_package_builder_main, args=(config,),
                                                            name="fitserve-aot-build")
    process.start()
    atexit.register(_stop_child, process)
    return process


def _cpu_package_builder_main(config: EngineConfig) -> None:
    os.environ[BUILD_HERE_ENV] = "1"  # the child's runner builds in place
    try:
        os.nice(CPU_PACKAGE_BUILDER_NICENESS)
    except OSError:  # not permitted here: build at the same priority
        pass
    build_engine(config, progress=False)


def _stop_child(process: multiprocessing.process.BaseProcess) -> None:
    if process.is_alive():
        process.terminate()
        process.join(5)


def build_engine(config: EngineConfig, progress: bool = True) -> BuiltEngine:
    """Plan, load, measure, size the KV cache and build the engine (on every rank with tensor parallelism)."""
    start_s = time.monotonic()
    source = resolve_model_source(config)
    config = with_checkpoint_quantization(config, source.checkpoint_fp8)
    device = resolve_device(config)
    if device.type == "cpu":
        log_cpu_matmul(resolve_dtype(config.dtype))
        set_cpu_threads(config.cpu_threads)
    config = with_gguf_quantization(config, source, on_gpu=device.type == "cuda", cpu_bf16_units=cpu_has_bf16_units())
    max_model_len = resolve_max_model_len(config.scheduler.max_model_len, source.arch)
    source = served_source(source, max_model_len)
    check_tensor_parallel(config, source, device)
    check_gpu_kernels(source.arch, device)
    memory = plan_startup(config, source, max_model_len, device)  # fails here, before any weight is read
    tokenizer = Tokenizer.from_source(source)
    calibration_ids = fp8_calibration_ids(config.quantization, tokenizer, source)
    if config.tensor_parallel_size > 1:
        if device.type == "cuda" and not config.enforce_eager:
            logger.warning("CUDA graphs are off with --tensor-parallel-size %d: every step is launched eagerly "
                           "(docs/parallelism.md).", config.tensor_parallel_size)
        runner = build_parallel_runner(memory, config, source, max_model_len, device, progress, calibration_ids)
    else:
        runner = build_runner(memory, config, source, max_model_len, device, progress, calibration_ids=calibration_ids)
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
    # On a CPU the runner computes inside execute_async, so there is nothing to overlap with.
    async_output = device.type == "cuda" and not config.disable_async_output_proc
    # Tensor-parallel workers get each step's token ids from rank 0's plan, so they cannot fill
    # placeholders sampled on rank 0: async scheduling needs one GPU.
    async_scheduling = device.type == "cuda" and config.async_scheduling and config.tensor_parallel_size == 1
    grammar_compiler = GrammarCompiler(tokenizer.hf, source.arch.vocab_size, eos_ids)
    engine = LLMEngine(runner, tokenizer, limits, metrics=engine_metrics(config, capacity, sized, max_model_len),
                       async_output=async_output, grammar_compiler=grammar_compiler,
                       enable_prefix_caching=config.cache.enable_prefix_caching, async_scheduling=async_scheduling)
    logger.info(
        "Model %s on %s (%s%s) ready in %.1f s. KV cache: %d tokens (%d blocks of %d, %.2f GiB%s); "
        "maximum concurrency at --max-model-len %d: %.2fx; prefix caching %s",
        source.name, device, sized.inputs.dtype,
        f", tensor parallel over {config.tensor_parallel_size}" if config.tensor_parallel_size > 1 else "",
        time.monotonic() - start_s, capacity.num_tokens, capacity.num_blocks, capacity.block_size,
        capacity.num_blocks * sized.kv_block_bytes / 2**30, " per GPU" if config.tensor_parallel_size > 1 else "",
        max_model_len, capacity.num_tokens / max_model_len, "on" if config.cache.enable_prefix_caching else "off",
    )
    return BuiltEngine(engine, tokenizer, source, config.served_model_name or source.name, device, memory,
                       sampling_defaults(config, source))


def engine_metrics(config: EngineConfig, capacity: KVCapacity, sized: MemoryPlan, max_model_len: int) -> EngineMetrics:
    """The engine's metrics, with the cache settings /metrics reports as vLLM's cache_config_info."""
    return EngineMetrics(max_model_len, cache_info={
        "block_size": str(capacity.block_size), "cache_dtype": config.cache.kv_cache_dtype,
        "gpu_memory_utilization": str(config.cache.gpu_memory_utilization),
        "num_gpu_blocks": str(capacity.num_blocks), "num_gpu_blocks_override": str(config.cache.num_gpu_blocks_override),
        "kv_cache_memory_bytes": str(sized.kv_cache_bytes),
        "enable_prefix_caching": str(config.cache.enable_prefix_caching),
    })


def sampling_defaults(config: EngineConfig, source: ModelSource) -> dict[str, object]:
    """vLLM's --generation-config: the model's sampling defaults, logged once at start-up."""
    generation_config, path = load_generation_config(config.generation_config, source)
    defaults = generation_config_defaults(generation_config)
    if defaults:
        logger.info("Default sampling parameters from %s: %s. Requests that leave these fields unset use "
                    "them; --generation-config vllm ignores the file.", path,
                    ", ".join(f"{k}={v}" for k, v in defaults.items()))
    return defaults


def gpu_ids_in_use(device: torch.device, tensor_parallel_size: int = 1) -> list[str | int]:
    """The GPUs an engine on `device` uses: rank 0's and every tensor-parallel worker's after it
    (runner.distributed.worker_device), by UUID (NVML numbers GPUs apart from CUDA_VISIBLE_DEVICES)."""
    if device.type != "cuda":
        return []
    ids: list[str | int] = []
    for rank in range(tensor_parallel_size):
        index = worker_device(device, rank).index
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)  # absent on older torch
        ids.append(str(uuid) if uuid is not None else index)
    return ids


def start_serving_engine(config: EngineConfig, telemetry: Telemetry, *, max_queue_len: int | None,
                         progress: bool = True) -> EngineClient:
    """Build the engine and start it for serving, as `fitserve serve` and each replica do: the model's
    generation_config.json defaults for the sampling fields a request leaves unset, the page's memory
    plan (/ui/api/info), and `telemetry` started on every GPU of the engine (all tensor-parallel ranks).
    `max_queue_len` None: no queue limit in the engine; each caller says why its choice is right.
    With --engine-process the engine is built and stepped in its own process (docs/engine_process.md)."""
    if config.uses_engine_process(resolve_device(config).type == "cuda"):
        client = start_core_client(build_core, config, partial(model_tokenizer, config), max_queue_len=max_queue_len)
        telemetry.start(client.stats, client.gpu_ids)
        return client
    built = build_engine(config, progress=progress)
    engine = AsyncEngine(built.engine, built.model_name, built.tokenizer, max_queue_len=max_queue_len,
                         default_sampling_params=built.default_sampling_params,
                         startup_info=startup_info(built.memory, config)).start()
    telemetry.start(engine.stats, gpu_ids_in_use(built.device, config.tensor_parallel_size))
    return engine


def build_core(config: EngineConfig, progress: bool) -> tuple[LLMEngine, CoreReady]:
    """In the engine-core process (engine/core_process.py): build the engine, and what the API process needs."""
    built = build_engine(config, progress=progress)
    engine = built.engine
    return engine, CoreReady(
        model_name=built.model_name, max_model_len=engine.max_model_len, max_logprobs=engine.limits.max_logprobs,
        max_num_seqs=engine.limits.scheduler.max_num_seqs, request_limits=engine.request_limits,
        default_sampling_params=dict(built.default_sampling_params or {}),
        startup_info=startup_info(built.memory, config),
        gpu_ids=gpu_ids_in_use(built.device, config.tensor_parallel_size), stats=engine.stats())
