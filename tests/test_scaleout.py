"""Replicas on Ray Serve without a cluster: flags, deployment options, the router's choices and the
proxy middleware (tests/test_scaleout_ray.py runs the real thing)."""

from __future__ import annotations

import asyncio
import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from ray.serve._private.common import DeploymentID, ReplicaID, StreamingHTTPRequest
from ray.serve._private.request_router.common import ReplicaQueueLengthCache
from ray.serve.schema import ServeDeploySchema

from fitserve.cli import app_builder, build_parser
from fitserve.config import ConfigError
from fitserve.scaleout import launch
from fitserve.scaleout.launch import flags_from_mapping
from fitserve.scaleout.options import PREFIX_KEY_HEADER, ReplicaOptions, replica_options_from_args
from fitserve.scaleout.proxy import ReplicaFailureMiddleware
from fitserve.scaleout.router import PrefixAffinityRouter, prefix_key, rendezvous_order


def options_for(*flags: str, on_gpu: bool = False) -> ReplicaOptions:
    args = build_parser().parse_args(["serve", "--max-num-seqs", "32", *flags])
    return replica_options_from_args(args, args.max_num_seqs, on_gpu, shutdown_timeout_s=7.0)


def test_fixed_replicas_map_queue_settings_onto_ray_serve():
    opts = options_for("--replicas", "3", "--max-queue-len", "50").deployment_options()
    assert opts["num_replicas"] == 3 and "autoscaling_config" not in opts
    assert opts["max_ongoing_requests"] == 32  # a replica takes what its engine batches; the rest waits in Ray
    assert opts["max_queued_requests"] == 50
    assert opts["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert opts["graceful_shutdown_timeout_s"] == 7.0
    # prefix caching is on by default, so requests with one prefix key prefer one replica
    assert opts["request_router_config"]["request_router_class"] == "fitserve.scaleout.router:PrefixAffinityRouter"
    plain = options_for("--replicas", "3", "--no-enable-prefix-caching").deployment_options()
    assert "request_router_config" not in plain  # Ray's power of two choices


def test_autoscaling_bounds_and_target_from_the_queue():
    opts = options_for("--min-replicas", "0", "--max-replicas", "4").deployment_options()
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"] == {"min_replicas": 0, "initial_replicas": 1, "max_replicas": 4,
                                          "target_ongoing_requests": 32.0}
    assert options_for("--max-replicas", "2", "--target-ongoing-requests", "8").target_ongoing_requests == 8


def test_gpu_replicas_reserve_gpus_and_prefix_affinity_is_a_router():
    opts = options_for("--replicas", "2", "--replica-routing", "prefix-affinity", on_gpu=True).deployment_options()
    assert opts["ray_actor_options"]["num_gpus"] == 1.0
    router = opts["request_router_config"]
    assert router["request_router_class"] == "fitserve.scaleout.router:PrefixAffinityRouter"
    assert router["request_router_kwargs"] == {"max_extra_queue": 4}


