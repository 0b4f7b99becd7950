"""ForwardBatch: one step's flat token batch, as the model layers read it.

Built by the runner from a SchedulerOutput. Tokens of all requests are concatenated
(no padding to a rectangle); request i owns rows query_start_loc[i]:query_start_loc[i+1].
Attention for request i is causal over its seq_lens[i] context tokens, of which the
last (query_start_loc[i+1] - query_start_loc[i]) are the ones fed this step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD_SLOT = -1  # the KV store skips this slot; CUDA-graph padding rows use it
# Query tokens per attention program in a step that prefills (GROUP query heads each, so at
# least 16 rows for tl.dot); the unit of `attention_work`.
PREFILL_BLOCK_Q = 16


def attention_work_pairs(query_lens: tuple[int, ...] | list[int]) -> list[tuple[int, int]]:
    """`attention_work`'s (sequence, query block) pairs for these per-sequence query lengths."""
    return [(seq, block) for seq, q_len in enumerate(query_lens) for block in range(-(-q_len // PREFILL_BLOCK_Q))]


def attention_work_capacity(num_tokens: int, num_seqs: int) -> int:
    """Most pairs a batch of at most num_tokens tokens in at most num_seqs sequences needs."""
    return -(-num_tokens // PREFILL_BLOCK_Q) + num_seqs


@dataclass(frozen=True, slots=True)
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64, token ids fed this step
    positions: torch.Tensor  # [T] int64, position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] int64, block_id * block_size + offset, or PAD_SLOT
    query_start_loc: torch.Tensor  # [S+1] int32, cumulative fed lengths, starts at 0
    seq_lens: torch.Tensor  # [S] int32, context length after this step
    block_tables: torch.Tensor  # [S, max_blocks] int32, padded with 0 past each request's blocks
    logits_indices: torch.Tensor  # [S_sampling] int64, the last fed row of each sampling request
    # Host-side copies, so layers never synchronise with the device to learn a size.
    max_query_len: int
    max_seq_len: int
    query_lens_cpu: tuple[int, ...]  # [S] fed tokens per request
    seq_lens_cpu: tuple[int, ...]  # [S]
    # CUDA graphs of steps that prefill: the attention's launch is fixed at capture, so it takes
    # its (sequence, query block) pairs from this [P, 2] int32 list (padded with -1) instead of
    # a grid sized by the batch. None: the grid follows the batch.
    attention_work: torch.Tensor | None = None
    # Zero the attention output of rows that belong to no request (CUDA-graph padding) rather
    # than leave them as allocated, so that they carry finite values through the layers.
    zero_padding_rows: bool = False

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]
