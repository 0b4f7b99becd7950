"""`fitserve serve`: the command line, with vLLM's flag names and meanings."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from fitserve.bench.cli import add_bench_parsers
from fitserve.plan.command import add_plan_parser
from fitserve.quantcheck.command import add_check_quant_parser
from fitserve.scaleout.options import add_replica_args, wants_replicas
from fitserve.config import (
    API_KEY_ENV,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_REQUEST_BODY_BYTES,
    DEFAULT_SHUTDOWN_TIMEOUT_S,
    DEFAULT_TIMEOUT_BODY_S,
    DEFAULT_TIMEOUT_HEADER_S,
    DEFAULT_TIMEOUT_KEEP_ALIVE_S,
    KV_CACHE_DTYPES,
    LOAD_FORMATS,
    CacheConfig,
    ConfigError,
    EngineConfig,
    SchedulerConfig,
    ServerConfig,
    parse_size_bytes,
)
from fitserve.telemetry.monitor import STATS_INTERVAL_S
from fitserve.weights.source import resolve_model_source

logger = logging.getLogger("fitserve")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="a Hugging Face folder, a .gguf file or a hub id; default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--served-model-name", default=None, help="the name clients send as `model`")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer folder or hub id, if not the model's own")
    parser.add_argument("--load-format", default="auto", choices=LOAD_FORMATS,
                        help="'dummy' builds random weights from the model's config.json, for benchmarks")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16), bfloat16, float16 or float32")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler for requests without a seed")
    parser.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens per request")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="requests batched in one step")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048,
                        help="tokens fed in one step (prefill chunks and decodes together)")
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="tokens per KV-cache block")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="fraction of the GPU's total memory this server may use (weights, activations, KV)")
    parser.add_argument("--kv-cache-memory-bytes", default=None,
                        help="KV cache size, e.g. 2GiB; on the CPU the default is 1GiB")
    parser.add_argument("--num-gpu-blocks-override", type=int, default=None, help="exact number of KV blocks")
    parser.add_argument("--quantization", default=None, choices=["fp8", "fp8_per_tensor"],
                        help="fp8: linear layers quantized at load to e4m3, per-channel weight and per-token "
                             "activation scales; fp8_per_tensor: one scale per tensor; a checkpoint stored in fp8 "
                             "picks its own unless given (docs/quantization.md)")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                        help="auto (= --dtype) or fp8 (e4m3, one byte per element, a scale per layer: 1.0 or the "
                             "checkpoint's)")
    parser.add_argument("--generation-config", default="auto",
                        help="auto: the model's generation_config.json gives defaults (temperature, top_p, top_k, "
                             "min_p, repetition_penalty, max_new_tokens) for fields a request leaves unset; "
                             "vllm: ignore it; or a folder with a generation_config.json")
    parser.add_argument("--max-logprobs", type=int, default=20,
                        help="most logprobs / top_logprobs a request may ask for per token (more: 400)")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse the KV cache of full blocks shared with earlier requests (a common system "
                             "prompt is computed once); on by default, --no-enable-prefix-caching turns it off "
                             "(docs/prefix-caching.md)")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="no CUDA graphs: launch every decode step from Python (slower; for debugging)")
    parser.add_argument("--disable-async-output-proc", action="store_true",
                        help="detokenize each step between steps instead of while the GPU runs the next one")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                        help="plan and launch each step before the last one's tokens are read, so host work "
                             "overlaps the GPU (CUDA on one GPU; on by default, --no-async-scheduling turns it off)")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                        help="split the model over this many GPUs, one process each, started by fitserve "
                             "(attention heads and MLP columns; docs/parallelism.md)")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    kv_bytes = None if args.kv_cache_memory_bytes is None else parse_size_bytes(args.kv_cache_memory_bytes)
    return EngineConfig(
        model=args.model,
        served_model_name=args.served_model_name,
        tokenizer=args.tokenizer,
        load_format=args.load_format,
        dtype=args.dtype,
        device=args.device,
        seed=args.seed,
        enforce_eager=args.enforce_eager,
        disable_async_output_proc=args.disable_async_output_proc,
        async_scheduling=args.async_scheduling,
        quantization=args.quantization,
        generation_config=args.generation_config,
        max_logprobs=args.max_logprobs,
        tensor_parallel_size=args.tensor_parallel_size,
        cache=CacheConfig(
            block_size=args.block_size,
            gpu_memory_utilization=args.gpu_memory_utilization,
            kv_cache_memory_bytes=kv_bytes,
            num_gpu_blocks_override=args.num_gpu_blocks_override,
            kv_cache_dtype=args.kv_cache_dtype,
            enable_prefix_caching=args.enable_prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len,
        ),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fitserve", description="An LLM inference server with an OpenAI-compatible API.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a model over the OpenAI API")
    serve.add_argument("model_tag", nargs="?", default=None, help="the model, as `vllm serve MODEL` takes it")
    add_engine_args(serve)
    add_server_args(serve)
    add_replica_args(serve)  # --replicas N: engine replicas on Ray Serve (docs/scale-out.md)
    add_bench_parsers(commands)
    serve.add_argument("--verify-quantization", action="store_true",
                       help="before serving, compare --quantization/--kv-cache-dtype with --dtype on built-in "
                            "prompts (fitserve check-quant) and log the figures")
    add_plan_parser(commands, resolve_model_source)
    add_check_quant_parser(commands, add_engine_args, engine_config_from_args)
    return parser


def _list_arg(values: list[str] | None, default: tuple[str, ...]) -> tuple[str, ...]:
    """vLLM takes these lists either as words (`--allowed-origins a b`) or as one JSON list."""
    if not values:
        return default
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


def add_server_args(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in containers)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", nargs="+", action="extend", default=None,
                       help=f"require one of these keys as `Authorization: Bearer` on /v1/* (else ${API_KEY_ENV}, "
                            "comma-separated)")
    serve.add_argument("--metrics-api-key", default=None, help="require this key on /metrics (default: public)")
    serve.add_argument("--allowed-origins", nargs="+", default=None, help="CORS origins (default: *)")
    serve.add_argument("--allowed-methods", nargs="+", default=None, help="CORS methods (default: *)")
    serve.add_argument("--allowed-headers", nargs="+", default=None, help="CORS headers (default: *)")
    serve.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    serve.add_argument("--request-timeout", type=float, default=None,
                       help="seconds from arrival to the last token; later, the request is aborted (408)")
    serve.add_argument("--max-queue-len", type=int, default=None,
                       help="requests that may wait beyond --max-num-seqs; past it, 503 with Retry-After")
    serve.add_argument("--max-request-body-bytes", default=None,
                       help=f"larger bodies get 413 (default {DEFAULT_MAX_REQUEST_BODY_BYTES // 2**20}MiB)")
    serve.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT_S,
                       help="seconds to finish in-flight requests after SIGTERM before aborting them "
                            f"(default {DEFAULT_SHUTDOWN_TIMEOUT_S:g})")
    serve.add_argument("--enable-log-requests", action="store_true",
                       help="log each request's prompt token ids and settings (off: prompts are never logged)")
    serve.add_argument("--max-log-len", type=int, default=None, help="prompt tokens shown per logged request")
    serve.add_argument("--disable-ui", action="store_true",
                       help="serve no web page at / and /ui (the dashboard and chat playground, docs/ui.md)")
    serve.add_argument("--strict", action="store_true",
                       help="answer 400 to a request field fitserve does not support (default: ignore it and log "
                            "it once; GET /v1/compat lists the fields)")
    serve.add_argument("--trust-request-chat-template", action="store_true",
                       help="let a request replace the chat template (chat_template_kwargs.chat_template); it is "
                            "rendered sandboxed, with a time and size limit (default: 400)")
    serve.add_argument("--timeout-keep-alive", type=float, default=DEFAULT_TIMEOUT_KEEP_ALIVE_S,
                       help="seconds an idle kept-alive connection stays open "
                            f"(default {DEFAULT_TIMEOUT_KEEP_ALIVE_S:g})")
    serve.add_argument("--timeout-header", type=float, default=DEFAULT_TIMEOUT_HEADER_S,
                       help="seconds for a request's line and headers to arrive "
                            f"(default {DEFAULT_TIMEOUT_HEADER_S:g})")
    serve.add_argument("--timeout-body", type=float, default=DEFAULT_TIMEOUT_BODY_S,
                       help="seconds for a request's body to arrive after its headers "
                            f"(default {DEFAULT_TIMEOUT_BODY_S:g})")
    serve.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                       help="open connections; more get 503 and are closed (default "
                            f"{DEFAULT_MAX_CONNECTIONS}, lowered below the open-file limit)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--gpu-telemetry-interval", type=float, default=1.0,
                       help="seconds between NVML readings of the GPUs in use (fitserve:gpu_* on /metrics, "
                            "slowdown warnings; docs/telemetry.md); 0 turns GPU sampling off")
    serve.add_argument("--disable-log-stats", action="store_true",
                       help="no stats line (tokens/s, running/waiting, KV cache, power, temperature) every 10 s "
                            "while busy")


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    body_bytes = args.max_request_body_bytes
    optional = {} if args.api_key is None else {"api_keys": tuple(args.api_key)}  # else: from the environment
    return ServerConfig(
        **optional,
        metrics_api_key=args.metrics_api_key,
        allowed_origins=_list_arg(args.allowed_origins, ("*",)),
        allowed_methods=_list_arg(args.allowed_methods, ("*",)),
        allowed_headers=_list_arg(args.allowed_headers, ("*",)),
        allow_credentials=args.allow_credentials,
        request_timeout_s=args.request_timeout,
        max_queue_len=args.max_queue_len,
        max_request_body_bytes=DEFAULT_MAX_REQUEST_BODY_BYTES if body_bytes is None else parse_size_bytes(body_bytes),
        shutdown_timeout_s=args.shutdown_timeout,
        enable_log_requests=args.enable_log_requests,
        max_log_len=args.max_log_len,
        enable_ui=not args.disable_ui,
        strict=args.strict,
        trust_request_chat_template=args.trust_request_chat_template,
        timeout_keep_alive_s=args.timeout_keep_alive,
        timeout_header_s=args.timeout_header,
        timeout_body_s=args.timeout_body,
        max_connections=args.max_connections,
    )


def gpu_ids_in_use(engine, tensor_parallel_size: int = 1) -> list[str | int]:
    """The GPUs the engine's runner uses (rank 0's and the workers' after it), by UUID (NVML numbers
    GPUs apart from CUDA_VISIBLE_DEVICES)."""
    device = getattr(getattr(engine, "runner", None), "device", None)
    if device is None or device.type != "cuda":
        return []
    import torch

    ids: list[str | int] = []
    for index in range(device.index or 0, (device.index or 0) + tensor_parallel_size):
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        ids.append(str(uuid) if uuid is not None else index)
    return ids


def serve(args: argparse.Namespace) -> int:
    """The HTTP server comes up first (/health 503 with the phase), then the engine loads."""
    # Imported here so that `fitserve --help` and config errors answer without loading torch.
    from fitserve.server import launcher
    from fitserve.server.lifecycle import Phase
    from fitserve.telemetry import Telemetry

    if wants_replicas(args):
        from fitserve.scaleout.launch import serve_replicas

        return serve_replicas(args)
    if args.model_tag and not args.model:
        args.model = args.model_tag
    engine_config = engine_config_from_args(args)
    server_config = server_config_from_args(args)
    if args.gpu_telemetry_interval < 0:
        raise ConfigError(f"--gpu-telemetry-interval must be 0 (off) or more seconds, not {args.gpu_telemetry_interval}.")
    telemetry = Telemetry(interval_s=args.gpu_telemetry_interval,
                          stats_interval_s=None if args.disable_log_stats else STATS_INTERVAL_S)

    def load_engine(report_phase):
        report_phase(Phase.LOADING)  # importing torch is the first part of loading
        from fitserve.engine.async_engine import AsyncEngine
        from fitserve.llm import build_engine

        if args.verify_quantization:
            from fitserve.quantcheck.check import verify_at_startup

            verify_at_startup(engine_config)
        from fitserve.server.ui.info import startup_info

        built = build_engine(engine_config)
        engine = AsyncEngine(built.engine, built.model_name, built.tokenizer,
                             max_queue_len=server_config.max_queue_len,
                             default_sampling_params=built.default_sampling_params).start()
        engine.startup_info = startup_info(built.memory, engine_config)  # the page's memory plan (/ui/api/info)
        telemetry.start(engine.stats, gpu_ids_in_use(built.engine, engine_config.tensor_parallel_size))
        return engine

    try:
        return launcher.serve(server_config, args.host, args.port, load_engine, log_level=args.log_level,
                              telemetry=telemetry)
    finally:
        telemetry.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "serve":
            return serve(args)
        if hasattr(args, "handler"):  # bench, sweep
            return args.handler(args)
    except ConfigError as error:
        print(f"fitserve: {error}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
