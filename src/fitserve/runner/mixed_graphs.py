"""CUDA graphs for steps that prefill: one capture per padded token count, replayed each step.

A step that prefills a prompt chunk beside the running decodes launches the same few hundred
kernels as a decode step, through more Python (fp8 GEMMs, shapes that change every step): on
an H200 an eager 531-token step of Llama-3-8B took 15 ms (bf16) and 18-20 ms (fp8) of wall time
for 11-13 ms of GPU work (`gpu_bench.py mixed`). Captured, it is one replay.

Each size T (plan.estimates.mixed_graph_token_sizes: every 16 tokens up to 1024) is captured
for at most max_num_seqs requests. A step of n <= T tokens fills the first n rows of the inputs;
the rest are padding (token 0, PAD_SLOT, in no request: the attention zeroes them). The
attention's launch cannot follow the batch, so it reads its (sequence, query block) pairs from
a list (forward_batch.attention_work_pairs) padded with -1. The logits are computed after the
replay, for the sampling rows only, as for decode graphs; all sizes write their hidden states
into one buffer, so the pool keeps one output, not one per size.
"""

from __future__ import annotations

import numpy as np
import torch

from fitserve.core.outputs import ScheduledRequest
from fitserve.forward_batch import PAD_SLOT, ForwardBatch, attention_work_capacity, attention_work_pairs
from fitserve.plan.estimates import mixed_graph_token_sizes
from fitserve.runner.input_batch import PlaceholderFill
from fitserve.runner.prompt_logprobs import wants_prompt_logprobs


