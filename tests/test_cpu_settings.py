"""The CPU path's start-up choices (runner/cpu_settings.py): --dtype auto per CPU, torch's threads."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from fitserve.config import CacheConfig, ConfigError, EngineConfig, SchedulerConfig
from fitserve import startup
from fitserve.runner.cpu_settings import (
    CpuFeatures,
    cpu_auto_dtype,
    resolve_cpu_dtype,
    set_cpu_threads,
)
from plan_helpers import write_model_folder


def test_auto_is_float32_without_bf16_units_and_bfloat16_with_them():
    assert cpu_auto_dtype(CpuFeatures(fast_bf16=False)) == "float32"
    assert cpu_auto_dtype(CpuFeatures(fast_bf16=True)) == "bfloat16"


def test_an_explicit_dtype_is_kept_on_any_cpu():
    for dtype in ("bfloat16", "float16", "float32"):
        assert resolve_cpu_dtype(dtype, CpuFeatures(fast_bf16=False)) == dtype
        assert resolve_cpu_dtype(dtype, CpuFeatures(fast_bf16=True)) == dtype


def test_the_engine_serves_float32_on_a_cpu_without_bf16_units(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(startup, "cpu_features", lambda: CpuFeatures(fast_bf16=False))
    folder = write_model_folder(tmp_path / "tiny")
    config = EngineConfig(model=str(folder), load_format="dummy", device="cpu",
                          cache=CacheConfig(kv_cache_memory_bytes=1 << 20), scheduler=SchedulerConfig(max_model_len=64))
    with caplog.at_level(logging.INFO):
        built = startup.build_engine(config, progress=False)
    runner = built.engine.runner
    assert runner.kv_caches[0][0].dtype == torch.float32
    assert next(runner.model.parameters()).dtype == torch.float32
    assert "has no bf16 units" in caplog.text


def test_the_engine_keeps_bfloat16_on_a_cpu_with_bf16_units(tmp_path, monkeypatch):
    monkeypatch.setattr(startup, "cpu_features", lambda: CpuFeatures(fast_bf16=True))
    folder = write_model_folder(tmp_path / "tiny")
    config = EngineConfig(model=str(folder), load_format="dummy", device="cpu",
                          cache=CacheConfig(kv_cache_memory_bytes=1 << 20), scheduler=SchedulerConfig(max_model_len=64))
    runner = startup.build_engine(config, progress=False).engine.runner
    assert runner.kv_caches[0][0].dtype == torch.bfloat16


def test_set_cpu_threads_sets_torch_and_zero_leaves_it():
    before = torch.get_num_threads()
    try:
        assert set_cpu_threads(1) == 1 and torch.get_num_threads() == 1
        assert set_cpu_threads(0) == 1 and torch.get_num_threads() == 1
        assert set_cpu_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_openmp_threads_sleep_when_idle_unless_the_user_says_otherwise():
    """fitserve sets OMP_WAIT_POLICY=PASSIVE on import, before torch loads OpenMP, without
    overriding a value already in the environment (a fresh interpreter each time)."""
    code = "import fitserve, os; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "ACTIVE"


def test_cpu_threads_below_zero_is_refused():
    with pytest.raises(ConfigError, match="--cpu-threads"):
        EngineConfig(cpu_threads=-1)


def test_the_engine_sets_the_cpu_threads_it_is_given(tmp_path):
    folder = write_model_folder(tmp_path / "tiny")
    config = EngineConfig(model=str(folder), load_format="dummy", device="cpu", cpu_threads=1,
                          cache=CacheConfig(kv_cache_memory_bytes=1 << 20), scheduler=SchedulerConfig(max_model_len=64))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        startup.build_engine(config, progress=False)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
