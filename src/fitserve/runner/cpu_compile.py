"""A compiled decode step on the CPU (`--cpu-compile decode`): torch.compile (inductor) of the model's
forward and logits for decode-only batches.

An eager CPU decode step of a small model is a few hundred small aten ops, and at one stream about a
third of its time is the interpreter and the dispatcher between them (docs/benchmarks.md, "Where a CPU
step goes"). Compiled, the step is one C++ function: inductor's loops fuse the norms, the rotary
embedding, the activation and the KV store, and only the matrix multiplies and the attention stay
calls into aten.

What the GPU does with one CUDA graph per padded batch size (runner/cuda_graph.py) is done here with
dynamic shapes, since a padding row on a CPU costs as much as a real one: the batch-size buckets are
{1} (dynamo specializes a dimension of size 1) and {2, ..., max_num_seqs} (one compile, the number of
rows symbolic), and in both the block-table width is symbolic, so one compile serves every step of its
bucket however the contexts grow. The paged-attention inputs (slot mapping, block tables, context
lengths) are tensors of the graph; no host-side figure of the step enters it.

Prefill and mixed steps stay eager. Inductor's compiled code is cached on disk (TORCHINDUCTOR_CACHE_DIR,
by default under the user's cache dir: config.inductor_cache_dir), so a second start-up reuses it; the
tracing is not cached (docs/benchmarks.md has both start-up times).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import time

import torch

from fitserve.core.outputs import ScheduledRequest
from fitserve.forward_batch import ForwardBatch
from fitserve.runner.input_batch import PlaceholderFill, build_forward_batch, chunks_on_blocks
from fitserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

MIN_TABLE_WIDTH_BLOCKS = 2  # dynamo specializes a dimension of size 1: narrower tables are padded to 2
DYNAMO_RECOMPILE_LIMIT = 16  # the two buckets, times the runners one process may hold (tests, benchmarks)


@functools.cache
def lower_int4_mm_as_fallback() -> None:
    """From now on in this process, inductor lowers torch's int4 CPU matmul (kernels/cpu_int4.py) as a plain
    fallback op. Its own lowering makes the group size a tensor constant of the compiled code: an AOTInductor
    package whose constants are the model's own weights is never given it (runner/cpu_aot.py), and under
    torch.compile the kernel it calls refuses it ("group size must be a scalar"). Once a process."""
    from torch._inductor import lowering
    packet = torch.ops.aten._weight_int4pack_mm_for_cpu
    for op in (packet, packet.default):
        lowering.lowerings.pop(op, None)
    lowering.make_fallback(packet.default, warn=False)


def decode_forward(model: torch.nn.Module, block_size: int, input_ids: torch.Tensor, positions: torch.Tensor,
                   slot_mapping: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """The function compiled: one decode token per request -> logits [S, vocab] float32.

    input_ids, positions, slot_mapping [S] int64; seq_lens [S] int32 (context length after the step);
    block_tables [S, W] int32 (padded with block 0, which the attention masks out). The attention reads
    W * block_size keys per request, masked by seq_lens, so W may grow without a recompile."""
    num_seqs = input_ids.shape[0]
    batch = ForwardBatch(
        input_ids=input_ids, positions=positions, slot_mapping=slot_mapping,
        query_start_loc=torch.arange(num_seqs + 1, dtype=torch.int32), seq_lens=seq_lens,
        block_tables=block_tables, logits_indices=torch.arange(num_seqs),
        # max_seq_len bounds the keys read: the table's width; the host tuples are empty, as nothing of
        # a decode step reads them (kernels/reference.paged_attention), and a tuple of symbolic length
        # would specialize the batch size
        max_query_len=1, max_seq_len=block_tables.shape[1] * block_size, query_lens_cpu=(), seq_lens_cpu=(),
    )
    # the methods without their @torch.inference_mode(): entered inside the graph it fails on the KV
    # cache's views ("Cannot set version_counter for inference tensor"); run() enters it outside
    forward, compute_logits = inspect.unwrap(type(model).forward), inspect.unwrap(type(model).compute_logits)
    return compute_logits(model, forward(model, batch))


def is_decode_batch(scheduled: tuple[ScheduledRequest, ...], num_kv_groups: int) -> bool:
    """What a compiled decode step takes: one sampled token per request, of a model with one KV cache group
    (a hybrid model's group tables stay eager)."""
    return num_kv_groups == 1 and all(c.num_tokens == 1 and c.samples for c in scheduled)


def decode_inputs(scheduled: tuple[ScheduledRequest, ...], block_size: int) -> tuple[torch.Tensor, ...]:
    """decode_forward's tensors, from the eager step's batch (runner/input_batch.py), the block tables
    padded with block 0 to at least MIN_TABLE_WIDTH_BLOCKS."""
    batch = build_forward_batch(scheduled, block_size, torch.device("cpu"))
    tables = batch.block_tables
    if tables.shape[1] < MIN_TABLE_WIDTH_BLOCKS:
        tables = torch.nn.functional.pad(tables, (0, MIN_TABLE_WIDTH_BLOCKS - tables.shape[1]))
    return batch.input_ids, batch.positions, batch.slot_mapping, batch.seq_lens, tables


class CpuDecodeCompile:
    """The compiled decode step of one model; `run` replaces the eager forward and logits of a decode batch."""

    def __init__(self, model: torch.nn.Module, block_size: int, cache_dir: str) -> None:
        # inductor reads its cache dir from the environment at each use (config.inductor_cache_dir has
        # already let the user's own $TORCHINDUCTOR_CACHE_DIR win)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, DYNAMO_RECOMPILE_LIMIT)
        self.model = model
        self.block_size = block_size
        lower_int4_mm_as_fallback()
        self._compiled = torch.compile(decode_forward, fullgraph=True, dynamic=False)

    def can_run(self, scheduled: tuple[ScheduledRequest, ...], num_kv_groups: int) -> bool:
        return is_decode_batch(scheduled, num_kv_groups)

    @torch.inference_mode()  # as the runner's execute_async: the inputs' dispatch keys are guarded
    def run(self, scheduled: tuple[ScheduledRequest, ...], fill: PlaceholderFill | None = None) -> torch.Tensor:
        """Logits [len(scheduled), vocab] float32 of these decode requests, by the compiled step."""
        inputs = self._inputs(scheduled)
        if fill is not None:
            fill.apply(inputs[0])
        return self._compiled(self.model, self.block_size, *inputs)

    def _inputs(self, scheduled: tuple[ScheduledRequest, ...]) -> tuple[torch.Tensor, ...]:
        """decode_inputs, marked dynamic for dynamo."""
        inputs = decode_inputs(scheduled, self.block_size)
        if len(scheduled) > 1:  # the {2, ..., max} bucket: the rows symbolic
            for tensor in inputs:
                torch._dynamo.mark_dynamic(tensor, 0)
        torch._dynamo.mark_dynamic(inputs[-1], 1)
        return inputs

    def warm_up(self) -> float:
        """Compile both buckets now (or load them from inductor's cache) on made-up decode steps that write
        the first slot of blocks 0 and 1 (nothing is cached yet); returns the seconds it took."""
        logger.info("Compiling the CPU decode step (--cpu-compile decode): a minute or more the first time, "
                    "less from inductor's cache in %s (its tracing is not cached)",
                    os.environ["TORCHINDUCTOR_CACHE_DIR"])
        start_s = time.monotonic()
        for num_seqs in (1, 2):
            self.run(chunks_on_blocks([((0,), 0)] * num_seqs, "compile", self.block_size, SamplingParams()))
        elapsed_s = time.monotonic() - start_s
        logger.info("CPU decode step compiled (--cpu-compile decode) in %.1f s", elapsed_s)
        return elapsed_s
