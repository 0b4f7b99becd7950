"""The torch side of a step: build the batch, run the model, sample.

Implements core.interfaces.ModelRunner. It keeps no request state besides the sampler's
(per-request generators, and token counts for requests with penalties or min_tokens), which it
drops when the scheduler reports a request finished. With tensor parallelism rank 0's runner
hands each step to the worker ranks (`peers`, runner/distributed.py) before its own forward; a
worker's runner runs `forward_only`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from multiprocessing.process import BaseProcess
from typing import Protocol

import torch

from fitserve.arch_config import ArchConfig
from fitserve.config import inductor_cache_dir, openmp_threads_sleep
from fitserve.core.interfaces import KVCapacity
from fitserve.core.outputs import PromptLogprobs, RunnerOutput, ScheduledRequest, SchedulerOutput
from fitserve.kv_groups import kv_layout
from fitserve.runner.cpu_aot import CpuDecodePackage
from fitserve.runner.cpu_compile import CpuDecodeCompile
from fitserve.runner.cpu_settings import StepThreads
from fitserve.runner.cuda_graph import DecodeGraphs
from fitserve.runner.input_batch import build_forward_batch, placeholder_fill
from fitserve.runner.prompt_logprobs import compute_prompt_logprobs, wants_prompt_logprobs
from fitserve.runner.sampler import DeviceSample, Sampler
from fitserve.runner.warmup import warm_up


def allocate_kv_cache(
    arch: ArchConfig, capacity: KVCapacity, dtype: torch.dtype, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, K and V each [num_blocks, block_size, num_kv_heads, head_dim]. A model mixing windowed
    and full layers has num_layers_per_block pairs, the layers at one position of their KV cache groups
    sharing one (kv_groups.py: a block belongs to one group at a time); else one pair per layer."""
    layout = kv_layout(arch.layer_windows)
    shape = (capacity.num_blocks, capacity.block_size, arch.num_key_value_heads, arch.head_dim)
    pairs = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
             for _ in range(layout.num_layers_per_block)]
    return [pairs[layout.layer_slot(layer)] for layer in range(arch.num_hidden_layers)]


class StepPeers(Protocol):
    """The other tensor-parallel ranks, as rank 0 sees them (runner.distributed.WorkerGroup)."""

    def send_step(self, scheduler_output: SchedulerOutput) -> None: ...

    def shutdown(self) -> None: ...


class TorchModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        arch: ArchConfig,
        capacity: KVCapacity,
        kv_dtype: torch.dtype,
        device: torch.device,
        seed: int,
        max_num_seqs: int = 256,
        max_model_len: int = 8192,
        use_cuda_graphs: bool = False,
        cpu_compile: str = "off",
        cpu_compile_cache_dir: str | None = None,
        cpu_package_builder: Callable[[int], BaseProcess] | None = None,
    ) -> None:
        self.model = model
        # The model's layers attend within arch's windows (models/llama.py): the cache may free what they
        # leave; a model mixing windowed and full layers has a block table per KV cache group (kv_groups.py)
        layout = kv_layout(arch.layer_windows)
        self.capacity = replace(capacity, sliding_window_tokens=arch.uniform_sliding_window,
                                group_windows=layout.windows if layout.is_hybrid else ())
        self.num_kv_groups = len(layout.groups)
        self.device = device
        self.kv_caches = allocate_kv_cache(arch, capacity, kv_dtype, device)
        model.bind_kv_cache(self.kv_caches, [layout.layer_group(layer) for layer in range(arch.num_hidden_layers)]
                            if layout.is_hybrid else None)
        self.sampler = Sampler(device, seed)
        self.peers: StepPeers | None = None  # set on tensor-parallel rank 0 once the workers are ready
        # every attribute execute() reads is set before the CUDA warm-up below runs steps
        self.decode_graphs: DecodeGraphs | None = None
        # the CPU's compiled decode step (--cpu-compile decode | aot; inductor's cache in cpu_compile_cache_dir)
        self.cpu_compile: CpuDecodeCompile | CpuDecodePackage | None = None
        cache_dir = cpu_compile_cache_dir or inductor_cache_dir()
        if cpu_compile == "decode" and device.type == "cpu":
            self.cpu_compile = CpuDecodeCompile(model, capacity.block_size, cache_dir)
        elif cpu_compile == "aot" and device.type == "cpu" and self.num_kv_groups == 1:
            self.cpu_compile = CpuDecodePackage(model, self.kv_caches, capacity.block_size, max_num_seqs, max_model_len,
                                                cache_dir, cpu_package_builder)
        if self.cpu_compile is not None:
            self.cpu_compile.warm_up()
        # eager CPU steps of one token run on one thread while OpenMP's threads sleep between ops
        # (runner/cpu_settings.py); a compiled step keeps the thread count its kernels were compiled for
        self.step_threads = (StepThreads(torch.get_num_threads())
                             if device.type == "cpu" and self.cpu_compile is None and openmp_threads_sleep() else None)
        if use_cuda_graphs and device.type == "cuda":
            warm_up(self)  # before the graphs: their capture then finds every kernel compiled
            max_blocks_per_seq = -(-max_model_len // capacity.block_size)
            self.decode_graphs = DecodeGraphs(model, max_num_seqs, max_blocks_per_seq, device, self.num_kv_groups)
            self.decode_graphs.capture()

    def kv_capacity(self) -> KVCapacity:
        return self.capacity

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (nothing to do on one GPU)."""
        if self.peers is not None:
            self.peers.shutdown()

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        return self.execute_async(scheduler_output).result()

    @torch.inference_mode()
    def execute_async(self, scheduler_output: SchedulerOutput, previous: PendingSample | None = None
                      ) -> PendingSample:
        """Queue the step on the device; nothing here waits for the GPU (see PendingSample).

        `previous` (async scheduling) is the step launched before this one and not read yet: its
        sampled ids, still on the device, fill this step's placeholder tokens.
        """
        if self.peers is not None:
            assert previous is None, "tensor-parallel workers cannot fill placeholders"
            self.peers.send_step(scheduler_output)  # the workers run the same forward, in lock-step
        self.sampler.forget(scheduler_output.finished_request_ids)
        scheduled = scheduler_output.scheduled
        if not scheduled:
            return PendingSample((), None)
        sampled = previous.sample if previous is not None else None
        fill = placeholder_fill(scheduled, sampled.token_ids if sampled is not None else None,
                                previous.request_ids if previous is not None else ())
        if self.decode_graphs is not None and self.decode_graphs.can_run(scheduled):
            logits = self.decode_graphs.run(scheduled, self.capacity.block_size, fill)
            return self._sample(logits, list(scheduled))
        if self.cpu_compile is not None and self.cpu_compile.can_run(scheduled, self.num_kv_groups):
            return self._sample(self.cpu_compile.run(scheduled, fill), list(scheduled))
        batch = build_forward_batch(scheduled, self.capacity.block_size, self.device, self.num_kv_groups)
        if self.step_threads is not None:
            self.step_threads.set_for(batch.input_ids.shape[0])
        if fill is not None:
            fill.apply(batch.input_ids)
        hidden = self.model(batch)  # [T, hidden]
        prompt_logprobs = {}
        if any(wants_prompt_logprobs(chunk) for chunk in scheduled):
            prompt_logprobs = compute_prompt_logprobs(self.model, hidden, scheduled)
        sampling_chunks = [chunk for chunk in scheduled if chunk.samples]
        if not sampling_chunks:
            return PendingSample((), None, prompt_logprobs=prompt_logprobs)
        logits = self.model.compute_logits(hidden[batch.logits_indices])  # [S_sampling, vocab] float32
        return self._sample(logits, sampling_chunks, prompt_logprobs)

    def _sample(self, logits: torch.Tensor, chunks: list[ScheduledRequest],
                prompt_logprobs: dict[str, PromptLogprobs] | None = None) -> PendingSample:
        sample = self.sampler.sample_device(logits, chunks)
        return PendingSample(tuple(c.request_id for c in chunks), sample, prompt_logprobs)

    @torch.inference_mode()
    def forward_only(self, scheduler_output: SchedulerOutput) -> None:
        """A tensor-parallel worker's step: rank 0's forward (the same graph-or-eager choice, so the
        collectives match), without logits or sampling."""
        scheduled = scheduler_output.scheduled
        if not scheduled:
            return
        if self.decode_graphs is not None and self.decode_graphs.can_run(scheduled):
            self.decode_graphs.replay(scheduled, self.capacity.block_size)
        else:
            self.model(build_forward_batch(scheduled, self.capacity.block_size, self.device, self.num_kv_groups))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the graphs' pinned inputs are rewritten next step


class PendingSample:
    """The sampled ids (and logprobs) of a queued step; `result()` is the step's one host
    synchronisation, and waits for this step only (not for steps queued after it). Prompt
    logprobs were read back when the step was built."""

    def __init__(self, request_ids: tuple[str, ...], sample: DeviceSample | None,
                 prompt_logprobs: dict[str, PromptLogprobs] | None = None) -> None:
        self.request_ids = request_ids
        self.sample = sample  # its token_ids: [len(request_ids)] int64 on the device; None: nothing sampled
        self.prompt_logprobs = prompt_logprobs or {}
        self._host = sample.copy_to_host() if sample is not None else None  # queued now, read in result()

    def result(self) -> RunnerOutput:
        if self._host is None:
            return RunnerOutput(sampled_token_ids={}, prompt_logprobs=self.prompt_logprobs)
        host = self._host.wait()
        logprobs = {}
        if host.logprobs is not None:
            logprobs = {rid: lp for rid, lp in zip(self.request_ids, host.logprobs) if lp is not None}
        return RunnerOutput(sampled_token_ids=dict(zip(self.request_ids, host.token_ids)), logprobs=logprobs,
                            prompt_logprobs=self.prompt_logprobs)

