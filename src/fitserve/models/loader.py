"""load_model: build the model on its device and fill it from GGUF, safetensors, or random values.

With `quantization` the linear layers are fp8 (layers/quantization.py) and each checkpoint
tensor is quantized as it arrives, so the serving-dtype copy of the model never exists.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from fitserve.config import ConfigError
from fitserve.layers.quantization import Fp8Linear
from fitserve.models.llama import LlamaForCausalLM
from fitserve.models.registry import get_model_class
from fitserve.weights.loader import gguf_weights, safetensors_weights
from fitserve.weights.source import ModelSource

DUMMY_INIT_STD = 0.02  # small enough that 32 random layers keep activations finite in bf16
DUMMY_SEED = 0


def load_model(source: ModelSource, dtype: torch.dtype, device: torch.device, progress: bool = True,
               quantization: str | None = None) -> LlamaForCausalLM:
    model_class = get_model_class(source.arch.architecture)
    model = model_class(source.arch, dtype, device, quantization=quantization)
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
    assert all(m.is_loaded for m in model.modules() if isinstance(m, Fp8Linear)), "an fp8 layer missed a shard"
    if quantization is not None and model.device.type == "cuda":
        torch.cuda.empty_cache()  # hand back the quantization temporaries before the memory is measured
    return model.eval()


@torch.no_grad()
def _init_dummy(model: LlamaForCausalLM) -> None:
    """Random weights drawn on the model's device (no host copy), norms at one; deterministic.

    An fp8 layer draws the same values as the serving-dtype model would (one projection at a
    time, in the serving dtype) and quantizes them, so both models are the same network.
    """
    generator = torch.Generator(device=model.device).manual_seed(DUMMY_SEED)
    for name, module in model.named_modules():
        if isinstance(module, Fp8Linear):
            weight = torch.empty(module.out_features, module.in_features, dtype=module.dtype, device=model.device)
            module.load_full(weight.normal_(0.0, DUMMY_INIT_STD, generator=generator))
            del weight
            continue
        param = getattr(module, "weight", None)
        if not isinstance(param, torch.nn.Parameter) or any(True for _ in module.children()):
            continue
        if name.endswith("layernorm") or name == "norm":
            param.fill_(1.0)
        else:
            param.normal_(0.0, DUMMY_INIT_STD, generator=generator)
