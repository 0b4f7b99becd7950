"""Test helper: a tiny random checkpoint written by transformers' own model class, loaded through
fitserve, and the two compared through the paged cache (batched prefill, then decode steps)."""

from __future__ import annotations

import torch

from fitserve.config import CacheConfig, EngineConfig, SchedulerConfig
from fitserve.llm import build_engine
from fitserve.models.loader import load_model
from fitserve.weights.source import ModelSource, resolve_model_source
from paged_helpers import PagedDriver, engine_greedy_tokens

PROMPTS = [[5, 17, 101, 44, 9, 250, 3], list(range(3, 60, 3)), [300, 12, 12, 7, 88, 190, 45, 61, 2, 30, 77, 8]]
NUM_DECODE_STEPS = 4
LOGITS_TOL = 1e-4  # float32, two layers


def save_random_checkpoint(folder, hf_model):
    """Save `hf_model` (eval) as safetensors after drawing its biases and norm weights at random:
    transformers starts biases at zero and norms at one, which would hide a missing bias or norm."""
    with torch.no_grad():
        for param_name, param in hf_model.named_parameters():
            if param_name.endswith(".bias"):
                param.normal_(0.0, 0.5)
            elif "norm" in param_name:
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
    hf_model.save_pretrained(folder)
    return hf_model


def load_ours(folder) -> tuple[ModelSource, torch.nn.Module]:
    source = resolve_model_source(EngineConfig(model=str(folder)))
    return source, load_model(source, torch.float32, torch.device("cpu"), progress=False)


def hf_last_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0, -1].float()


def check_prefill_and_decode(ours, hf, prompts: list[list[int]] = PROMPTS,
                             num_decode_steps: int = NUM_DECODE_STEPS) -> None:
    """Prompts of different lengths prefilled in one batch (with padding rows), then decoded together
    greedily through the paged cache; every step's logits equal transformers' on the whole sequence."""
    driver = PagedDriver(ours, num_blocks=64, block_size=4)
    seqs = {f"r{i}": list(p) for i, p in enumerate(prompts)}
    logits = driver.step(list(seqs.items()), num_pad_rows=2)
    for step in range(num_decode_steps + 1):
        for row, ids in enumerate(seqs.values()):
            torch.testing.assert_close(logits[row], hf_last_logits(hf, ids), atol=LOGITS_TOL, rtol=LOGITS_TOL,
                                       msg=lambda m, r=row, s=step: f"request {r}, step {s}: {m}")
        if step < num_decode_steps:
            for ids, token in zip(seqs.values(), logits.argmax(-1).tolist()):
                ids.append(token)
            logits = driver.step([(req, ids[-1:]) for req, ids in seqs.items()])


def check_engine_greedy(folder, hf, block_size: int | None = None) -> None:
    """The whole engine (scheduler, runner, sampler) on the checkpoint in `folder`: paged_helpers'
    11 requests, batched and decoded together, get transformers' greedy tokens (20, or up to eos)."""
    blocks = {} if block_size is None else {"block_size": block_size}
    config = EngineConfig(model=str(folder), dtype="float32", device="cpu",
                          cache=CacheConfig(num_gpu_blocks_override=128, **blocks),
                          scheduler=SchedulerConfig(max_model_len=256, max_num_seqs=16))
    vocab_size = hf.config.vocab_size
    got = engine_greedy_tokens(build_engine(config, progress=False).engine, vocab_size)
    for i in range(11):
        ids = torch.tensor([[(7 * i + j) % vocab_size for j in range(5 + 3 * i)]])  # engine_greedy_tokens' prompts
        with torch.no_grad():  # an explicit mask: generate would take token 0 for padding
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                              eos_token_id=hf.config.eos_token_id, pad_token_id=0)
        assert got[f"r{i}"] == ref[0, ids.shape[1]:].tolist(), f"request {i}"
