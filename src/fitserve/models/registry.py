"""Model classes by Hugging Face architecture name (config.json's `architectures[0]`).

Adding an architecture is one module under models/ whose class satisfies models/base.py
`CausalLM` / `ModelClass`, plus one entry here. The name must also be in
arch_config.SUPPORTED_ARCHITECTURES, which rejects an unknown architecture while config.json is
read, before torch is imported (`fitserve plan` never imports it); the assert below keeps the
two lists equal.
"""

from __future__ import annotations

from fitserve.arch_config import SUPPORTED_ARCHITECTURES
from fitserve.config import ConfigError
from fitserve.models.base import ModelClass
from fitserve.models.gemma2 import Gemma2ForCausalLM
from fitserve.models.gemma3 import Gemma3ForCausalLM
from fitserve.models.llama import LlamaForCausalLM
from fitserve.models.mixtral import MixtralForCausalLM
from fitserve.models.phi3 import Phi3ForCausalLM
from fitserve.models.qwen2 import Qwen2ForCausalLM
from fitserve.models.qwen3 import Qwen3ForCausalLM
from fitserve.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, ModelClass] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,  # same blocks; sliding window is not supported
    "Qwen2ForCausalLM": Qwen2ForCausalLM,  # Qwen2 and Qwen2.5: q, k, v biases
    "Qwen3ForCausalLM": Qwen3ForCausalLM,  # q and k RMSNorm per head
    "Phi3ForCausalLM": Phi3ForCausalLM,  # fused qkv and gate_up tensors, split at load
    "MixtralForCausalLM": MixtralForCausalLM,  # Mixture of Experts (layers/moe.py), top-2
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,  # Qwen3 attention, Mixture of Experts
    "Gemma2ForCausalLM": Gemma2ForCausalLM,  # 4 norms a layer, (1 + w) norms, GELU, soft-caps, local layers
    "Gemma3ForCausalLM": Gemma3ForCausalLM,  # Gemma 2's blocks with q/k norms and a local rope base
    "Gemma3ForConditionalGeneration": Gemma3ForCausalLM,  # the text tower only (language_model.* tensors)
}
assert set(MODEL_REGISTRY) == set(SUPPORTED_ARCHITECTURES), "registry and config must agree"


def get_model_class(architecture: str) -> ModelClass:
    """ConfigError naming the architecture and the supported ones when it is not registered."""
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ConfigError(f"Architecture {architecture!r} is not supported; fitserve serves "
                          f"{', '.join(MODEL_REGISTRY)}.") from None