@pytest.mark.parametrize("flags, words", [
    (("--replicas", "2", "--max-replicas", "3"), "--replicas fixes the count"),
    (("--replicas", "0"), "--replicas must be 1 or more"),
    (("--min-replicas", "3", "--max-replicas", "2"), "--max-replicas (2) must be at least"),
    (("--replicas", "2", "--max-ongoing-requests", "0"), "must be positive"),
])
def test_bad_replica_flags_are_config_errors(flags, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        options_for(*flags)


def test_serve_run_args_become_fitserve_flags():
    argv = flags_from_mapping({"max-num-seqs": 64, "enable_log_requests": "true", "disable-ui": False,
                                "api-key": ["a", "b"], "served-model-name": None})
    assert argv == ["--max-num-seqs", "64", "--enable-log-requests", "--api-key", "a", "b"]
    parsed = build_parser().parse_args(["serve", *argv])
    assert parsed.max_num_seqs == 64 and parsed.api_key == ["a", "b"]


def test_prefix_key_is_read_from_the_request_the_proxy_routes():
    scope = {"type": "http", "headers": [(b"content-type", b"application/json"), (PREFIX_KEY_HEADER.encode(), b"conv-7")]}
    assert prefix_key(pickle.dumps(StreamingHTTPRequest(asgi_scope=scope, proxy_actor_name="p"))) == "conv-7"
    assert prefix_key(pickle.dumps(StreamingHTTPRequest(asgi_scope={"headers": []}, proxy_actor_name="p"))) is None
    assert prefix_key(b"not a pickle") is None and prefix_key("text") is None


def test_rendezvous_order_moves_only_the_keys_of_a_removed_replica():
    replicas = ["r1", "r2", "r3", "r4"]
    keys = [f"conversation-{i}" for i in range(200)]
    before = {k: rendezvous_order(k, replicas)[0] for k in keys}
    assert set(before.values()) == set(replicas)  # every replica is somebody's preferred
    after = {k: rendezvous_order(k, ["r1", "r2", "r4"])[0] for k in keys}
    assert all(after[k] == before[k] for k in keys if before[k] != "r3")


def _router(queue_lens: dict[str, int]) -> tuple[PrefixAffinityRouter, list]:
    router = object.__new__(PrefixAffinityRouter)  # the state Ray's constructor would set, without a cluster
    router.initialize_state(max_extra_queue=4)
    cache = ReplicaQueueLengthCache()
    replicas = []
    for name, queue_len in queue_lens.items():
        replica_id = ReplicaID(name, deployment_id=DeploymentID(name="FitserveReplica", app_name="fitserve"))
        cache.update(replica_id, queue_len)
        replicas.append(SimpleNamespace(replica_id=replica_id))
    router._replica_queue_len_cache = cache
    return router, replicas


def _pending(key: str | None):
    headers = [] if key is None else [(PREFIX_KEY_HEADER.encode(), key.encode())]
    request = StreamingHTTPRequest(asgi_scope={"type": "http", "headers": headers}, proxy_actor_name="p")
    return SimpleNamespace(args=[pickle.dumps(request)])


def test_router_ranks_the_preferred_replica_first_unless_it_is_far_busier():
    router, replicas = _router({"a": 0, "b": 0, "c": 0})
    preferred = rendezvous_order("conv-1", ["a", "b", "c"])[0]
    ranks = asyncio.run(router.choose_replicas(replicas, _pending("conv-1")))
    assert [r.replica_id.unique_id for r in ranks[0]] == [preferred] and len(ranks) == 2
    assert all(r.replica_id.unique_id != preferred for r in ranks[1]) and ranks[1]

    busy, replicas = _router({name: (9 if name == preferred else 2) for name in "abc"})  # 7 more than the least
    ranks = asyncio.run(busy.choose_replicas(replicas, _pending("conv-1")))
    assert len(ranks) == 1 and len(ranks[0]) == 2  # the power of two choices alone

    ranks = asyncio.run(router.choose_replicas(replicas, _pending(None)))
    assert len(ranks) == 1 and len(ranks[0]) == 2


def _run_middleware(messages: list[dict]) -> list[dict]:
    sent: list[dict] = []

    async def app(scope, receive, send):
        for message in messages:
            await send(message)

    async def send(message):
        sent.append(message)

    asyncio.run(ReplicaFailureMiddleware(app)({"type": "http"}, None, send))
    return sent


def _start(status: int, content_type: bytes, replica: bool = True) -> dict:
    headers = [(b"content-type", content_type)] + ([(b"x-fitserve-replica", b"r1")] if replica else [])
    return {"type": "http.response.start", "status": status, "headers": headers}


def _body(data: bytes, more: bool) -> dict:
    return {"type": "http.response.body", "body": data, "more_body": more}


def test_proxy_middleware_answers_for_a_replica_that_died_before_answering():
    sent = _run_middleware([])  # Ray's proxy sends nothing when the replica's actor died
    assert sent[0]["status"] == 500
    error = json.loads(sent[1]["body"])["error"]
    assert error["code"] == "replica_failed" and error["type"] == "server_error"


def test_proxy_middleware_ends_a_cut_stream_with_an_error_event():
    sent = _run_middleware([_start(200, b"text/event-stream"), _body(b'data: {"x": 1}\n\n', True), _body(b"", False)])
    assert all(m.get("more_body", False) for m in sent[1:-1]) and not sent[-1]["more_body"]
    events = b"".join(m["body"] for m in sent[1:]).decode().strip().split("\n\n")
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "replica_failed"
    assert events[-1] == "data: [DONE]"


def test_proxy_middleware_leaves_whole_streams_and_replica_errors_alone():
    whole = [_start(200, b"text/event-stream"), _body(b'data: {"x": 1}\n\n', True), _body(b"data: [DONE]\n\n", False)]
    assert _run_middleware(whole) == whole
    replica_error = [_start(400, b"application/json"), _body(b'{"error": {"message": "bad"}}', False)]
    assert _run_middleware(replica_error) == replica_error


def test_proxy_middleware_rewrites_ray_backpressure_as_openai_json():
    start = {"type": "http.response.start", "status": 503,
             "headers": [(b"content-type", b"text/plain"), (b"retry-after", b"2")]}
    sent = _run_middleware([start, _body(b"Request dropped due to backpressure", False)])
    headers = dict(sent[0]["headers"])
    assert sent[0]["status"] == 503 and headers[b"retry-after"] == b"2"
    assert headers[b"content-type"] == b"application/json"
    error = json.loads(sent[1]["body"])["error"]
    assert error["message"] == "Request dropped due to backpressure" and error["type"] == "service_unavailable_error"
    assert int(headers[b"content-length"]) == len(sent[1]["body"])


ROOT = Path(__file__).resolve().parents[1]


def _serve_configs() -> list[dict]:
    service = yaml.safe_load((ROOT / "deploy/k8s/ray/rayservice.yaml").read_text())
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    return [yaml.safe_load((ROOT / "deploy/ray/serve-config.yaml").read_text()),
            yaml.safe_load(service["spec"]["serveConfigV2"])]


@pytest.mark.parametrize("index", [0, 1], ids=["serve-config.yaml", "rayservice.yaml serveConfigV2"])
def test_deploy_serve_configs_follow_ray_serves_schema_and_build(index, monkeypatch):
    config = ServeDeploySchema.model_validate(_serve_configs()[index])
    app = config.applications[0]
    assert app.import_path == "fitserve.cli:app_builder" and app.route_prefix == "/"
    built = {}
    monkeypatch.setattr(launch, "engine_on_gpu", lambda device: True)
    monkeypatch.setattr(launch, "build_application", lambda engine, server, options, *rest: built.update(
        engine=engine, server=server, options=options.deployment_options()))
    app_builder(app.args)  # what `serve deploy` runs: every arg must be a fitserve serve flag
    assert built["engine"].model == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert built["options"]["autoscaling_config"]["max_replicas"] == 4
    assert built["options"]["ray_actor_options"] == {"num_cpus": 4.0, "num_gpus": 1.0}
    assert built["options"]["max_queued_requests"] == 1024 and built["server"].shutdown_timeout_s == 60
