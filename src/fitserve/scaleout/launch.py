"""`fitserve serve --replicas N` and the application builder of `serve run` configs.

`serve_replicas(args)` joins the Ray cluster at `--ray-address` (else $RAY_ADDRESS, else it
starts a local Ray instance), starts Ray Serve's HTTP proxy on `--host:--port`, deploys the
replicas and blocks until SIGINT/SIGTERM; then it deletes the application (Ray lets each replica
finish its requests for up to --shutdown-timeout) and stops what it started.

`application_from_args(...)` is also what `fitserve.cli:app_builder` returns, the builder a Ray
Serve config's `import_path` names (deploy/ray/serve-config.yaml). This package never imports
the command line: `fitserve serve` hands it the configs it parsed.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fitserve.config import ConfigError, EngineConfig, ServerConfig, ray_address
from fitserve.scaleout.options import APP_NAME, DEPLOYMENT_NAME, ReplicaOptions, replica_options_from_args
from fitserve.scaleout.proxy import PROXY_CALLBACK, PROXY_CALLBACK_ENV

logger = logging.getLogger(__name__)
MAX_CONSTRUCTOR_RETRIES = 3  # a replica whose engine cannot load is retried this often, then the deploy fails
FITSERVE_SOURCE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding the fitserve package


def build_application(engine_config: EngineConfig, server_config: ServerConfig, options: ReplicaOptions,
                      telemetry_interval_s: float = 1.0, log_stats: bool = True) -> Any:
    """The Ray Serve application: the replica deployment bound to its configs."""
    from ray import serve

    from fitserve.scaleout.replica import FitserveReplica

    deployment = serve.deployment(FitserveReplica).options(
        **options.deployment_options(), max_constructor_retry_count=MAX_CONSTRUCTOR_RETRIES)
    return deployment.bind(engine_config, server_config, telemetry_interval_s, log_stats)


def application_from_args(args: argparse.Namespace, engine_config: EngineConfig, server_config: ServerConfig,
                          on_gpu: bool) -> Any:
    """The application of `fitserve serve --replicas` flags (`args`, the replica options), with the
    configs the command line made of the same flags."""
    options = replica_options_from_args(args, engine_config.scheduler.max_num_seqs, on_gpu,
                                        server_config.shutdown_timeout_s)
    return build_application(engine_config, server_config, options, args.gpu_telemetry_interval,
                             not args.disable_log_stats)


def engine_on_gpu(device: str) -> bool:
    """Whether replicas reserve GPUs by default: --device cuda, or auto on a cluster that has GPUs."""
    if device.startswith("cuda"):
        return True
    if device != "auto":
        return False
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def serve_replicas(args: argparse.Namespace, engine_config: EngineConfig, server_config: ServerConfig) -> int:
    """Run the replicas until SIGINT/SIGTERM (blocks); returns the exit code. `engine_config` and
    `server_config` are what the command line made of `args`."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ConfigError("--replicas runs on Ray Serve, which is not installed: pip install 'fitserve[ray]'.") from None
    joined_cluster = args.ray_address is not None or ray_address() is not None
    # A local instance: its workers import fitserve from where this process does (a source tree too).
    runtime_env = None if joined_cluster else {"env_vars": {"PYTHONPATH": FITSERVE_SOURCE_ROOT}}
    if not joined_cluster:  # the proxy of the instance started here inherits it (a cluster sets it per node)
        os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    ray.init(address=args.ray_address, namespace=APP_NAME, runtime_env=runtime_env, log_to_driver=True)
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        app = application_from_args(args, engine_config, server_config, engine_on_gpu(args.device))
        serve.start(http_options={"host": args.host, "port": args.port})
        logger.info("Deploying the replicas on Ray (%s); the proxy listens on http://%s:%d.",
                    "joined cluster" if joined_cluster else "local instance", args.host, args.port)
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        logger.info("Ready: every replica has loaded its engine. Ctrl-C or SIGTERM stops them.")
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        logger.info("Stopping: Ray stops routing new requests; in-flight ones get up to %g s.", args.shutdown_timeout)
        return 0
    except RuntimeError as error:  # serve.run: a replica failed to start
        raise ConfigError(f"The replicas could not start: {_deployment_message() or error}") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop(joined_cluster)


def _deployment_message() -> str | None:
    """The deployment's status message: the last replica's start-up error (the engine's ConfigError)."""
    from ray import serve

    try:
        message = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME].message
    except (KeyError, AttributeError):
        return None
    marker = "fitserve.config.ConfigError: "  # the traceback ends with the one paragraph that names the fix
    return message.rsplit(marker, 1)[1].strip() if marker in message else message or None


def _stop(joined_cluster: bool) -> None:
    import ray
    from ray import serve

    try:
        if joined_cluster:
            serve.delete(APP_NAME)  # leave the cluster and any other Serve applications running
        else:
            serve.shutdown()
    finally:
        ray.shutdown()


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def flags_from_mapping(args: Mapping[str, Any]) -> list[str]:
    """`{max-num-seqs: 64, enable-log-requests: true, api-key: [a, b]}` -> argv of `fitserve serve`."""
    argv: list[str] = []
    for name, value in args.items():
        flag = "--" + str(name).replace("_", "-")
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"  # `serve run ... key=value` hands every value over as a string
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv
