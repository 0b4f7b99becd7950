"""The replica flags of `fitserve serve` and how they map onto a Ray Serve deployment.

Neither ray nor torch is imported here, so `fitserve --help` and a config error answer at once.

Queue-length mapping (docs/scale-out.md):
- `max_ongoing_requests` = `--max-num-seqs` by default: a replica accepts only what its engine
  runs in one batch. Whatever is beyond waits in Ray's router queue (in the proxy), from which
  it goes to the first replica that frees a slot, and which a dying replica does not take down.
- `max_queued_requests` = `--max-queue-len` (None: no limit): past it the proxy answers 503.
- autoscaling's `target_ongoing_requests` = `--target-ongoing-requests`, by default also
  `--max-num-seqs`: the deployment grows once requests start to wait in the router queue
  (Ray counts queued and running requests together) and shrinks when replicas idle.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from fitserve.config import DEFAULT_MAX_NUM_SEQS, ConfigError

APP_NAME = "fitserve"  # the Ray Serve application (serve status, serve delete fitserve)
DEPLOYMENT_NAME = "FitserveReplica"
ROUTINGS = ("least-loaded", "prefix-affinity")
PREFIX_KEY_HEADER = "x-fitserve-prefix-key"  # requests with one value prefer one replica (router.py)
REPLICA_HEADER = "x-fitserve-replica"  # on every answer: which replica served it
DEFAULT_AFFINITY_MAX_EXTRA_QUEUE = 4  # the preferred replica may hold this many more requests than the least loaded
DEFAULT_PORT = 8000


@dataclass(frozen=True, slots=True)
class ReplicaOptions:
    """How many engine replicas, what each may hold and reserve, and how requests reach them."""

    num_replicas: int | None = None  # fixed count; None: autoscale between min and max
    min_replicas: int = 1
    max_replicas: int | None = None
    max_ongoing_requests: int = DEFAULT_MAX_NUM_SEQS  # per replica; default --max-num-seqs
    target_ongoing_requests: float = float(DEFAULT_MAX_NUM_SEQS)  # autoscaling target per replica; likewise
    max_queued_requests: int | None = None  # in each proxy's router queue; None: no limit
    num_cpus: float = 1.0  # Ray resources one replica reserves
    num_gpus: float = 0.0
    routing: str = "least-loaded"
    affinity_max_extra_queue: int = DEFAULT_AFFINITY_MAX_EXTRA_QUEUE
    graceful_shutdown_timeout_s: float = 30.0  # in-flight requests finish this long when a replica stops

    def __post_init__(self) -> None:
        if self.num_replicas is not None and self.num_replicas < 1:
            raise ConfigError(f"--replicas must be 1 or more, got {self.num_replicas}.")
        if self.min_replicas < 0:
            raise ConfigError(f"--min-replicas must be 0 or more, got {self.min_replicas}.")
        if self.max_replicas is not None and self.max_replicas < max(self.min_replicas, 1):
            raise ConfigError(f"--max-replicas ({self.max_replicas}) must be at least 1 and at least "
                              f"--min-replicas ({self.min_replicas}).")
        if self.num_replicas is None and self.max_replicas is None:
            raise ConfigError("Give --replicas N (a fixed count) or --max-replicas (autoscaling).")
        if self.max_ongoing_requests < 1 or not self.target_ongoing_requests > 0:
            raise ConfigError("--max-ongoing-requests and --target-ongoing-requests must be positive.")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError("--replica-num-cpus and --replica-num-gpus must be 0 or more.")
        if self.routing not in ROUTINGS:
            raise ConfigError(f"--replica-routing must be one of {', '.join(ROUTINGS)}, not {self.routing!r}.")
        if self.affinity_max_extra_queue < 0:
            raise ConfigError("--affinity-max-extra-queue must be 0 or more.")

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments for `Deployment.options` (Ray Serve's names)."""
        options: dict[str, Any] = {
            "name": DEPLOYMENT_NAME,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": -1 if self.max_queued_requests is None else self.max_queued_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
        }
        if self.num_replicas is not None:
            options["num_replicas"] = self.num_replicas
        else:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "initial_replicas": max(self.min_replicas, 1),
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            }
        if self.routing == "prefix-affinity":
            options["request_router_config"] = {
                "request_router_class": "fitserve.scaleout.router:PrefixAffinityRouter",
                "request_router_kwargs": {"max_extra_queue": self.affinity_max_extra_queue},
            }
        return options


