"""The compiled CPU decode step (--cpu-compile decode, runner/cpu_compile.py) against the eager one, on a
tiny random Llama: logits within float32 rounding, the same greedy tokens alone and batched."""

from __future__ import annotations

import os

import pytest
import torch

from fitserve.config import ConfigError, EngineConfig, inductor_cache_dir
from fitserve.core.outputs import SchedulerOutput
from fitserve.kernels import reference
from fitserve.llm import LLM
from fitserve.runner.input_batch import build_forward_batch, chunks_on_blocks
from fitserve.sampling_params import SamplingParams
from paged_helpers import make_batch
from tiny_model import tiny_engine_config, write_tiny_model

PROMPTS = [[5, 6, 7, 8, 9], list(range(20, 37)), [(7 * i) % 250 + 3 for i in range(33)]]  # 1, 2 and 3 blocks of 16
LOGITS_TOLERANCE = 1e-4  # float32: inductor's fused reductions round in another order than aten's


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """(eager LLM, compiled LLM) on the same tiny random weights; inductor's cache in a fresh folder."""
    folder = write_tiny_model(tmp_path_factory.mktemp("tiny"))
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
    try:
        eager = LLM(config=tiny_engine_config(folder))
        compiled = LLM(config=tiny_engine_config(folder, cpu_compile="decode"))
        yield eager, compiled
    finally:
        monkeypatch.undo()


def _counting_compiled_steps(llm: LLM) -> list[int]:
    """Counts the compiled decode steps the runner takes (batch sizes), so a silent eager fallback fails."""
    compile_step = llm.engine.runner.cpu_compile
    assert compile_step is not None
    sizes: list[int] = []
    run = compile_step.run

    def counted(scheduled, fill=None):
        sizes.append(len(scheduled))
        return run(scheduled, fill)

    compile_step.run = counted
    return sizes


def _prefill_then_decode(llm: LLM, prompts: list[list[int]]) -> tuple:
    """Prefills the prompts (eager) on their own blocks; returns the decode step that follows them."""
    runner = llm.engine.runner
    block_size = runner.capacity.block_size
    params = SamplingParams(temperature=0.0)
    runner.execute_async(_scheduler_output(chunks_on_blocks([(tuple(p), 0) for p in prompts], "t", block_size,
                                                            params))).result()
    return chunks_on_blocks([((p[-1],), len(p)) for p in prompts], "t", block_size, params)


def _scheduler_output(scheduled) -> SchedulerOutput:
    return SchedulerOutput(scheduled=scheduled, finished_request_ids=frozenset())


@pytest.mark.slow
@pytest.mark.parametrize("prompts", [PROMPTS[2:], PROMPTS], ids=["one", "batched"])
def test_compiled_decode_logits_match_eager(engines, prompts):
    _, llm = engines
    runner = llm.engine.runner
    decode = _prefill_then_decode(llm, prompts)
    with torch.inference_mode():
        batch = build_forward_batch(decode, runner.capacity.block_size, runner.device)
        eager = runner.model.compute_logits(runner.model(batch))
        compiled = runner.cpu_compile.run(decode)
    assert compiled.shape == eager.shape == (len(prompts), 300)
    torch.testing.assert_close(compiled, eager, atol=LOGITS_TOLERANCE, rtol=LOGITS_TOLERANCE)
    assert torch.equal(compiled.argmax(-1), eager.argmax(-1))


@pytest.mark.slow
def test_compiled_greedy_tokens_equal_eager_alone_and_batched(engines):
    eager, compiled = engines
    sizes = _counting_compiled_steps(compiled)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = [out.token_ids for out in eager.generate(PROMPTS, params)]
    assert [out.token_ids for out in compiled.generate(PROMPTS, params)] == expected
    for prompt, tokens in zip(PROMPTS, expected):
        assert compiled.generate([prompt], params)[0].token_ids == tokens
    assert 1 in sizes and len(PROMPTS) in sizes  # both buckets ran compiled


def test_cpu_compile_flag_is_checked():
    with pytest.raises(ConfigError, match="--cpu-compile"):
        EngineConfig(cpu_compile="full")
    assert EngineConfig().cpu_compile == "off"


def test_inductor_cache_dir_is_under_the_user_cache_unless_the_environment_says(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert inductor_cache_dir() == os.path.join(str(tmp_path), "fitserve", "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert inductor_cache_dir() == str(tmp_path / "mine")


@pytest.mark.parametrize("num_heads,num_kv_heads", [(9, 3), (4, 4), (6, 1)])
def test_in_place_decode_attention_matches_the_gathered_sdpa(num_heads, num_kv_heads):
    """kernels/reference._decode_attention_in_place (what a compiled step traces), run eagerly, against the
    eager decode attention: contexts of 1, a partial block and several blocks, tables padded with block 0."""
    generator = torch.Generator().manual_seed(3)
    block_size, head_dim, num_blocks = 4, 8, 16
    k_cache, v_cache = (torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator)
                        for _ in range(2))
    seq_lens = [1, 6, 13]
    tables = [[5, 0, 0, 0], [2, 9, 0, 0], [3, 7, 11, 1]]
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=generator)
    batch = make_batch(input_ids=[0] * 3, positions=[n - 1 for n in seq_lens], slots=[0] * 3, query_lens=[1] * 3,
                       seq_lens=seq_lens, block_tables=tables)
    expected = reference.paged_attention(q, k_cache, v_cache, batch, scale=head_dim ** -0.5)
    got = reference._decode_attention_in_place(q, k_cache, v_cache, torch.tensor(tables), torch.tensor(seq_lens),
                                               head_dim ** -0.5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
