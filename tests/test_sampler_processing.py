"""The sampler's logits processing: penalties, logit_bias, min_tokens, and logprobs."""

from __future__ import annotations

import torch

from fitserve.core.outputs import ScheduledRequest
from fitserve.runner.sampler import Sampler
from fitserve.sampling_params import SamplingParams

VOCAB = 12


def chunk(request_id, prompt=(1, 2), samples=True, **params):
    params.setdefault("temperature", 0.0)
    sp = SamplingParams(**params)
    prompt_ids = tuple(prompt) if sp.needs_prompt_tokens else None
    return ScheduledRequest(request_id, (prompt[-1],), len(prompt) - 1, (0,), samples, sp, prompt_token_ids=prompt_ids)


def reference_penalties(logits, prompt, outputs, presence, frequency, repetition):
    """A straightforward per-token loop: vLLM's semantics."""
    out = logits.clone()
    for token in range(out.shape[0]):
        count = outputs.count(token)
        if token in prompt or count:
            out[token] = out[token] / repetition if out[token] > 0 else out[token] * repetition
        out[token] -= frequency * count + presence * (count > 0)
    return out


def test_penalties_match_a_reference_over_several_steps():
    torch.manual_seed(0)
    sampler = Sampler(torch.device("cpu"), seed=0)
    settings = [dict(presence_penalty=0.5), dict(frequency_penalty=1.5), dict(repetition_penalty=1.3),
                dict(presence_penalty=-0.7, frequency_penalty=0.4, repetition_penalty=0.8), dict()]
    prompts = [(3, 4, 4), (5,), (6, 7), (1, 8, 9), (2,)]
    outputs = {i: [] for i in range(len(settings))}
    for _ in range(6):
        logits = torch.randn(len(settings), VOCAB) * 3
        chunks = [chunk(f"r{i}", prompt=prompts[i], **settings[i]) for i in range(len(settings))]
        expected = torch.stack([
            reference_penalties(logits[i], prompts[i], outputs[i], s.get("presence_penalty", 0.0),
                                s.get("frequency_penalty", 0.0), s.get("repetition_penalty", 1.0))
            for i, s in enumerate(settings)])
        got = sampler.sample(logits.clone(), chunks).token_ids
        assert got == expected.argmax(dim=-1).tolist()
        for i, token in enumerate(got):
            outputs[i].append(token)
    assert sampler.token_counts.num_tracked == 4  # the row without penalties keeps no state
    sampler.forget(frozenset(f"r{i}" for i in range(5)))
    assert sampler.token_counts.num_tracked == 0 and sampler.token_counts.output_counts.numel() == 0


def test_frequency_penalty_counts_outputs_not_the_prompt():
    sampler = Sampler(torch.device("cpu"), seed=0)
    logits = torch.zeros(1, VOCAB)
    logits[0, 5] = 1.0  # token 5 leads by 1.0
    logits[0, 6] = 0.5
    # Token 5 in the prompt: presence/frequency penalties ignore the prompt, so 5 still wins.
    first = sampler.sample(logits.clone(), [chunk("f", prompt=(5, 5, 5), frequency_penalty=2.0)]).token_ids
    assert first == [5]
    # Now 5 is in the output once: 1.0 - 2.0 < 0.5, so 6 wins.
    assert sampler.sample(logits.clone(), [chunk("f", prompt=(5, 5, 5), frequency_penalty=2.0)]).token_ids == [6]


def test_logit_bias_forces_and_bans_tokens():
    sampler = Sampler(torch.device("cpu"), seed=0)
    logits = torch.randn(3, VOCAB)
    chunks = [chunk("a", logit_bias={7: 100}), chunk("b", temperature=1.0, logit_bias={"9": 100.0}),
              chunk("c", logit_bias={int(logits[2].argmax()): -100})]
    got = sampler.sample(logits.clone(), chunks).token_ids
    assert got[:2] == [7, 9]
    assert got[2] == int(logits[2].topk(2).indices[1])


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    sampler = Sampler(torch.device("cpu"), seed=0)
    logits = torch.zeros(1, VOCAB)
    logits[0, 11] = 10.0  # EOS is the clear favourite
    logits[0, 10] = 9.0  # then a stop token id
    params = dict(min_tokens=2, stop_token_ids=(10,), eos_token_ids=(11,))
    got = [sampler.sample(logits.clone(), [chunk("m", **params)]).token_ids[0] for _ in range(3)]
    assert got == [0, 0, 11]  # EOS and the stop id masked for two tokens, then EOS may come
    ignored = [sampler.sample(logits.clone(), [chunk("i", ignore_eos=True, **params)]).token_ids[0]
               for _ in range(3)]
    assert ignored == [11, 11, 11]  # with ignore_eos, EOS ends nothing and is not masked


