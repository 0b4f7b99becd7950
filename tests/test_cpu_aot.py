"""The CPU decode step as an AOTInductor package (--cpu-compile aot, runner/cpu_aot.py) against the eager
step, on a tiny random Llama in float32: logits within rounding, the KV cache written in place as eager
writes it, the same greedy tokens alone and batched; a second engine loads the package it built; an
engine without a package serves eager steps while a child process builds it, then takes it up."""

from __future__ import annotations

import multiprocessing
import os
import sys

import pytest
import torch

from fitserve.config import CPU_COMPILE_ENV, ConfigError, EngineConfig
from fitserve.cli import build_parser
from fitserve.flags import engine_config_from_args
from fitserve.llm import LLM
from fitserve.runner.cpu_aot import BUILD_HERE_ENV, CpuDecodePackage
from fitserve.runner.input_batch import build_forward_batch, chunks_on_blocks
from fitserve.sampling_params import SamplingParams
from test_cpu_compile import PROMPTS, _counting_compiled_steps, _prefill_then_decode
from tiny_model import tiny_engine_config, write_tiny_model

LOGITS_TOLERANCE = 1e-4  # float32: inductor's fused reductions round in another order than aten's


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """(eager LLM, AOT LLM) on the same tiny random weights, the package built into a fresh folder."""
    folder = write_tiny_model(tmp_path_factory.mktemp("tiny"))
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
    monkeypatch.setenv(BUILD_HERE_ENV, "1")  # built in place, before the first step (the background: below)
    try:
        yield LLM(config=tiny_engine_config(folder)), LLM(config=tiny_engine_config(folder, cpu_compile="aot")), folder
    finally:
        monkeypatch.undo()


@pytest.mark.slow
@pytest.mark.parametrize("prompts", [PROMPTS[2:], PROMPTS], ids=["one", "batched"])
def test_packaged_decode_matches_eager_logits_and_kv_writes(engines, prompts):
    _, llm, _ = engines
    runner = llm.engine.runner
    assert isinstance(runner.cpu_compile, CpuDecodePackage) and runner.cpu_compile.built
    decode = _prefill_then_decode(llm, prompts)
    k_before = runner.kv_caches[0][0].clone()
    with torch.inference_mode():
        packaged = runner.cpu_compile.run(decode)
        k_packaged = runner.kv_caches[0][0].clone()
        runner.kv_caches[0][0].copy_(k_before)
        batch = build_forward_batch(decode, runner.capacity.block_size, runner.device)
        eager = runner.model.compute_logits(runner.model(batch))
    assert not torch.equal(k_packaged, k_before)  # the package wrote the runner's own cache
    torch.testing.assert_close(k_packaged, runner.kv_caches[0][0], atol=1e-6, rtol=1e-6)
    assert packaged.shape == eager.shape == (len(prompts), 300)
    torch.testing.assert_close(packaged, eager, atol=LOGITS_TOLERANCE, rtol=LOGITS_TOLERANCE)


@pytest.mark.slow
def test_packaged_greedy_tokens_equal_eager_alone_and_batched(engines):
    eager, packaged, _ = engines
    sizes = _counting_compiled_steps(packaged)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = [out.token_ids for out in eager.generate(PROMPTS, params)]
    assert [out.token_ids for out in packaged.generate(PROMPTS, params)] == expected
    for prompt, tokens in zip(PROMPTS, expected):
        assert packaged.generate([prompt], params)[0].token_ids == tokens
    assert 1 in sizes and len(PROMPTS) in sizes  # one export served one row and three


@pytest.mark.slow
def test_a_second_engine_loads_the_package_and_other_shapes_key_another(engines):
    eager, packaged, folder = engines
    first = packaged.engine.runner.cpu_compile
    again = LLM(config=tiny_engine_config(folder, cpu_compile="aot"))
    package = again.engine.runner.cpu_compile
    assert package.path == first.path and not package.built  # loaded, not built
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    assert again.generate(PROMPTS, params)[0].token_ids == eager.generate(PROMPTS, params)[0].token_ids
    runner = again.engine.runner
    other = CpuDecodePackage(runner.model, runner.kv_caches, runner.capacity.block_size, 8, 256,
                             str(first.path.parent.parent))
    assert other.path != first.path  # max_num_seqs 8, not 16: another package


