"""ForwardBatch: one step's flat token batch, as the model layers read it.

Built by the runner from a SchedulerOutput. Tokens of all requests are concatenated
(no padding to a rectangle); request i owns rows query_start_loc[i]:query_start_loc[i+1].
Attention for request i is causal over its seq_lens[i] context tokens, of which the
last (query_start_loc[i+1] - query_start_loc[i]) are the ones fed this step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

PAD_SLOT = -1  # the KV store skips this slot; CUDA-graph padding rows use it


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
    # KV cache groups 1, 2, ... (models mixing windowed and full layers, kv_groups.py): each group's
    # (slot_mapping [T] int64, block_tables [S, max_blocks] int32), read by the layers of that group in
    # place of the two above (group 0's); () for one group.
    group_tables: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    def for_kv_group(self, group: int) -> ForwardBatch:
        """The batch as the layers of KV cache group `group` read it: that group's slots and tables."""
        if group == 0:
            return self
        slot_mapping, block_tables = self.group_tables[group - 1]
        return replace(self, slot_mapping=slot_mapping, block_tables=block_tables, group_tables=())
