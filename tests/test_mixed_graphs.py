"""Mixed-step CUDA graphs, the parts that run on the CPU: the captured token counts, the attention
work list, and the packed inputs a replay copies, checked against the eager path's ForwardBatch.
(The replays themselves are GPU tests: test_triton_kernels.py and test_fp8_gpu.py compare graph
and eager engines token for token.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fitserve.core.outputs import PLACEHOLDER_TOKEN_ID, ScheduledRequest
from fitserve.forward_batch import PAD_SLOT, PREFILL_BLOCK_Q, attention_work_capacity, attention_work_pairs
from fitserve.plan import estimates
from fitserve.runner.input_batch import build_forward_batch
from fitserve.runner.mixed_graphs import Layout, Staging
from fitserve.sampling_params import SamplingParams

BLOCK_SIZE = 16


def test_token_sizes_step_by_16_up_to_the_budget_or_1024():
    assert estimates.mixed_graph_token_sizes(2048) == list(range(16, 1025, 16))
    assert estimates.mixed_graph_token_sizes(64) == [16, 32, 48, 64]
    assert estimates.mixed_graph_token_sizes(40) == [16, 32]
    assert estimates.mixed_graph_token_sizes(8) == [], "a budget below one size captures nothing"


def test_graph_pool_estimate_counts_the_mixed_graphs():
    from fitserve.config import ArchConfig

    arch = ArchConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    decode_only = estimates.cuda_graph_pool_bytes(arch, 32, 2)
    with_mixed = estimates.cuda_graph_pool_bytes(arch, 32, 2, max_num_batched_tokens=2048)
    sizes = estimates.mixed_graph_token_sizes(2048)
    kept = 1024 * arch.hidden_size * 2  # the graphs share one output buffer
    transient = estimates.forward_peak_bytes(arch, 1024, 2) - estimates.forward_peak_bytes(arch, 32, 2)
    assert with_mixed - decode_only == kept + transient + len(sizes) * estimates.GRAPH_DRIVER_BYTES_PER_CAPTURE


@pytest.mark.parametrize("query_lens", [[1], [16], [17, 1, 1], [40, 1, 33, 16]])
def test_work_pairs_cover_every_query_block_once(query_lens):
    pairs = attention_work_pairs(query_lens)
    expected = [(seq, block) for seq, n in enumerate(query_lens) for block in range(-(-n // PREFILL_BLOCK_Q))]
    assert pairs == expected
    assert len(pairs) <= attention_work_capacity(sum(query_lens), len(query_lens))


def _chunk(request_id: str, token_ids: list[int], computed: int, samples: bool = True) -> ScheduledRequest:
    num_blocks = -(-(computed + len(token_ids)) // BLOCK_SIZE)
    table = tuple(range(100 + 7 * len(request_id), 100 + 7 * len(request_id) + num_blocks))[::-1]
    return ScheduledRequest(request_id, tuple(token_ids), computed, table, samples, SamplingParams())



def test_staged_inputs_are_the_eager_batch_then_padding():
    scheduled = (
        _chunk("a", [5], 40),  # decodes
        _chunk("bb", list(range(1, 38)), 16, samples=False),  # a prompt chunk that does not reach its end
        _chunk("ccc", [PLACEHOLDER_TOKEN_ID], 7),  # a decode fed by the step in flight
        _chunk("dddd", list(range(50, 70)), 0),  # a whole prompt
    )
    size, max_seqs = 64, 6
    layout = Layout(size, max_seqs, attention_work_capacity(size, max_seqs))
    staging = Staging(layout, max_seqs, 8, pinned=False)
    staging.field("ids")[:] = 99  # stale values from an earlier step are overwritten or padded
    num_sampling = staging.write(scheduled, BLOCK_SIZE, size, fill=None)
    eager = build_forward_batch(scheduled, BLOCK_SIZE, torch.device("cpu"))
    n = eager.num_tokens
    assert n == 59 and num_sampling == 3
    assert staging.field("ids")[:n].tolist() == eager.input_ids.tolist()
    assert staging.field("positions")[:n].tolist() == eager.positions.tolist()
    assert staging.field("slots")[:n].tolist() == eager.slot_mapping.tolist()
    assert staging.field("logits_rows")[:num_sampling].tolist() == eager.logits_indices.tolist()
    assert staging.field("seq_lens")[:4].tolist() == eager.seq_lens.tolist()
    assert staging.field("query_start")[:5].tolist() == eager.query_start_loc.tolist()
    for seq, chunk in enumerate(scheduled):
        assert staging.arrays["tables"][seq, : len(chunk.block_table)].tolist() == list(chunk.block_table)
    # padding: token 0 at position 0 storing nothing, in sequences with no tokens and no context
    assert (staging.field("ids")[n:size] == 0).all() and (staging.field("positions")[n:size] == 0).all()
    assert (staging.field("slots")[n:size] == PAD_SLOT).all()
    assert (staging.field("seq_lens")[4:] == 0).all() and (staging.field("query_start")[5:] == n).all()
    work = staging.field("work").reshape(-1, 2)
    pairs = attention_work_pairs([1, 37, 1, 20])
    assert work[: len(pairs)].tolist() == [list(p) for p in pairs]
    assert (work[len(pairs) :, 0] == -1).all()


def test_staged_placeholder_fill_rows_and_sources():
    from fitserve.runner.input_batch import placeholder_fill

    scheduled = (_chunk("p", list(range(1, 30)), 0), _chunk("q", [PLACEHOLDER_TOKEN_ID], 9),
                 _chunk("r", [PLACEHOLDER_TOKEN_ID], 3))
    fill = placeholder_fill(scheduled, torch.tensor([11, 22, 33]), ("x", "r", "q"))
    size, max_seqs = 64, 4
    layout = Layout(size, max_seqs, attention_work_capacity(size, max_seqs))
    staging = Staging(layout, max_seqs, 4, pinned=False)
    staging.write(scheduled, BLOCK_SIZE, size, fill)
    # the replay reads the fill field as [2, size]: flat rows, then their rows in the sampled ids
    fill_field = staging.field("fill")[: 2 * size].reshape(2, size)
    assert fill_field[0, :2].tolist() == [29, 30] and fill_field[1, :2].tolist() == [2, 1]
    ids = torch.tensor(staging.field("ids")[:size])
    fill.apply(ids, index=torch.tensor(fill_field))
    assert ids[29].item() == 33 and ids[30].item() == 22
