"""`fitserve serve`: the command line, with vLLM's flag names and meanings."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Mapping
from typing import Any

from fitserve.bench.cli import add_bench_parsers
from fitserve.plan.command import add_plan_parser
from fitserve.quantcheck.command import add_check_quant_parser
from fitserve.scaleout.options import add_replica_args, wants_replicas
from fitserve.config import ConfigError, EngineConfig, ServerConfig
from fitserve.flags import (  # noqa: F401  (engine_config_from_args, server_config_from_args: cli's API)
    add_engine_args,
    add_server_config_args,
    engine_config_from_args,
    server_config_from_args,
)
from fitserve.telemetry.monitor import STATS_INTERVAL_S
from fitserve.vllm_flags import add_vllm_flags, check_vllm_flags
from fitserve.weights.source import resolve_model_source

logger = logging.getLogger("fitserve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fitserve", description="An LLM inference server with an OpenAI-compatible API.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a model over the OpenAI API")
    serve.add_argument("model_tag", nargs="?", default=None, help="the model, as `vllm serve MODEL` takes it")
    add_engine_args(serve)
    add_server_args(serve)
    add_replica_args(serve)  # --replicas N: engine replicas on Ray Serve (docs/scale-out.md)
    add_vllm_flags(serve)  # vLLM's flags that change nothing here: accepted, logged (vllm_flags.py)
    add_bench_parsers(commands)
    serve.add_argument("--verify-quantization", action="store_true",
                       help="before serving, compare --quantization/--kv-cache-dtype with --dtype on built-in "
                            "prompts (fitserve check-quant) and log the figures")
    add_plan_parser(commands, resolve_model_source)
    add_check_quant_parser(commands)
    return parser


def add_server_args(serve: argparse.ArgumentParser) -> None:
    """ServerConfig's flags (declared in config.py), then the serve flags that set no config field."""
    group = add_server_config_args(serve)
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in containers)")
    group.add_argument("--port", type=int, default=8000)
    group.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    group.add_argument("--gpu-telemetry-interval", type=float, default=1.0,
                       help="seconds between NVML readings of the GPUs in use (fitserve:gpu_* on /metrics, "
                            "slowdown warnings; docs/telemetry.md); 0 turns GPU sampling off")
    group.add_argument("--disable-log-stats", action="store_true",
                       help="no stats line (tokens/s, running/waiting, KV cache, power, temperature) every 10 s "
                            "while busy")


def serve(args: argparse.Namespace) -> int:
    """The HTTP server comes up first (/health 503 with the phase), then the engine loads."""
    # Imported here so that `fitserve --help` and config errors answer without loading torch.
    from fitserve.server import launcher
    from fitserve.server.lifecycle import Phase
    from fitserve.telemetry import Telemetry

    engine_config, server_config = _serve_configs(args)
    if wants_replicas(args):
        from fitserve.scaleout.launch import serve_replicas

        _one_api_process(server_config)

        return serve_replicas(args, _without_engine_process(engine_config), server_config)
    if args.gpu_telemetry_interval < 0:
        raise ConfigError(f"--gpu-telemetry-interval must be 0 (off) or more seconds, not {args.gpu_telemetry_interval}.")
    if server_config.api_server_count > 1:
        return _serve_api_servers(args, engine_config, server_config)
    telemetry = Telemetry(interval_s=args.gpu_telemetry_interval,
                          stats_interval_s=None if args.disable_log_stats else STATS_INTERVAL_S)

    def load_engine(report_phase):
        report_phase(Phase.LOADING)  # importing torch is the first part of loading
        from fitserve.startup import start_serving_engine

        if args.verify_quantization:
            from fitserve.quantcheck.check import verify_at_startup

            verify_at_startup(engine_config)
        return start_serving_engine(engine_config, telemetry, max_queue_len=server_config.max_queue_len)

    try:
        return launcher.serve(server_config, args.host, args.port, load_engine, log_level=args.log_level,
                              telemetry=telemetry)
    finally:
        telemetry.stop()


def _serve_api_servers(args: argparse.Namespace, engine_config: EngineConfig, server_config: ServerConfig) -> int:
    """--api-server-count N > 1: N API processes on the port, one engine core (server/api_servers.py)."""
    from fitserve.server.api_servers import ApiServerOptions, serve_api_servers

    if engine_config.engine_process is False:
        raise ConfigError("--api-server-count above 1 shares one engine core in its own process: leave out "
                          "--no-engine-process (docs/engine_process.md).")
    if args.verify_quantization:
        raise ConfigError("--verify-quantization runs with one API process: leave out --api-server-count.")
    options = ApiServerOptions(host=args.host, port=args.port, log_level=args.log_level,
                               telemetry_interval_s=args.gpu_telemetry_interval,
                               stats_interval_s=None if args.disable_log_stats else STATS_INTERVAL_S)
    return serve_api_servers(server_config.api_server_count, build_core, engine_config, server_config, options)


def build_core(config: EngineConfig, progress: bool) -> Any:
    """In the engine-core process: startup.build_core, imported there (this process never loads torch)."""
    from fitserve.startup import build_core as build

    return build(config, progress)


def app_builder(args: Mapping[str, Any]) -> Any:
    """Ray Serve's application builder for `serve run` / `serve deploy` configs, whose `import_path`
    names it (`fitserve.cli:app_builder`, deploy/ray/serve-config.yaml): their `args` are `fitserve
    serve` flags without the dashes, e.g. `{max-num-seqs: 64, replicas: 2}`."""
    from fitserve.scaleout import launch

    parsed = build_parser().parse_args(["serve", *launch.flags_from_mapping(args)])
    if parsed.replicas is None and parsed.max_replicas is None:
        parsed.replicas = 1  # the config's `deployments:` section may set num_replicas or autoscaling instead
    engine_config, server_config = _serve_configs(parsed)
    _one_api_process(server_config)
    return launch.application_from_args(parsed, _without_engine_process(engine_config), server_config,
                                        launch.engine_on_gpu(parsed.device))


def _one_api_process(config: ServerConfig) -> None:
    """A replica serves in its own process: --api-server-count is refused with --replicas."""
    if config.api_server_count > 1:
        raise ConfigError("--api-server-count does not work with --replicas: each replica serves in one "
                          "process (docs/engine_process.md).")


def _without_engine_process(config: EngineConfig) -> EngineConfig:
    """A replica's engine runs in the replica's process: --engine-process is refused, its default off."""
    if config.engine_process:  # each replica would start its own core; not done yet
        raise ConfigError("--engine-process does not work with --replicas yet: leave one of them out "
                          "(docs/engine_process.md).")
    return dataclasses.replace(config, engine_process=False)


def _serve_configs(args: argparse.Namespace) -> tuple[EngineConfig, ServerConfig]:
    """`fitserve serve`'s two configs; `fitserve serve MODEL` is `--model MODEL`."""
    if args.model_tag and not args.model:
        args.model = args.model_tag
    check_vllm_flags(args)
    return engine_config_from_args(args), server_config_from_args(args)


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
