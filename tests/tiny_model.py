"""A tiny Llama with deterministic random weights (--load-format dummy), served on the CPU.

Real runner, real sampler, fallback byte tokenizer (token id = byte for ids < 256): what the
API tests of logits-level features (logit_bias, penalties, logprobs) need, in milliseconds.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from server_fixtures import live_server

from fitserve.config import CacheConfig, EngineConfig, SchedulerConfig
from fitserve.engine.async_engine import AsyncEngine
from fitserve.startup import build_engine
from fitserve.server.app import build_app

TINY_VOCAB = 300
TINY_EOS = 299
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": TINY_VOCAB, "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 256,
    "eos_token_id": TINY_EOS, "torch_dtype": "float32",
}


def write_tiny_model(folder: Path, generation_config: dict[str, Any] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    if generation_config is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation_config))
    return folder


def tiny_engine_config(folder: Path, **fields: Any) -> EngineConfig:
    return EngineConfig(model=str(folder), load_format="dummy", dtype="float32", device="cpu",
                        cache=CacheConfig(num_gpu_blocks_override=128),
                        scheduler=SchedulerConfig(max_model_len=256, max_num_seqs=16), **fields)


@contextmanager
def tiny_server(folder: Path, **fields: Any):
    """Yields (base URL, AsyncEngine) of a live server on the tiny model."""
    built = build_engine(tiny_engine_config(folder, **fields), progress=False)
    engine = AsyncEngine(built.engine, "tiny", built.tokenizer,
                         default_sampling_params=built.default_sampling_params).start()
    try:
        with live_server(build_app(engine)) as url:
            yield url, engine
    finally:
        engine.shutdown()