class MixedGraphs:
    def __init__(self, model: torch.nn.Module, max_num_seqs: int, max_blocks_per_seq: int,
                 max_num_batched_tokens: int, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.sizes = mixed_graph_token_sizes(max_num_batched_tokens)
        self.max_tokens = self.sizes[-1] if self.sizes else 0
        self.max_seqs = max_num_seqs
        self.max_blocks_per_seq = max_blocks_per_seq
        self.layout = Layout(self.max_tokens, max_num_seqs, attention_work_capacity(self.max_tokens, max_num_seqs))
        self._int64_inputs = torch.zeros(self.layout.int64_size, dtype=torch.int64, device=device)
        self._int32_inputs = torch.zeros(self.layout.int32_size, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_num_seqs, max_blocks_per_seq, dtype=torch.int32, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._hidden: torch.Tensor | None = None  # [largest size, hidden]: every graph's output, copied in
        # Two pinned staging sets used in turn, as DecodeGraphs does. A step that samples nothing
        # is never read back, so each set also records when its copies were done.
        self._staging = [Staging(self.layout, max_num_seqs, max_blocks_per_seq) for _ in range(2)]
        self._num_replays = 0

    def _view(self, name: str, size: int | None = None) -> torch.Tensor:
        dtype, start, length = self.layout.fields[name]
        buffer = self._int64_inputs if dtype == "int64" else self._int32_inputs
        return buffer[start : start + (length if size is None else size)]

    def _batch(self, size: int) -> ForwardBatch:
        seqs = self.max_seqs
        return ForwardBatch(
            input_ids=self._view("ids", size), positions=self._view("positions", size),
            slot_mapping=self._view("slots", size), query_start_loc=self._view("query_start"),
            seq_lens=self._view("seq_lens"), block_tables=self.block_tables,
            logits_indices=self._view("logits_rows"),
            # Host figures the kernels do not read on this path; max_query_len > 1 picks the
            # prefill attention, which takes its pairs from attention_work.
            max_query_len=size, max_seq_len=size, query_lens_cpu=(0,) * seqs, seq_lens_cpu=(0,) * seqs,
            attention_work=self._view("work", 2 * attention_work_capacity(size, seqs)).view(-1, 2),
            zero_padding_rows=True,
        )

    @torch.inference_mode()
    def capture(self, pool: tuple[int, int] | None = None) -> None:
        """Capture every size, largest first, in `pool` (shared with the decode graphs)."""
        pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        # Captured on padding alone: nothing is stored and the attention has no pairs to compute;
        # every launch, and so the graph, is the same whatever the inputs hold at replay.
        self._view("slots").fill_(PAD_SLOT)
        self._view("work").fill_(-1)
        for size in reversed(self.sizes):
            batch = self._batch(size)
            hidden = self.model(batch)  # warm-up: compiles kernels outside the capture
            if self._hidden is None:
                self._hidden = torch.empty(self.max_tokens, hidden.shape[1], dtype=hidden.dtype, device=self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._hidden[:size].copy_(self.model(batch))
            self._graphs[size] = graph
        torch.cuda.synchronize(self.device)

    def can_run(self, scheduled: tuple[ScheduledRequest, ...]) -> bool:
        """Whether a graph takes this step: at most max_tokens tokens and max_num_seqs requests,
        and nothing that needs every position's hidden state (prompt logprobs)."""
        return (
            bool(self._graphs)
            and len(scheduled) <= self.max_seqs
            and sum(c.num_tokens for c in scheduled) <= self.max_tokens
            and all(not wants_prompt_logprobs(c) and len(c.block_table) <= self.max_blocks_per_seq for c in scheduled)
        )

    @torch.inference_mode()
    def run(self, scheduled: tuple[ScheduledRequest, ...], block_size: int, fill: PlaceholderFill | None = None
            ) -> torch.Tensor | None:
        """Replay for this step; logits [sampling requests, vocab] float32, or None if none samples."""
        hidden, num_sampling = self.replay(scheduled, block_size, fill)
        if not num_sampling:
            return None
        return self.model.compute_logits(hidden.index_select(0, self._view("logits_rows", num_sampling)))

    @torch.inference_mode()
    def replay(self, scheduled: tuple[ScheduledRequest, ...], block_size: int, fill: PlaceholderFill | None = None
               ) -> tuple[torch.Tensor, int]:
        """Replay the graph for this step -> (hidden states [padded size, hidden], sampling requests).
        Rows of the requests that sample are at logits_rows[:count]. `fill` writes the
        placeholder tokens (async scheduling) into the input ids on the device."""
        num_tokens = sum(c.num_tokens for c in scheduled)
        size = next(s for s in self.sizes if s >= num_tokens)
        staging = self._staging[self._num_replays % 2]
        self._num_replays += 1
        staging.wait_for_copies()
        num_sampling = staging.write(scheduled, block_size, size, fill)
        tensors, layout = staging.tensors, self.layout
        self._int64_inputs.copy_(tensors["int64"], non_blocking=True)
        self._int32_inputs.copy_(tensors["int32"], non_blocking=True)
        width = max(len(c.block_table) for c in scheduled)
        self.block_tables[: len(scheduled), :width].copy_(tensors["tables"][: len(scheduled), :width],
                                                          non_blocking=True)
        staging.copies_done.record()
        if fill is not None:
            index = self._int64_inputs[layout.fields["fill"][1] :][: 2 * size].view(2, size)
            fill.apply(self._view("ids"), index=index)
        self._graphs[size].replay()
        assert self._hidden is not None
        return self._hidden[:size], num_sampling


class Layout:
    """Where each input lives in the two packed device buffers (one copy per dtype a step)."""

    def __init__(self, max_tokens: int, max_seqs: int, work_pairs: int) -> None:
        self.fields: dict[str, tuple[str, int, int]] = {}  # name -> (dtype, start, length)
        sizes = {"int64": 0, "int32": 0}
        for name, dtype, length in (
            ("ids", "int64", max_tokens), ("positions", "int64", max_tokens), ("slots", "int64", max_tokens),
            ("fill", "int64", 2 * max_tokens),  # placeholder rows, then their sources
            ("logits_rows", "int64", max_seqs),
            ("seq_lens", "int32", max_seqs), ("query_start", "int32", max_seqs + 1), ("work", "int32", 2 * work_pairs),
        ):
            self.fields[name] = (dtype, sizes[dtype], length)
            sizes[dtype] += length
        self.int64_size, self.int32_size = sizes["int64"], sizes["int32"]


class Staging:
    """Pinned host buffers for one step's inputs, numpy views of them, and an event marking
    when the device copies from them were done."""

    def __init__(self, layout: Layout, max_seqs: int, max_blocks_per_seq: int, pinned: bool = True) -> None:
        self.layout = layout
        self.tensors = {
            "int64": torch.zeros(layout.int64_size, dtype=torch.int64, pin_memory=pinned),
            "int32": torch.zeros(layout.int32_size, dtype=torch.int32, pin_memory=pinned),
            "tables": torch.zeros(max_seqs, max_blocks_per_seq, dtype=torch.int32, pin_memory=pinned),
        }
        self.arrays = {name: t.numpy() for name, t in self.tensors.items()}
        self.copies_done = torch.cuda.Event() if pinned else None
        self._used = False

    def wait_for_copies(self) -> None:
        if self._used:
            self.copies_done.synchronize()  # long done in a steady state: two steps ago
        self._used = True

    def field(self, name: str) -> np.ndarray:
        dtype, start, length = self.layout.fields[name]
        return self.arrays[dtype][start : start + length]

    def write(self, scheduled: tuple[ScheduledRequest, ...], block_size: int, size: int,
              fill: PlaceholderFill | None) -> int:
        """The step's inputs, padded to `size` tokens; returns how many requests sample."""
        ids, positions, slots = self.field("ids"), self.field("positions"), self.field("slots")
        seq_lens, query_start, logits_rows = self.field("seq_lens"), self.field("query_start"), self.field("logits_rows")
        tables = self.arrays["tables"]
        row = num_sampling = 0
        query_start[0] = 0
        for seq, chunk in enumerate(scheduled):
            count, first = chunk.num_tokens, chunk.num_computed_tokens
            ids[row : row + count] = chunk.token_ids
            table = np.asarray(chunk.block_table, dtype=np.int64)
            pos = np.arange(first, first + count, dtype=np.int64)
            positions[row : row + count] = pos
            slots[row : row + count] = table[pos // block_size] * block_size + pos % block_size
            tables[seq, : len(table)] = table
            seq_lens[seq] = chunk.seq_len
            row += count
            query_start[seq + 1] = row
            if chunk.samples:
                logits_rows[num_sampling] = row - 1
                num_sampling += 1
        num_seqs = len(scheduled)
        ids[row:size] = 0
        positions[row:size] = 0
        slots[row:size] = PAD_SLOT
        seq_lens[num_seqs:] = 0
        query_start[num_seqs + 1 :] = row  # padding sequences: zero query tokens
        work = self.field("work").reshape(-1, 2)
        pairs = attention_work_pairs([c.num_tokens for c in scheduled])
        work[: len(pairs)] = pairs
        work[len(pairs) :] = (-1, 0)
        if fill is not None:
            fill_rows = self.field("fill")
            fill_rows[: len(fill.rows)] = fill.rows
            fill_rows[size : size + len(fill.sources)] = fill.sources
        return num_sampling
