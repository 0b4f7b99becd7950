"""Composition root for the engine, and the offline API.

`build_engine(config)` is the one place where the torch side (weights, model, runner) meets
the torch-free engine: everything else receives what it needs as arguments.

    from fitserve.llm import LLM
    from fitserve.sampling_params import SamplingParams
    llm = LLM()                                   # the embedded SmolLM2-135M-Instruct
    outs = llm.generate(["The capital of France is"], SamplingParams(max_tokens=16, temperature=0))
    print(outs[0].text)
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

import torch

from fitserve.config import ConfigError, EngineConfig
from fitserve.core.scheduler import SchedulerLimits
from fitserve.engine.llm_engine import EngineLimits, LLMEngine
from fitserve.engine.tokenizer import Tokenizer
from fitserve.runner.memory import check_max_model_len_fits, kv_block_bytes, kv_capacity_for_budget
from fitserve.runner.model_runner import TorchModelRunner
from fitserve.runner.profiling import profile_forward
from fitserve.sampling_params import SamplingParams
from fitserve.models.loader import load_model
from fitserve.weights.source import ModelSource, resolve_model_source

logger = logging.getLogger(__name__)
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True, slots=True)
class BuiltEngine:
    engine: LLMEngine
    tokenizer: Tokenizer
    source: ModelSource
    model_name: str


def resolve_device(config: EngineConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA device.")
    return torch.device(config.device)


def resolve_max_model_len(config: EngineConfig, source: ModelSource) -> int:
    model_max = source.arch.max_position_embeddings
    asked = config.scheduler.max_model_len
    if asked is None:
        return model_max
    if asked > model_max:
        raise ConfigError(
            f"--max-model-len {asked} is longer than the model's context of {model_max} tokens "
            f"(max_position_embeddings). Use --max-model-len {model_max} or less."
        )
    return asked


def build_engine(config: EngineConfig, progress: bool = True) -> BuiltEngine:
    start_s = time.monotonic()
    source = resolve_model_source(config)
    device = resolve_device(config)
    dtype = TORCH_DTYPES["bfloat16" if config.dtype == "auto" else config.dtype]
    max_model_len = resolve_max_model_len(config, source)
    tokenizer = Tokenizer.from_source(source)
    profiles_memory = device.type == "cuda" and config.cache.kv_cache_memory_bytes is None
    if not profiles_memory:  # the cache size is known before any weight is read: fail early
        capacity = kv_capacity_for_budget(config.cache, source.arch, dtype, device)
        check_max_model_len_fits(capacity, max_model_len)
    model = load_model(source, dtype, device, progress=progress)
    if profiles_memory:
        torch_peak_bytes = profile_forward(model, source.arch, config.scheduler.max_num_batched_tokens, device)
        capacity = kv_capacity_for_budget(config.cache, source.arch, dtype, device, torch_peak_bytes)
        check_max_model_len_fits(capacity, max_model_len)
    runner = TorchModelRunner(
        model, source.arch, capacity, dtype, device, config.seed,
        max_num_seqs=config.scheduler.max_num_seqs, max_model_len=max_model_len,
        use_cuda_graphs=not config.enforce_eager,
    )
    scheduler_limits = SchedulerLimits(
        max_num_seqs=config.scheduler.max_num_seqs,
        max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
        max_model_len=max_model_len,
    )
    eos_ids = source.eos_token_ids or tuple(tokenizer.eos_token_ids)
    limits = EngineLimits(vocab_size=source.arch.vocab_size, eos_token_ids=eos_ids, scheduler=scheduler_limits)
    engine = LLMEngine(runner, tokenizer, limits)
    kv_gib = capacity.num_blocks * kv_block_bytes(source.arch, capacity.block_size, dtype) / 2**30
    logger.info(
        "Model %s on %s (%s) ready in %.1f s. KV cache: %d tokens (%d blocks of %d, %.2f GiB); "
        "maximum concurrency at --max-model-len %d: %.2fx",
        source.name, device, str(dtype).removeprefix("torch."), time.monotonic() - start_s,
        capacity.num_tokens, capacity.num_blocks, capacity.block_size, kv_gib,
        max_model_len, capacity.num_tokens / max_model_len,
    )
    return BuiltEngine(engine, tokenizer, source, config.served_model_name or source.name)


@dataclass(frozen=True, slots=True)
class CompletionOutput:
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None


class LLM:
    """Offline batch generation on the same engine the server uses."""

    def __init__(self, model: str | None = None, **config_fields: object) -> None:
        config = config_fields.pop("config", None) or EngineConfig(model=model, **config_fields)
        self._built = build_engine(config, progress=False)
        self.engine = self._built.engine
        self.tokenizer = self._built.tokenizer

    def generate(
        self, prompts: list[str] | list[list[int]] | str, params: SamplingParams | None = None
    ) -> list[CompletionOutput]:
        """Run every prompt (text, or token ids) to completion, batched; results in prompt order."""
        params = params or SamplingParams()
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        requests = []
        for prompt in prompt_list:
            token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            request = self.engine.make_request(uuid.uuid4().hex, token_ids, params)
            self.engine.add_request(request)
            requests.append(request)
        tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
        texts: dict[str, list[str]] = {r.request_id: [] for r in requests}
        finish: dict[str, str | None] = {}
        while self.engine.has_unfinished:
            for output in self.engine.step():
                tokens[output.request_id].extend(output.new_token_ids)
                texts[output.request_id].append(output.new_text)
                if output.finished:
                    finish[output.request_id] = output.finish_reason
        return [
            CompletionOutput(
                r.prompt_token_ids, tuple(tokens[r.request_id]), "".join(texts[r.request_id]), finish.get(r.request_id)
            )
            for r in requests
        ]