@pytest.mark.slow
def test_without_a_package_eager_steps_serve_while_a_child_builds_it(tmp_path, monkeypatch):
    folder = write_tiny_model(tmp_path / "tiny")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.delenv(BUILD_HERE_ENV, raising=False)
    eager = LLM(config=tiny_engine_config(folder))
    llm = LLM(config=tiny_engine_config(folder, cpu_compile="aot"))
    package = llm.engine.runner.cpu_compile
    assert package.builder is not None and package.builder.is_alive() and not package.path.exists()
    # the child builds with one longest request's KV blocks; the package serves this larger cache
    assert llm.engine.runner.kv_caches[0][0].shape[0] > package.builder_kv_blocks
    sizes = _counting_compiled_steps(llm)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    expected = [out.token_ids for out in eager.generate(PROMPTS, params)]
    assert [out.token_ids for out in llm.generate(PROMPTS, params)] == expected
    package.builder.join(timeout=300)
    assert package.builder.exitcode == 0 and package.path.exists()
    assert [out.token_ids for out in llm.generate(PROMPTS, params)] == expected
    assert package.builder is None and package.built and len(PROMPTS) in sizes  # adopted, then served


def test_a_failed_build_leaves_a_marker_and_later_starts_stay_eager(engines, tmp_path, monkeypatch):
    monkeypatch.delenv(BUILD_HERE_ENV)  # the fixture's: here a builder child is wanted
    eager, _, _ = engines
    runner = eager.engine.runner

    def failing_builder(kv_blocks):
        process = multiprocessing.get_context("spawn").Process(target=sys.exit, args=(3,))
        process.start()
        return process

    package = CpuDecodePackage(runner.model, runner.kv_caches, runner.capacity.block_size, 16, 256, str(tmp_path),
                               failing_builder)
    package.warm_up()
    package.builder.join(timeout=60)
    decode = chunks_on_blocks([((5,), 3)], "t", runner.capacity.block_size, SamplingParams())
    assert not package.can_run(decode, 1)  # the child exited 3: no package, stay eager
    assert package.failed_marker.exists() and "exit code 3" in package.failed_marker.read_text()
    again = CpuDecodePackage(runner.model, runner.kv_caches, runner.capacity.block_size, 16, 256, str(tmp_path),
                             lambda kv_blocks: pytest.fail("a failed build is not tried again"))
    again.warm_up()
    assert again.builder is None and not again.can_run(decode, 1)


def test_aot_with_tensor_parallelism_is_refused():
    with pytest.raises(ConfigError, match="--cpu-compile aot"):
        EngineConfig(cpu_compile="aot", tensor_parallel_size=2)


def test_the_default_is_the_package_for_one_process(monkeypatch):
    """auto (the default without $FITSERVE_CPU_COMPILE, which the tests' conftest sets to off): aot, off
    with tensor parallelism; the variable sets the default, the flag wins over it."""
    monkeypatch.delenv(CPU_COMPILE_ENV, raising=False)
    assert EngineConfig().cpu_compile == "auto" and EngineConfig().cpu_compile_mode == "aot"
    assert EngineConfig(tensor_parallel_size=2).cpu_compile_mode == "off"
    monkeypatch.setenv(CPU_COMPILE_ENV, "decode")
    assert EngineConfig().cpu_compile_mode == "decode" and EngineConfig(cpu_compile="off").cpu_compile_mode == "off"
    assert engine_config_from_args(build_parser().parse_args(["serve"])).cpu_compile == "decode"


def test_auto_stays_eager_without_a_cpp_compiler(monkeypatch):
    """A slim image has no g++: auto then serves eager steps instead of starting a build that must fail;
    an explicit aot still tries (and a failed build leaves its marker, above)."""
    from fitserve import startup
    cpu = torch.device("cpu")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert startup.cpp_compiler() is not None  # this machine's g++ (inductor reads $CXX once, at import)
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ  # the package stays under fitserve's own cache dir
    assert startup.cpu_compile_mode(EngineConfig(cpu_compile="auto"), cpu) == "aot"
    monkeypatch.setattr(startup, "cpp_compiler", lambda: None)
    assert startup.cpu_compile_mode(EngineConfig(cpu_compile="auto"), cpu) == "off"
    assert startup.cpu_compile_mode(EngineConfig(cpu_compile="aot"), cpu) == "aot"
    assert startup.cpu_compile_mode(EngineConfig(cpu_compile="auto"), torch.device("cuda")) == "aot"  # unused there


def test_offline_llm_leaves_auto_eager(tmp_path):
    """The offline LLM does not spawn auto's builder (a spawned child imports the caller's script again);
    it builds the package only when asked for by name (the tests above)."""
    folder = write_tiny_model(tmp_path / "tiny")
    llm = LLM(config=tiny_engine_config(folder, cpu_compile="auto"))
    assert llm.engine.runner.cpu_compile is None
