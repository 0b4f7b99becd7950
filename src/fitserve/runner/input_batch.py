"""SchedulerOutput -> ForwardBatch: the flat tensors one forward pass reads, and the placeholder
tokens of async scheduling, filled on the device."""

from __future__ import annotations

import torch

from fitserve.core.outputs import ScheduledRequest
from fitserve.forward_batch import ForwardBatch
from fitserve.sampling_params import SamplingParams


def to_device(values: list | tuple, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on `device`, without waiting for the device's queue.

    `torch.tensor(values, device=cuda)` copies synchronously, which waits for every kernel queued
    before it: with async scheduling that is the whole step in flight. This copies from pinned
    memory, queued on the stream; torch's pinned allocator keeps the host buffer until it is done.
    """
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def chunks_on_blocks(requests: list[tuple[tuple[int, ...], int]], name: str, block_size: int,
                     params: SamplingParams) -> tuple[ScheduledRequest, ...]:
    """One made-up step (profiling, calibration, warm-up): per request (token ids fed, tokens
    already cached), a sampling chunk named f"{name}-{index}" on its own consecutive blocks,
    the first request's from block 0."""
    chunks, next_block = [], 0
    for index, (token_ids, num_cached) in enumerate(requests):
        num_blocks = -(-(num_cached + len(token_ids)) // block_size)
        chunks.append(ScheduledRequest(
            request_id=f"{name}-{index}", token_ids=token_ids, num_computed_tokens=num_cached,
            block_table=tuple(range(next_block, next_block + num_blocks)), samples=True, sampling_params=params))
        next_block += num_blocks
    return tuple(chunks)


def build_forward_batch(
    scheduled: tuple[ScheduledRequest, ...], block_size: int, device: torch.device, num_kv_groups: int = 1
) -> ForwardBatch:
    """`num_kv_groups` > 1 (kv_groups.py): each group's slots and tables as well, from the chunks'
    group_block_tables; a made-up chunk without them (profiling, warm-up) uses its block_table for all."""
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
    query_lens = tuple(c.num_tokens for c in scheduled)
    seq_lens = tuple(c.seq_len for c in scheduled)

    return ForwardBatch(
        input_ids=to_device(input_ids, torch.int64, device),
        positions=to_device(positions, torch.int64, device),
        slot_mapping=to_device(slots, torch.int64, device),
        query_start_loc=to_device(query_start_loc, torch.int32, device),
        seq_lens=to_device(seq_lens, torch.int32, device),
        block_tables=_padded_tables([c.block_table for c in scheduled], device),
        logits_indices=to_device(logits_indices, torch.int64, device),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
        group_tables=tuple(_group_slots_and_tables(scheduled, group, block_size, device)
                           for group in range(1, num_kv_groups)),
    )


def _padded_tables(tables: list[tuple[int, ...]], device: torch.device) -> torch.Tensor:
    """[S, max_blocks] int32, padded with 0."""
    max_blocks = max(len(table) for table in tables)
    return to_device([list(table) + [0] * (max_blocks - len(table)) for table in tables], torch.int32, device)


def _group_slots_and_tables(scheduled: tuple[ScheduledRequest, ...], group: int, block_size: int,
                            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """KV cache group `group`'s (>= 1) slot mapping [T] int64 and block tables [S, max_blocks] int32."""
    tables = [c.group_block_tables[group - 1] if c.group_block_tables else c.block_table for c in scheduled]
    slots = [table[position // block_size] * block_size + position % block_size
             for chunk, table in zip(scheduled, tables) for position in range(chunk.num_computed_tokens, chunk.seq_len)]
    return to_device(slots, torch.int64, device), _padded_tables(tables, device)


class PlaceholderFill:
    """Where a step's placeholder tokens come from: rows of the previous step's sampled ids."""

    def __init__(self, rows: list[int], sources: list[int], sampled: torch.Tensor) -> None:
        self.rows = rows  # flat token rows of this step's input_ids
        self.sources = sources  # their rows in `sampled`
        self.sampled = sampled  # the previous step's [S] int64 ids, on the device

    def apply(self, input_ids: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Write the sampled ids into input_ids on the device (queued, no host synchronisation).
        `index`: rows and sources already on the device ([2, >= len(rows)] int64), or None."""
        if index is None:
            index = to_device([self.rows, self.sources], torch.int64, input_ids.device)
        count = len(self.rows)
        input_ids.index_copy_(0, index[0, :count], self.sampled.index_select(0, index[1, :count]))


def placeholder_fill(scheduled: tuple[ScheduledRequest, ...], sampled: torch.Tensor | None,
                     sampled_request_ids: tuple[str, ...]) -> PlaceholderFill | None:
    """The fill for the chunks that feed a placeholder (their only token), or None if none does.
    `sampled` holds the previous step's ids (None: no step in flight), one per request of
    `sampled_request_ids`."""
    rows, fed_ids, offset = [], [], 0
    for chunk in scheduled:
        if chunk.feeds_placeholder:
            rows.append(offset)
            fed_ids.append(chunk.request_id)
        offset += chunk.num_tokens
    if not rows:
        return None
    assert sampled is not None, "a placeholder needs the step in flight"
    source_of = {request_id: row for row, request_id in enumerate(sampled_request_ids)}
    return PlaceholderFill(rows, [source_of[request_id] for request_id in fed_ids], sampled)
