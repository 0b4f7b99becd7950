"""Start-up warm-up steps (runner/warmup.py): they run on the real runner and change nothing a
request gets afterwards."""

from __future__ import annotations

from tiny_model import tiny_engine_config, write_tiny_model

from fitserve.startup import build_engine
from fitserve.runner.warmup import WARM_UP_STEPS, warm_up
from fitserve.sampling_params import SamplingParams


def greedy_outputs(engine) -> dict[str, list[int]]:
    for i, prompt in enumerate(([1, 2, 3], list(range(5, 40)), [7] * 17)):
        engine.add_request(engine.make_request(f"r{i}", prompt, SamplingParams(max_tokens=8, temperature=0,
                                                                                ignore_eos=True)))
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished:
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


def test_warm_up_runs_every_step_and_leaves_no_trace(tmp_path):
    config = tiny_engine_config(write_tiny_model(tmp_path / "tiny"))
    expected = greedy_outputs(build_engine(config, progress=False).engine)
    engine = build_engine(config, progress=False).engine
    assert warm_up(engine.runner) == len(WARM_UP_STEPS)
    assert engine.runner.sampler.token_counts.num_tracked == 0
    assert greedy_outputs(engine) == expected
