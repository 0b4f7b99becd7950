"""benchmarks/device_models.py on the CPU with a fake part runner: the time budget, a failing part that
loses only itself, the saved JSON and the table's ratios to Llama bf16 from the same call."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import device_models  # noqa: E402

CEILINGS = {"card": "fake", "copy_bytes_per_s": 4.23e12, "bf16_flops_per_s": 749e12, "fp8_flops_per_s": 1392e12}


def fake_run(requests_per_s: float, tpot_ms: float, duration_s: float) -> dict:
    return {"request_throughput": requests_per_s, "duration_s": duration_s, "tpot_ms": {"median": tpot_ms}}


def fake_part_runner(calls: list):
    """gpu_bench.run_part's stand-in: ceilings, a gptq part that cannot start, others that ran."""
    def run_part(part: str, extra: list[str], timeout_s: float) -> dict:
        calls.append((part, extra, timeout_s))
        if part == "ceilings":
            return CEILINGS
        variant = extra[extra.index("--quant-variant") + 1]
        if variant == "gptq_int4":
            return {"error": "exit code 1", "stderr_tail": "ConfigError: --quantization gptq"}
        workloads = extra[extra.index("--workloads") + 1:]
        workloads = workloads[:next((i for i, w in enumerate(workloads) if w.startswith("--")), len(workloads))]
        speed = 2.0 if variant == "q4_k_m" else 1.0
        return {"runs": {w: fake_run(10 * speed, 6.0 / speed, 5.0 / speed) for w in workloads}}
    return run_part


def test_each_group_fits_the_nine_minute_call():
    for group in ("quant", "models"):
        assert device_models.estimated_total_s(device_models.parts_for(group)) < 540
    names = {p.name for p in device_models.parts_for("all")}
    assert {"llama-bf16", "llama-gptq_int4", "llama-q4_k_m", "llama-fp8", "llama-fp8_w8a16", "qwen3-8b",
            "mistral-7b", "gemma-3-12b", "mixtral-8x7b"} <= names
    for part in device_models.PARTS:
        assert (device_models.CONFIGS / part.model / "config.json").is_file()


def test_a_failing_part_loses_only_itself(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(device_models.gpu_bench, "run_part", fake_part_runner(calls))
    report = device_models.run(argparse.Namespace(group="quant", budget_s=10_000, out=str(tmp_path), int_kernels=None))
    assert [c[0] for c in calls].count("ceilings") == 1
    assert "error" in report["results"]["llama-gptq_int4"]
    assert "runs" in report["results"]["llama-q4_k_m"]  # ran after the failure
    assert not report["skipped"]
    saved = json.loads((tmp_path / "device_models.json").read_text())
    assert set(saved["results"]) == {p.name for p in device_models.parts_for("quant")}
    assert saved["floors"]["llama-3-8b-instruct"]["bf16"]["model"]["params"] == 8_030_261_248


def test_int_kernels_reach_every_part(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(device_models.gpu_bench, "run_part", fake_part_runner(calls))
    args = argparse.Namespace(group="quant", budget_s=10_000, out=str(tmp_path), int_kernels="swap_n64_k4")
    assert device_models.run(args)["int_kernels"] == "swap_n64_k4"
    parts = [extra for name, extra, *_ in calls if name == "fitserve"]
    assert parts and all(extra[-2:] == ["--int-kernels", "swap_n64_k4"] for extra in parts)


def test_parts_that_no_longer_fit_are_skipped_not_started(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(device_models.gpu_bench, "run_part", fake_part_runner(calls))
    def clock():  # the first part alone takes 400 s of a 450 s budget
        yield from (0.0, 0.0, 0.0)
        while True:
            yield 400.0
    ticks = clock()
    monkeypatch.setattr(device_models.time, "monotonic", lambda: next(ticks))
    report = device_models.run(argparse.Namespace(group="quant", budget_s=450, out=str(tmp_path), int_kernels=None))
    started = [extra for part, extra, _ in calls if part == "fitserve"]
    assert len(started) == 1 + sum(p.estimate_s <= 50 for p in device_models.parts_for("quant")[1:])
    assert report["skipped"] and all("left" in s for s in report["skipped"])


def test_table_compares_with_llama_bf16_from_the_same_call(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(device_models.gpu_bench, "run_part", fake_part_runner(calls))
    report = device_models.run(argparse.Namespace(group="quant", budget_s=10_000, out=str(tmp_path), int_kernels=None))
    rows = device_models.table_rows(report)
    q4_single = next(r for r in rows if r.startswith("llama-q4_k_m ") and " single " in r)
    assert q4_single.split()[6] == "2.00"  # bf16's TPOT over q4_k_m's: twice as fast
    q4_w1 = next(r for r in rows if r.startswith("llama-q4_k_m ") and " W1 " in r)
    assert q4_w1.split()[6] == "2.00"  # req/s over bf16's
    assert any(r.startswith("llama-gptq_int4") and "failed" in r for r in rows)
    floor = report["floors"]["llama-3-8b-instruct"]["bf16"]["floors_s"]["W1"]
    bf16_w1 = next(r for r in rows if r.startswith("llama-bf16 ") and " W1 " in r)
    assert float(bf16_w1.split()[2]) == pytest.approx(floor, abs=0.01)


def test_part_timeout_is_bounded_by_the_time_left():
    part = device_models.PARTS[0]
    assert device_models.part_timeout_s(part, 10_000) == device_models.PART_TIMEOUT_OVER_ESTIMATE * part.estimate_s
    assert device_models.part_timeout_s(part, 90) == 90


def test_targets_are_checked_against_floors_and_bf16(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(device_models.gpu_bench, "run_part", fake_part_runner(calls))
    report = device_models.run(argparse.Namespace(group="all", budget_s=10_000, out=str(tmp_path), int_kernels=None))
    checks = {(c["part"], c["workload"], c["what"]): c for c in report["targets"]}
    assert checks[("llama-q4_k_m", "single", "speedup")]["value"] == pytest.approx(2.0)
    assert checks[("llama-q4_k_m", "single", "speedup")]["met"] is False  # 2.0 < 2.5
    assert checks[("llama-q4_k_m", "W2", "reqs_over_bf16")]["met"] is True  # 2.0 >= 0.9
    assert checks[("llama-gptq_int4", "W1", "reqs_over_bf16")]["met"] is None  # it did not start
    w1 = checks[("qwen3-8b", "W1", "eff")]
    floor = report["floors"]["qwen3-8b"]["bf16"]["floors_s"]["W1"]
    assert w1["value"] == pytest.approx(floor / 5.0) and w1["met"] == (floor / 5.0 >= 0.8)
    tpot = checks[("llama-fp8_w8a16", "single", "tpot_over_floor")]
    token_floor = report["floors"]["llama-3-8b-instruct"]["fp8_w8a16"]["single_token_floor_ms"]
    assert tpot["value"] == pytest.approx(6.0 / token_floor) and tpot["met"] is False
    assert json.loads((tmp_path / "device_models.json").read_text())["targets"] == report["targets"]
