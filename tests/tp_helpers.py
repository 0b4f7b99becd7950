"""A tiny Llama checkpoint with even head counts, and LLMs over it, for the tensor-parallel tests."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import torch
import transformers

from fitserve.config import CacheConfig, EngineConfig, SchedulerConfig
from fitserve.llm import LLM
from fitserve.sampling_params import SamplingParams

# 4 heads, 2 KV heads, 96 MLP columns: TP=2 gives each rank 2 heads, 1 KV head, 48 columns
TINY_LLAMA = dict(vocab_size=311, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
# Token-id prompts of awkward lengths; with a 16-token step budget the long ones are chunked
PROMPTS = [list(range(3, 40)), [5, 9, 17], list(range(100, 300, 7)), [42] * 11]
GREEDY_16 = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


def write_tiny_llama(folder: Path, **overrides: object) -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**TINY_LLAMA, **overrides})
    transformers.LlamaForCausalLM(config).eval().save_pretrained(folder)
    return folder


def tiny_llm(folder: Path, tensor_parallel_size: int, device: str = "cpu", **fields: object) -> LLM:
    config = EngineConfig(model=str(folder), dtype="float32", device=device, tensor_parallel_size=tensor_parallel_size,
                          cache=CacheConfig(kv_cache_memory_bytes=8 << 20),
                          scheduler=SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=4), **fields)
    return LLM(config=config)


def greedy_tokens(llm: LLM, prompts: list[list[int]] = PROMPTS) -> list[tuple[int, ...]]:
    return [out.token_ids for out in llm.generate(prompts, GREEDY_16)]


def generate_after_killing_a_worker(llm: LLM, timeout_s: float) -> tuple[bool, BaseException | None]:
    """SIGKILL the first worker, then generate from another thread: (whether that thread still
    runs after `timeout_s`, i.e. the engine hung; what generating raised, None if nothing)."""
    worker = llm.engine.runner.peers.processes[0]
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(timeout_s)
    outcome: list[BaseException | None] = [None]

    def generate() -> None:
        try:
            greedy_tokens(llm, PROMPTS[:2])
        except BaseException as error:  # noqa: BLE001 - the test looks at it
            outcome[0] = error

    thread = threading.Thread(target=generate, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return thread.is_alive(), outcome[0]