def test_logprobs_are_the_raw_log_softmax_with_sorted_top_k():
    torch.manual_seed(1)
    logits = torch.randn(3, VOCAB)
    sampler = Sampler(torch.device("cpu"), seed=0)
    chunks = [chunk("a", logprobs=3, temperature=0.7, presence_penalty=1.0), chunk("b"), chunk("c", logprobs=0)]
    out = sampler.sample(logits.clone(), chunks)
    reference = logits.log_softmax(dim=-1)
    first, second, third = out.logprobs
    assert second is None
    assert first.token_id == out.token_ids[0]
    assert abs(first.logprob - reference[0, first.token_id].item()) < 1e-5
    top_ids = [t for t, _ in first.top]
    assert top_ids == reference[0].topk(3).indices.tolist()
    values = [v for _, v in first.top]
    assert values == sorted(values, reverse=True)
    assert all(abs(v - reference[0, t].item()) < 1e-5 for t, v in first.top)
    assert third.top == () and abs(third.logprob - reference[2].max().item()) < 1e-5


def test_greedy_batch_without_extras_reports_no_logprobs():
    sampler = Sampler(torch.device("cpu"), seed=0)
    out = sampler.sample(torch.randn(2, VOCAB), [chunk("a"), chunk("b")])
    assert out.logprobs is None and sampler.token_counts.num_tracked == 0


def test_a_batch_past_one_pass_samples_each_row_as_it_would_alone():
    """runner/sampler.py takes the rows ROWS_PER_PASS at a time: penalties, logit_bias, min_tokens,
    filters, seeded draws and logprobs of a 2.3-pass batch match each request sampled on its own."""
    from fitserve.runner import sampler as sampler_module

    num_rows = 2 * sampler_module.ROWS_PER_PASS + 22
    settings = [dict(), dict(temperature=0.9, seed=7, top_k=4), dict(presence_penalty=0.8, frequency_penalty=0.5),
                dict(temperature=1.0, seed=11, top_p=0.8, repetition_penalty=1.3, logprobs=2),
                dict(logit_bias={5: 3.0}, min_tokens=2, eos_token_ids=(5,)), dict(min_p=0.1, temperature=0.5, seed=3)]
    chunks = [chunk(f"r{i}", prompt=(i % VOCAB, (3 * i) % VOCAB), **settings[i % len(settings)]) for i in range(num_rows)]
    batch_sampler = Sampler(torch.device("cpu"), seed=0)
    alone = [Sampler(torch.device("cpu"), seed=0) for _ in range(num_rows)]
    generator = torch.Generator().manual_seed(5)
    for _ in range(3):  # steps: the penalties' counts and min_tokens carry over
        logits = torch.randn(num_rows, VOCAB, generator=generator)
        together = batch_sampler.sample(logits.clone(), chunks)
        for row, (one, c) in enumerate(zip(alone, chunks)):
            single = one.sample(logits[row : row + 1].clone(), [c])
            assert together.token_ids[row] == single.token_ids[0], f"row {row}"
            if single.logprobs is None:
                assert together.logprobs is None or together.logprobs[row] is None
            else:
                assert together.logprobs[row] == single.logprobs[0]
    assert batch_sampler.token_counts.num_tracked == sum(1 for c in chunks if c.sampling_params.needs_token_counts)


def test_allowed_token_ids_mask_the_rest_with_one_mask_per_request(monkeypatch):
    """Only the allowed ids are sampled, greedy or not, beside a row without the field; the mask is made
    once per request (a list of every token id must not cost each of its steps) and forgotten with it."""
    from fitserve.runner import logits_processors, sampler as sampler_module

    made = []
    real_mask = logits_processors.allowed_token_mask
    monkeypatch.setattr(sampler_module, "allowed_token_mask", lambda *args: made.append(args[0]) or real_mask(*args))
    torch.manual_seed(0)
    sampler = Sampler(torch.device("cpu"), seed=0)
    for step in range(5):
        logits = torch.randn(3, VOCAB) * 3
        logits[:, 0] = 100.0  # the favourite, allowed to the free row only
        chunks = [chunk("greedy", allowed_token_ids=(3, 7)), chunk("sampled", allowed_token_ids=(5,), temperature=1.0),
                  chunk("free")]
        got = sampler.sample(logits.clone(), chunks).token_ids
        assert got[0] == (3 if logits[0, 3] > logits[0, 7] else 7) and got[1] == 5 and got[2] == 0
    assert made == [(3, 7), (5,)]
    sampler.forget(frozenset({"greedy", "sampled", "free"}))
    assert not sampler._allowed_masks
