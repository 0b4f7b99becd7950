"""SchedulerOutput -> ForwardBatch: the flat tensors one forward pass reads."""

from __future__ import annotations

import torch

from fitserve.core.outputs import ScheduledRequest
from fitserve.forward_batch import ForwardBatch


def build_forward_batch(
    scheduled: tuple[ScheduledRequest, ...], block_size: int, device: torch.device
) -> ForwardBatch:
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_start_loc = [0]
    logits_indices: list[int] = []
    for chunk in scheduled:
        input_ids.extend(chunk.token_ids)
        table = chunk.block_table
        for position in range(chunk.num_computed_tokens, chunk.seq_len):
            positions.append(position)
            slots.append(table[position // block_size] * block_size + position % block_size)
        query_start_loc.append(len(input_ids))
        if chunk.samples:
            logits_indices.append(len(input_ids) - 1)
    max_blocks = max(len(chunk.block_table) for chunk in scheduled)
    block_tables = [list(c.block_table) + [0] * (max_blocks - len(c.block_table)) for c in scheduled]
    query_lens = tuple(c.num_tokens for c in scheduled)
    seq_lens = tuple(c.seq_len for c in scheduled)

    def as_tensor(values: list[int] | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    return ForwardBatch(
        input_ids=as_tensor(input_ids, torch.int64),
        positions=as_tensor(positions, torch.int64),
        slot_mapping=as_tensor(slots, torch.int64),
        query_start_loc=as_tensor(query_start_loc, torch.int32),
        seq_lens=as_tensor(seq_lens, torch.int32),
        block_tables=as_tensor(block_tables, torch.int32),
        logits_indices=as_tensor(logits_indices, torch.int64),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
    )
