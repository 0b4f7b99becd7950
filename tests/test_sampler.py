import math

import torch

from fitserve.core.outputs import ScheduledRequest
from fitserve.runner.sampler import Sampler, apply_filters
from fitserve.sampling_params import SamplingParams


def chunk(request_id, **params):
    return ScheduledRequest(request_id, (1,), 0, (0,), True, SamplingParams(**params))


def test_greedy_takes_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 1.0]])
    sampler = Sampler(torch.device("cpu"), seed=0)
    assert sampler.sample(logits, [chunk("a", temperature=0), chunk("b", temperature=0)]).token_ids == [1, 0]


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0]])
    out = apply_filters(logits, [SamplingParams(top_k=2)])
    assert torch.isfinite(out[0]).tolist() == [False, True, True, False, False]


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = apply_filters(probs.log(), [SamplingParams(top_p=0.7)])
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False], "0.5 < 0.7, 0.5 + 0.3 >= 0.7"
    out = apply_filters(probs.log(), [SamplingParams(top_p=0.01)])
    assert torch.isfinite(out[0]).tolist() == [True, False, False, False], "the top token always stays"


def test_min_p_drops_tokens_below_fraction_of_max():
    probs = torch.tensor([[0.6, 0.25, 0.1, 0.05]])
    out = apply_filters(probs.log(), [SamplingParams(min_p=0.2)])  # threshold 0.12
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]


def test_filters_apply_per_row():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [1.0, 4.0, 3.0, 2.0]])
    out = apply_filters(logits, [SamplingParams(top_k=1), SamplingParams()])
    assert torch.isfinite(out).sum(dim=-1).tolist() == [1, 4]


def test_seeded_request_is_reproducible_whatever_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    runs = []
    for other_seed in (1, 2):
        sampler = Sampler(torch.device("cpu"), seed=other_seed)
        batch = [chunk("x", temperature=1.0), chunk("seeded", temperature=1.0, seed=1234), chunk("y")]
        runs.append([sampler.sample(logits, batch).token_ids[1] for _ in range(20)])
    assert runs[0] == runs[1]
    assert len(set(runs[0])) > 1, "a sampled (not greedy) stream should vary over steps"


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.7, 0.2, 0.1])
    logits = probs.log().expand(4000, 3).contiguous()
    sampler = Sampler(torch.device("cpu"), seed=0)
    ids = sampler.sample(logits, [chunk(f"r{i}") for i in range(4000)]).token_ids
    freq = [ids.count(i) / 4000 for i in range(3)]
    for got, want in zip(freq, probs.tolist()):
        assert math.isclose(got, want, abs_tol=0.03), (freq, probs)


def test_temperature_sharpens():
    logits = torch.tensor([2.0, 1.0, 0.0]).expand(3000, 3).contiguous()
    sampler = Sampler(torch.device("cpu"), seed=0)
    cold = sampler.sample(logits, [chunk(f"c{i}", temperature=0.2) for i in range(3000)]).token_ids
    hot = sampler.sample(logits, [chunk(f"h{i}", temperature=1.0) for i in range(3000)]).token_ids
    assert cold.count(0) > hot.count(0) + 300
