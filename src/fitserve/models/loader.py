"""load_model: build the model on its device and fill it from GGUF, safetensors, or random values."""

from __future__ import annotations

import torch
from tqdm import tqdm

from fitserve.config import ConfigError
from fitserve.models.llama import LlamaForCausalLM
from fitserve.models.registry import get_model_class
from fitserve.weights.loader import gguf_weights, safetensors_weights
from fitserve.weights.source import ModelSource

DUMMY_INIT_STD = 0.02  # small enough that 32 random layers keep activations finite in bf16
DUMMY_SEED = 0


def load_model(source: ModelSource, dtype: torch.dtype, device: torch.device, progress: bool = True) -> LlamaForCausalLM:
    model_class = get_model_class(source.arch.architecture)
    model = model_class(source.arch, dtype, device)
    if source.kind == "dummy":
        _init_dummy(model)
    else:
        weights = gguf_weights(source) if source.kind == "gguf" else safetensors_weights(source.weights_path)
        bar = tqdm(weights, total=len(model.expected_weight_names()), desc=f"Loading {source.name}", unit="tensor", disable=not progress)
        loaded = model.load_weights(bar)
        missing = model.expected_weight_names() - loaded
        if missing:
            raise ConfigError(f"The checkpoint {source.weights_path} lacks {len(missing)} tensors, "
                              f"e.g. {sorted(missing)[:3]}.")
    return model.eval()


@torch.no_grad()
def _init_dummy(model: LlamaForCausalLM) -> None:
    """Random weights drawn on the model's device (no host copy), norms at one; deterministic."""
    generator = torch.Generator(device=model.device).manual_seed(DUMMY_SEED)
    for name, param in model.named_parameters():
        if name.endswith("layernorm.weight") or name == "norm.weight":
            param.fill_(1.0)
        else:
            param.normal_(0.0, DUMMY_INIT_STD, generator=generator)
