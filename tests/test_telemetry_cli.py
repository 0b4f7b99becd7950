"""`fitserve serve`'s telemetry flags and which GPU it samples."""

from __future__ import annotations

from fitserve.cli import gpu_ids_in_use, main


def test_serve_flags(capsys):
    assert main(["serve", "--gpu-telemetry-interval", "-1"]) == 2
    assert "--gpu-telemetry-interval must be 0 (off) or more seconds" in capsys.readouterr().err


def test_a_cpu_engine_uses_no_gpu():
    class CpuDevice:
        type = "cpu"

    class Runner:
        device = CpuDevice()

    class Engine:
        runner = Runner()

    assert gpu_ids_in_use(Engine()) == [] and gpu_ids_in_use(object()) == []
