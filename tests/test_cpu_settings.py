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
from fitserve.kernels import cpu_matmul
from fitserve.runner import cpu_settings
from fitserve.runner.cpu_settings import set_cpu_threads
from plan_helpers import write_model_folder


def _tiny_config(tmp_path, **kwargs) -> EngineConfig:
    folder = write_model_folder(tmp_path / "tiny")
    return EngineConfig(model=str(folder), load_format="dummy", device="cpu", **kwargs,
                        cache=CacheConfig(kv_cache_memory_bytes=1 << 20), scheduler=SchedulerConfig(max_model_len=64))


@pytest.mark.parametrize("bf16_units", [False, True])
def test_auto_serves_bfloat16_on_any_cpu_and_says_how_it_multiplies(tmp_path, monkeypatch, caplog, bf16_units):
    monkeypatch.setattr(cpu_settings, "cpu_has_bf16_units", lambda: bf16_units)
    with caplog.at_level(logging.INFO):
        runner = startup.build_engine(_tiny_config(tmp_path), progress=False).engine.runner
    assert runner.kv_caches[0][0].dtype == torch.bfloat16
    assert next(runner.model.parameters()).dtype == torch.bfloat16
    assert ("several rows in float32 from the bf16 weights" in caplog.text) is not bf16_units


def test_an_explicit_float32_is_served_in_float32(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(cpu_settings, "cpu_has_bf16_units", lambda: False)
    with caplog.at_level(logging.INFO):
        runner = startup.build_engine(_tiny_config(tmp_path, dtype="float32"), progress=False).engine.runner
    assert runner.kv_caches[0][0].dtype == torch.float32
    assert next(runner.model.parameters()).dtype == torch.float32
    assert "bf16 units" not in caplog.text


def test_a_bf16_engine_on_a_cpu_without_bf16_units_batches_through_the_widened_matmul(tmp_path, monkeypatch):
    """A decode step of several requests reaches kernels/cpu_matmul.py's float32 path, one request
    torch's bf16 GEMV; both give the same greedy tokens here."""
    from fitserve.sampling_params import SamplingParams
    monkeypatch.setattr(cpu_matmul, "cpu_has_bf16_units", lambda: False)
    rows = []
    widened = cpu_matmul.linear_bf16_widened
    monkeypatch.setattr(cpu_matmul, "linear_bf16_widened", lambda x, w: rows.append(x.shape[0]) or widened(x, w))
    engine = startup.build_engine(_tiny_config(tmp_path), progress=False).engine
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = [[5, 9, 14, 3], [7, 7, 2], [11, 4, 8, 1, 6]]

    def run(batch: list[list[int]], tag: str) -> dict[str, list[int]]:
        for i, prompt in enumerate(batch):
            engine.add_request(engine.make_request(f"{tag}{i}", prompt, params))
        tokens: dict[str, list[int]] = {}
        while engine.has_unfinished:
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        return tokens

    alone = [run([p], f"alone{i}-")[f"alone{i}-0"] for i, p in enumerate(prompts)]
    rows.clear()
    batched = run(prompts, "batch")
    assert len(prompts) in rows  # the decode steps of the three requests took the widened path
    assert [batched[f"batch{i}"] for i in range(len(prompts))] == alone


def test_set_cpu_threads_sets_torch_and_zero_leaves_it():
    before = torch.get_num_threads()
    try:
        assert set_cpu_threads(1) == 1 and torch.get_num_threads() == 1
        assert set_cpu_threads(0) == 1 and torch.get_num_threads() == 1
        assert set_cpu_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_openmp_threads_spin_briefly_unless_the_user_says_otherwise():
    """fitserve sets GOMP_SPINCOUNT=1000 and OMP_WAIT_POLICY=PASSIVE on import, before torch loads OpenMP;
    a wait policy or spin count already in the environment is kept, and then no spin count is added
    (a fresh interpreter each time)."""
    code = "import fitserve, os; print(os.environ['OMP_WAIT_POLICY'], os.environ.get('GOMP_SPINCOUNT'))"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)

    def settings(**user):
        return subprocess.run([sys.executable, "-c", code], env=env | user, capture_output=True, text=True,
                              check=True).stdout.split()

    assert settings() == ["PASSIVE", "1000"]
    assert settings(OMP_WAIT_POLICY="PASSIVE") == ["PASSIVE", "None"]  # threads asleep, as asked
    assert settings(OMP_WAIT_POLICY="ACTIVE") == ["ACTIVE", "None"]
    assert settings(GOMP_SPINCOUNT="30000") == ["PASSIVE", "30000"]


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


def test_one_token_steps_run_on_one_thread_and_the_others_on_all(tmp_path, monkeypatch):
    """The runner sets torch's threads per eager CPU step, in the thread that runs the step: one for a
    single stream's decode, --cpu-threads (here 2) for a prefill or a batch of decodes."""
    import threading
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    from fitserve.sampling_params import SamplingParams
    engine = startup.build_engine(_tiny_config(tmp_path, cpu_threads=2), progress=False).engine
    seen: list[tuple[int, int]] = []  # (tokens in the step, torch threads during its forward)
    model = engine.runner.model
    forward = model.forward
    model.forward = lambda batch: seen.append((batch.input_ids.numel(), torch.get_num_threads())) or forward(batch)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)

    def run(prompts: list[list[int]]) -> None:
        for i, prompt in enumerate(prompts):
            engine.add_request(engine.make_request(f"r{len(seen)}-{i}", prompt, params))
        while engine.has_unfinished:
            engine.step()

    before = torch.get_num_threads()
    try:
        worker = threading.Thread(target=run, args=([[5, 9, 14, 3]],))  # as the server's engine thread
        worker.start()
        worker.join()
        run([[5, 9, 14], [7, 7, 2, 8]])
    finally:
        torch.set_num_threads(before)
    assert seen == [(4, 2), (1, 1), (1, 1), (7, 2), (2, 2), (2, 2)]


def test_every_step_uses_every_thread_where_the_threads_spin(tmp_path, monkeypatch):
    monkeypatch.setenv("GOMP_SPINCOUNT", "30000")
    assert startup.build_engine(_tiny_config(tmp_path), progress=False).engine.runner.step_threads is None
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert startup.build_engine(_tiny_config(tmp_path), progress=False).engine.runner.step_threads is None
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    assert startup.build_engine(_tiny_config(tmp_path), progress=False).engine.runner.step_threads is not None