def add_replica_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("replicas on Ray Serve (pip install fitserve[ray]; docs/scale-out.md)")
    group.add_argument("--replicas", type=int, default=None,
                       help="serve N engine replicas behind Ray Serve's HTTP proxy (one engine each)")
    group.add_argument("--min-replicas", type=int, default=None, help="autoscaling lower bound (default 1)")
    group.add_argument("--max-replicas", type=int, default=None,
                       help="autoscaling upper bound; with it (and no --replicas) the count follows the queue")
    group.add_argument("--target-ongoing-requests", type=float, default=None,
                       help="autoscaling target of running + queued requests per replica (default --max-num-seqs)")
    group.add_argument("--max-ongoing-requests", type=int, default=None,
                       help="requests one replica accepts at once (default --max-num-seqs); the rest wait in "
                            "Ray's router queue (--max-queue-len bounds it: past it, 503)")
    group.add_argument("--replica-num-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica")
    group.add_argument("--replica-num-gpus", type=float, default=None,
                       help="GPUs Ray reserves per replica (default: --tensor-parallel-size, i.e. 1, when the "
                            "engine runs on CUDA: --device cuda, or auto on a Ray cluster with GPUs; else 0)")
    group.add_argument("--replica-routing", choices=ROUTINGS, default=None,
                       help="least-loaded (Ray's power of two choices) or prefix-affinity (requests with "
                            f"the same {PREFIX_KEY_HEADER} header prefer one replica); default: "
                            "prefix-affinity when --enable-prefix-caching is on")
    group.add_argument("--affinity-max-extra-queue", type=int, default=DEFAULT_AFFINITY_MAX_EXTRA_QUEUE,
                       help="prefix-affinity: the preferred replica is skipped when it holds more than this "
                            "many requests beyond the least loaded one")
    group.add_argument("--ray-address", default=None,
                       help="join this Ray cluster (e.g. ray://head:10001 or auto; default: $RAY_ADDRESS, "
                            "else a local Ray instance started for this server)")


def wants_replicas(args: argparse.Namespace) -> bool:
    return getattr(args, "replicas", None) is not None or getattr(args, "max_replicas", None) is not None


def replica_options_from_args(args: argparse.Namespace, max_num_seqs: int, on_gpu: bool,
                              shutdown_timeout_s: float) -> ReplicaOptions:
    if args.replicas is not None and (args.min_replicas is not None or args.max_replicas is not None):
        raise ConfigError("--replicas fixes the count; leave out --min-replicas/--max-replicas, or drop --replicas "
                          "to autoscale.")
    routing = args.replica_routing
    if routing is None:
        routing = "prefix-affinity" if getattr(args, "enable_prefix_caching", False) else "least-loaded"
    num_gpus = args.replica_num_gpus
    if num_gpus is None:
        num_gpus = float(getattr(args, "tensor_parallel_size", 1) or 1) if on_gpu else 0.0
    return ReplicaOptions(
        num_replicas=args.replicas,
        min_replicas=1 if args.min_replicas is None else args.min_replicas,
        max_replicas=args.max_replicas,
        max_ongoing_requests=max_num_seqs if args.max_ongoing_requests is None else args.max_ongoing_requests,
        target_ongoing_requests=(float(max_num_seqs) if args.target_ongoing_requests is None
                                 else args.target_ongoing_requests),
        max_queued_requests=getattr(args, "max_queue_len", None),
        num_cpus=args.replica_num_cpus,
        num_gpus=num_gpus,
        routing=routing,
        affinity_max_extra_queue=args.affinity_max_extra_queue,
        graceful_shutdown_timeout_s=shutdown_timeout_s,
    )
