"""`fitserve serve`'s telemetry flags and which GPU it samples."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from fitserve.cli import main
from fitserve.startup import gpu_ids_in_use


def test_serve_flags(capsys):
    assert main(["serve", "--gpu-telemetry-interval", "-1"]) == 2
    assert "--gpu-telemetry-interval must be 0 (off) or more seconds" in capsys.readouterr().err


def test_a_cpu_engine_uses_no_gpu():
    assert gpu_ids_in_use(torch.device("cpu")) == [] and gpu_ids_in_use(torch.device("cpu"), 2) == []


def test_a_tensor_parallel_engine_uses_the_gpus_after_rank_0s(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(uuid=f"GPU-{index}"))
    assert gpu_ids_in_use(torch.device("cuda", 2), 3) == ["GPU-2", "GPU-3", "GPU-4"]
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace())  # torch without uuid
    assert gpu_ids_in_use(torch.device("cuda", 1)) == [1]
