"""`fitserve serve` and a `--replicas` replica start their engines on one path (startup.py): the
same sampling defaults from the model's generation_config.json, the same page info, and telemetry
on every GPU of a tensor-parallel engine. Ray does not run: the replica's start-up is called directly."""

from __future__ import annotations

import sys
from dataclasses import replace
from types import SimpleNamespace

import torch
from fake_nvml import FakeGpu, FakeNvml
from tiny_model import write_tiny_model

import fitserve.startup as startup
from fitserve.engine.async_engine import DEFAULT_MAX_QUEUE_LEN_PER_SEQ
from fitserve.cli import build_parser, engine_config_from_args, serve, server_config_from_args
from fitserve.scaleout import replica
from fitserve.server import launcher

GENERATION_CONFIG = {"temperature": 0.6, "top_p": 0.9, "max_new_tokens": 7, "do_sample": True}
TINY_FLAGS = ("--load-format", "dummy", "--dtype", "float32", "--device", "cpu", "--num-gpu-blocks-override", "128",
              "--max-model-len", "256", "--max-num-seqs", "16")


def serve_args(folder, *flags: str):
    return build_parser().parse_args(["serve", "--model", str(folder), *TINY_FLAGS, *flags])


def server_engine(monkeypatch, args):
    """The engine `fitserve serve` starts (cli.serve's loader), with the HTTP server left out."""
    started = {}

    def load_only(config, host, port, load_engine, **kwargs):
        started["engine"] = load_engine(lambda phase: None)
        return 0

    monkeypatch.setattr(launcher, "serve", load_only)
    assert serve(args) == 0
    return started["engine"]


def test_a_replica_and_a_server_share_the_models_sampling_defaults(tmp_path, monkeypatch):
    folder = write_tiny_model(tmp_path / "tiny", GENERATION_CONFIG)
    args = serve_args(folder, "--max-queue-len", "5", "--gpu-telemetry-interval", "0", "--disable-log-stats")
    server = server_engine(monkeypatch, args)
    # the configs `fitserve serve --replicas` hands each replica (scaleout/launch.py)
    engine, telemetry = replica.start_engine(engine_config_from_args(args), server_config_from_args(args), 0.0, False)
    try:
        expected = {"temperature": 0.6, "top_p": 0.9, "max_tokens": 7}
        assert server.default_sampling_params == expected
        assert engine.default_sampling_params == expected
        assert engine.startup_info == server.startup_info and engine.startup_info["settings"]
        # Ray's router queues for a replica; its engine keeps the default bound
        assert server.max_queue_len == 5
        assert engine.max_queue_len == DEFAULT_MAX_QUEUE_LEN_PER_SEQ * engine.engine.limits.scheduler.max_num_seqs
    finally:
        telemetry.stop()
        engine.shutdown()
        server.shutdown()


def test_a_tensor_parallel_replica_samples_every_gpu_it_uses(tmp_path, monkeypatch):
    gpus = [FakeGpu(uuid=f"GPU-0000000{i}-1111-2222-3333-444444444444") for i in range(3)]
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(gpus))  # what telemetry.nvml.load_nvml imports
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(uuid=gpus[index].uuid))
    build_on_cpu = startup.build_engine

    def build_as_if_on_two_gpus(config, progress=True):
        # The tiny engine runs on the CPU; only where it says its rank 0 runs is a GPU.
        built = build_on_cpu(replace(config, tensor_parallel_size=1), progress)
        return replace(built, device=torch.device("cuda", 0))

    monkeypatch.setattr(startup, "build_engine", build_as_if_on_two_gpus)
    config = replace(engine_config_from_args(serve_args(write_tiny_model(tmp_path / "tiny"))), tensor_parallel_size=2)
    engine, telemetry = replica.start_engine(config, server_config_from_args(serve_args("x")), 60.0, False)
    try:
        assert [device.uuid for device in telemetry.devices] == [gpus[0].uuid, gpus[1].uuid]
    finally:
        telemetry.stop()
        engine.shutdown()
