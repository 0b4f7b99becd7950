"""Model classes by Hugging Face architecture name."""

from __future__ import annotations

from fitserve.config import SUPPORTED_ARCHITECTURES, ConfigError
from fitserve.models.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,  # same blocks; sliding window is not supported
}
assert set(MODEL_REGISTRY) == set(SUPPORTED_ARCHITECTURES), "registry and config must agree"


def get_model_class(architecture: str) -> type[LlamaForCausalLM]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ConfigError(f"Architecture {architecture!r} is not supported; fitserve serves "
                          f"{', '.join(MODEL_REGISTRY)}.") from None
