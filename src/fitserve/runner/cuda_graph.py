"""CUDA graphs for decode steps: one capture per padded batch size, replayed each step.

A decode step of a small model is hundreds of short kernels, and launching them from Python
costs more than running them. Captured once at start-up, a step becomes one replay. Inputs
live in persistent buffers that each step overwrites; a batch of n requests runs the graph
of the smallest captured size >= n, its padding rows writing nothing (PAD_SLOT) and
attending to nothing (zero query length).
"""

from __future__ import annotations

import torch

from fitserve.core.outputs import ScheduledRequest
from fitserve.forward_batch import PAD_SLOT, ForwardBatch
from fitserve.runner.input_batch import PlaceholderFill

SMALL_BATCH_SIZES = (1, 2, 4)  # then every multiple of GRAPH_BATCH_STEP
GRAPH_BATCH_STEP = 8  # padding wastes at most 7 rows; more captures cost start-up time


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in SMALL_BATCH_SIZES if s < max_num_seqs]
    sizes += list(range(GRAPH_BATCH_STEP, max_num_seqs, GRAPH_BATCH_STEP))
    return sorted(set(sizes + [max_num_seqs]))


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, max_num_seqs: int, max_blocks_per_seq: int,
                 device: torch.device, num_kv_groups: int = 1) -> None:
        self.model = model
        self.device = device
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.max_batch_size = self.sizes[-1]
        self.max_blocks_per_seq = max_blocks_per_seq
        size = self.max_batch_size
        self.num_kv_groups = num_kv_groups  # kv_groups.py: one slot mapping and table per group
        # The inputs, packed by dtype so that a step copies them in three transfers (each small
        # host-to-device copy costs the GPU a few microseconds): int64 rows ids, positions, slots
        # and a placeholder fill's rows and sources, then the slots of KV cache groups 1, 2, ...;
        # int32 seq_lens then query_start_loc; the block tables of every group.
        self._int64_inputs = torch.zeros(4 + num_kv_groups, size, dtype=torch.int64, device=device)
        self._int32_inputs = torch.zeros(2 * size + 1, dtype=torch.int32, device=device)
        self.input_ids, self.positions, self.slot_mapping = self._int64_inputs[:3]
        self.slot_mapping.fill_(PAD_SLOT)
        self._int64_inputs[5:].fill_(PAD_SLOT)
        self.seq_lens, self.query_start_loc = self._int32_inputs[:size], self._int32_inputs[size:]
        self._all_block_tables = torch.zeros(num_kv_groups, size, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.block_tables = self._all_block_tables[0]
        self.logits_indices = torch.arange(size, dtype=torch.int64, device=device)
        # Per size, the graph and its output hidden states [size, hidden]. The logits are computed
        # after the replay, outside the graph: kept per size they would pin sum(sizes) x vocab
        # float32 in the pool (2 GiB for Llama 3 at 256 sequences), for one GEMM launch saved.
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # Pinned host copies of the inputs, written in place, two sets used in turn: with async
        # scheduling a step's inputs are written while the step before it may still be copying
        # its own; the step before that one was read back, so its copies are done.
        self._staging = [_Staging(size, max_blocks_per_seq, num_kv_groups) for _ in range(2)]
        self._num_replays = 0

    def _batch(self, size: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:size], positions=self.positions[:size], slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1], seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size], logits_indices=self.logits_indices[:size],
            # Host-side figures are not read on the GPU path; the kernels read the device tensors.
            max_query_len=1, max_seq_len=1, query_lens_cpu=(1,) * size, seq_lens_cpu=(1,) * size,
            group_tables=tuple((self._int64_inputs[4 + group, :size], self._all_block_tables[group, :size])
                               for group in range(1, self.num_kv_groups)),
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first, sharing one memory pool."""
        pool = torch.cuda.graph_pool_handle()
        self.query_start_loc.copy_(torch.arange(self.max_batch_size + 1, dtype=torch.int32))
        self.seq_lens.fill_(1)
        for size in reversed(self.sizes):
            batch = self._batch(size)
            self.model(batch)  # warm-up: compiles kernels outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self.model(batch)  # [size, hidden]
            self._graphs[size] = (graph, hidden)
        torch.cuda.synchronize(self.device)

    def can_run(self, scheduled: tuple[ScheduledRequest, ...]) -> bool:
        return (
            bool(self._graphs)
            and len(scheduled) <= self.max_batch_size
            and all(c.num_tokens == 1 and c.samples and len(c.block_table) <= self.max_blocks_per_seq
                    for c in scheduled)
        )

    @torch.inference_mode()
    def run(self, scheduled: tuple[ScheduledRequest, ...], block_size: int, fill: PlaceholderFill | None = None
            ) -> torch.Tensor:
        """Replay the graph for these decode requests; returns logits [len(scheduled), vocab] float32."""
        return self.model.compute_logits(self.replay(scheduled, block_size, fill))

    @torch.inference_mode()
    def replay(self, scheduled: tuple[ScheduledRequest, ...], block_size: int, fill: PlaceholderFill | None = None
               ) -> torch.Tensor:
        """Replay the graph for these decode requests; returns final hidden states [len(scheduled), hidden]
        (a tensor-parallel worker stops here: only rank 0 computes logits). `fill` writes the
        placeholder tokens (async scheduling) into the input ids on the device."""
        num_seqs = len(scheduled)
        size = next(s for s in self.sizes if s >= num_seqs)
        staging = self._staging[self._num_replays % 2]
        self._num_replays += 1
        staged = staging.arrays
        ids, positions, slots = staged["int64"][0, :size], staged["int64"][1, :size], staged["int64"][2, :size]
        seq_lens = staged["int32"][:size]
        width = 0
        for row, chunk in enumerate(scheduled):
            position = chunk.num_computed_tokens
            table = chunk.block_table
            ids[row] = chunk.token_ids[0]
            positions[row] = position
            slots[row] = table[position // block_size] * block_size + position % block_size
            seq_lens[row] = position + 1
            staged["tables"][0, row, : len(table)] = table
            for group, group_table in enumerate(chunk.group_block_tables, start=1):
                group_slot = group_table[position // block_size] * block_size + position % block_size
                staged["int64"][4 + group, row] = group_slot
                staged["tables"][group, row, : len(group_table)] = group_table
            width = max(width, len(table))
        ids[num_seqs:] = 0
        positions[num_seqs:] = 0
        slots[num_seqs:] = PAD_SLOT
        staged["int64"][5:, num_seqs:size] = PAD_SLOT
        seq_lens[num_seqs:] = 0
        query_start = staged["int32"][self.max_batch_size :][: size + 1]
        query_start[: num_seqs + 1] = range(num_seqs + 1)
        query_start[num_seqs + 1 :] = num_seqs  # padding sequences: zero query tokens
        if fill is not None:
            staged["int64"][3, : len(fill.rows)] = fill.rows
            staged["int64"][4, : len(fill.sources)] = fill.sources
        tensors = staging.tensors
        self._int64_inputs.copy_(tensors["int64"], non_blocking=True)  # whole buffers: a few KiB
        self._int32_inputs.copy_(tensors["int32"], non_blocking=True)
        self._all_block_tables[:, :num_seqs, :width].copy_(tensors["tables"][:, :num_seqs, :width], non_blocking=True)
        if fill is not None:
            fill.apply(self.input_ids, index=self._int64_inputs[3:5])
        graph, hidden = self._graphs[size]
        graph.replay()
        # This staging set is written again two steps from now, after this step's sampled tokens
        # were read back (or, on a tensor-parallel worker, after it synchronized), which waits for
        # the copies above.
        return hidden[:num_seqs]


class _Staging:
    """Pinned host buffers for one step's graph inputs, and numpy views of them for fast writes."""

    def __init__(self, size: int, max_blocks_per_seq: int, num_kv_groups: int) -> None:
        self.tensors = {  # laid out as DecodeGraphs' device buffers
            "int64": torch.zeros(4 + num_kv_groups, size, dtype=torch.int64).pin_memory(),
            "int32": torch.zeros(2 * size + 1, dtype=torch.int32).pin_memory(),
            "tables": torch.zeros(num_kv_groups, size, max_blocks_per_seq, dtype=torch.int32).pin_memory(),
        }
        self.arrays = {name: t.numpy() for name, t in self.tensors.items()}
