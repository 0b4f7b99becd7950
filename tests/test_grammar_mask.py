"""The sampler's structured-output hook: tokens outside a request's grammar bitmask are never drawn."""

from __future__ import annotations

import pytest
import torch

from fitserve.core.outputs import ScheduledRequest
from fitserve.runner.grammar_mask import apply_allowed_token_masks, unpack_token_bitmask
from fitserve.runner.sampler import Sampler
from fitserve.sampling_params import SamplingParams


def pack(allowed: set[int], vocab_size: int) -> bytes:
    """The engine's format: little-endian int32 words, bit t = token t."""
    num_words = -(-vocab_size // 32)
    return sum(1 << t for t in allowed).to_bytes(4 * num_words, "little")


def chunk(request_id: str, mask: bytes | None = None, **params) -> ScheduledRequest:
    return ScheduledRequest(request_id, (1,), 0, (0,), True, SamplingParams(**params), allowed_token_bitmask=mask)


def test_unpack_matches_the_packed_set_at_awkward_sizes():
    for vocab_size in (1, 31, 32, 33, 70, 1000):
        allowed = {t for t in range(vocab_size) if t % 7 == 3 or t == vocab_size - 1}
        packed = bytearray(pack(allowed, vocab_size))
        words = torch.frombuffer(packed, dtype=torch.int32).view(1, -1)
        got = unpack_token_bitmask(words, vocab_size)[0]
        assert set(torch.nonzero(got).flatten().tolist()) == allowed
    # A mask narrower than the logits (model vocab padded past the tokenizer): the rest is forbidden.
    words = torch.frombuffer(bytearray(pack({0, 31}, 32)), dtype=torch.int32).view(1, -1)
    assert torch.nonzero(unpack_token_bitmask(words, 40)[0]).flatten().tolist() == [0, 31]


def test_masked_rows_only_and_bit_31_sign():
    logits = torch.zeros(3, 64)
    masks = [pack({31, 63}, 64), None, pack({0}, 64)]  # bit 31 is the int32 sign bit
    out = apply_allowed_token_masks(logits, [chunk(str(i), m) for i, m in enumerate(masks)])
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [31, 63]
    assert torch.isfinite(out[1]).all(), "an unconstrained neighbour is untouched"
    assert torch.isfinite(out[2]).nonzero().flatten().tolist() == [0]
    assert torch.isfinite(logits).all(), "the caller's logits are not modified in place"


def test_greedy_and_sampled_rows_draw_only_allowed_tokens():
    torch.manual_seed(0)
    vocab_size = 100
    logits = torch.randn(4, vocab_size) * 3
    allowed = {5, 17, 64, 99}
    mask = pack(allowed, vocab_size)
    sampler = Sampler(torch.device("cpu"), seed=0)
    batch = [chunk("greedy", mask, temperature=0), chunk("free", temperature=0),
             chunk("hot", mask, temperature=2.0), chunk("topk", mask, temperature=1.0, top_k=2)]
    best_allowed = max(allowed, key=lambda t: logits[0, t].item())
    seen_hot = set()
    for _ in range(200):
        greedy, free, hot, topk = sampler.sample(logits, batch).token_ids
        assert greedy == best_allowed
        assert free == int(logits[1].argmax())
        assert hot in allowed and topk in allowed
        seen_hot.add(hot)
    assert len(seen_hot) > 1, "sampling under a mask still samples"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_masks_and_sampling_on_the_gpu_match_the_cpu():
    torch.manual_seed(1)
    vocab_size = 1000
    logits = torch.randn(5, vocab_size) * 3
    masks = [pack({t for t in range(vocab_size) if t % (row + 2) == 1}, vocab_size) if row != 2 else None
             for row in range(5)]
    chunks = [chunk(str(row), mask, temperature=0) for row, mask in enumerate(masks)]
    on_cpu = apply_allowed_token_masks(logits, chunks)
    on_gpu = apply_allowed_token_masks(logits.cuda(), chunks)
    assert torch.equal(on_gpu.cpu(), on_cpu)
    greedy = Sampler(torch.device("cuda"), seed=0).sample(logits.cuda(), chunks).token_ids
    assert greedy == on_cpu.argmax(dim=-1).tolist()
