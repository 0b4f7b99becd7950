"""The profiling run: the most activation memory one step can need, measured before the KV
cache takes the rest of the budget.

Like vLLM's profile run it has two parts: a forward of the whole token budget
(`--max-num-batched-tokens`, as prefills of at most `max_model_len` tokens), then logits and
sampling for as many requests as one step holds (`min(max_num_seqs, token budget)` rows).
Unlike vLLM's, the sampling part takes the sampler's most expensive path (logprobs, the three
penalties, logit_bias, min_tokens, then top-k, top-p and min-p on every row), so a batch of
such requests cannot run out of memory later.
"""

from __future__ import annotations

import time

import torch

from fitserve.arch_config import ArchConfig
from fitserve.core.interfaces import KVCapacity
from fitserve.core.outputs import ScheduledRequest
from fitserve.runner.input_batch import build_forward_batch, chunks_on_blocks
from fitserve.runner.model_runner import allocate_kv_cache
from fitserve.runner.sampler import Sampler
from fitserve.sampling_params import SamplingParams

PROFILE_BLOCK_SIZE = 16
# Everything on: the sampler's largest temporaries (raw logprobs kept through the step, the
# penalties' count slab and temporaries, then a full sort of each row's logits).
WORST_CASE_SAMPLING = SamplingParams(
    temperature=1.0, top_k=50, top_p=0.9, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.5,
    repetition_penalty=1.1, logit_bias={0: 1.0}, min_tokens=1, logprobs=20, eos_token_ids=(0,))


def prefill_chunks(prompts: list[tuple[int, ...]], name: str) -> tuple[ScheduledRequest, ...]:
    """Whole prompts as one step's prefills, each on its own consecutive blocks of PROFILE_BLOCK_SIZE."""
    return chunks_on_blocks([(token_ids, 0) for token_ids in prompts], name, PROFILE_BLOCK_SIZE, SamplingParams())


def profile_chunks(num_tokens: int, max_model_len: int) -> tuple[ScheduledRequest, ...]:
    """`num_tokens` prompt tokens as prefills of at most max_model_len tokens, on distinct blocks."""
    lengths = [min(max_model_len, num_tokens - start) for start in range(0, num_tokens, max_model_len)]
    return prefill_chunks([(0,) * length for length in lengths], "profile")


def sampling_chunks(num_rows: int) -> list[ScheduledRequest]:
    return [ScheduledRequest(f"profile-sample-{i}", (0,), 0, (0,), True, WORST_CASE_SAMPLING, prompt_token_ids=(0,))
            for i in range(num_rows)]


@torch.inference_mode()
def run_forward(model: torch.nn.Module, chunks: tuple[ScheduledRequest, ...], device: torch.device) -> torch.Tensor:
    """The forward part; returns the final hidden states [T, hidden]."""
    return model(build_forward_batch(chunks, PROFILE_BLOCK_SIZE, device))


@torch.inference_mode()
def run_sampling(model: torch.nn.Module, hidden: torch.Tensor, num_rows: int, device: torch.device) -> None:
    """The logits-and-sampling part over `num_rows` rows of `hidden`."""
    rows = torch.arange(num_rows, device=device) % hidden.shape[0]
    logits = model.compute_logits(hidden[rows])  # [num_rows, vocab] float32
    Sampler(device, seed=0).sample(logits, sampling_chunks(num_rows))


def throwaway_cache(model: torch.nn.Module, arch: ArchConfig, chunks: tuple[ScheduledRequest, ...],
                    device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    num_blocks = sum(len(c.block_table) for c in chunks)
    caches = allocate_kv_cache(arch, KVCapacity(num_blocks, PROFILE_BLOCK_SIZE), model.dtype, device)
    model.bind_kv_cache(caches)
    return caches


def unbind_cache(model: torch.nn.Module, arch: ArchConfig, device: torch.device) -> None:
    model.bind_kv_cache(allocate_kv_cache(arch, KVCapacity(0, PROFILE_BLOCK_SIZE), model.dtype, device))


@torch.inference_mode()
def profile_activation_peak(
    model: torch.nn.Module, arch: ArchConfig, max_num_batched_tokens: int, max_num_seqs: int,
    max_model_len: int, device: torch.device, with_sampling: bool = True,
) -> dict[str, float]:
    """Peak bytes torch allocates above the weights (and the throw-away cache) in each part:
    {"activation_peak_bytes", "forward_peak_bytes", "sampling_peak_bytes", "seconds"}.
    `with_sampling=False` on tensor-parallel workers, which never compute logits."""
    start_s = time.monotonic()
    chunks = profile_chunks(max_num_batched_tokens, max_model_len)
    caches = throwaway_cache(model, arch, chunks, device)
    torch.cuda.synchronize(device)
    base_bytes = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    hidden = run_forward(model, chunks, device)
    torch.cuda.synchronize(device)
    forward_peak = torch.cuda.max_memory_allocated(device) - base_bytes
    torch.cuda.reset_peak_memory_stats(device)
    if with_sampling:
        run_sampling(model, hidden, min(max_num_seqs, max_num_batched_tokens), device)
    torch.cuda.synchronize(device)
    sampling_peak = torch.cuda.max_memory_allocated(device) - base_bytes
    unbind_cache(model, arch, device)
    del caches, hidden
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return {
        "activation_peak_bytes": max(forward_peak, sampling_peak),
        "forward_peak_bytes": forward_peak,
        "sampling_peak_bytes": sampling_peak,
        "seconds": time.monotonic() - start_s,
    }
