"""The model seam (models/base.py, models/registry.py): an unknown architecture fails before any
weight is read, a registered class is what load_model builds, and build settings reach the layers."""

from __future__ import annotations

import pytest
import torch

from fitserve.arch_config import SUPPORTED_ARCHITECTURES, ArchConfig
from fitserve.config import ConfigError
from fitserve.layers.attention import PagedAttention
from fitserve.models import loader, registry
from fitserve.models.llama import LlamaForCausalLM
from fitserve.weights.source import ModelSource

ARCH = ArchConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)


def _source(arch: ArchConfig, kind: str = "hf") -> ModelSource:
    return ModelSource(kind=kind, name="test", weights_path="/nonexistent", arch=arch, tokenizer_kind="none",
                       tokenizer_path=None, eos_token_ids=())


def test_an_unknown_architecture_fails_before_any_weight_is_read(monkeypatch):
    def no_reading(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(loader, "safetensors_weights", no_reading)
    monkeypatch.setattr(loader, "gguf_weights", no_reading)
    arch = ArchConfig(**{**_fields(ARCH), "architecture": "GPT2LMHeadModel"})
    with pytest.raises(ConfigError) as info:
        loader.load_model(_source(arch), torch.float32, torch.device("cpu"), progress=False)
    assert "'GPT2LMHeadModel' is not supported" in str(info.value)
    assert "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM" in str(info.value)


def test_registry_and_config_name_the_same_architectures():
    assert set(registry.MODEL_REGISTRY) == set(SUPPORTED_ARCHITECTURES)
    assert registry.get_model_class("MistralForCausalLM") is LlamaForCausalLM  # an alias, as before


def test_load_model_builds_the_registered_class_with_its_settings(monkeypatch):
    """A new architecture is one class plus one registry entry: load_model builds it and fills it."""
    built = []

    class Recorded(LlamaForCausalLM):
        def __init__(self, arch, dtype, device, **settings):
            super().__init__(arch, dtype, device, **settings)
            built.append(settings)

    monkeypatch.setitem(registry.MODEL_REGISTRY, "RecordedForCausalLM", Recorded)
    arch = ArchConfig(**{**_fields(ARCH), "architecture": "RecordedForCausalLM"})
    model = loader.load_model(_source(arch, kind="dummy"), torch.float32, torch.device("cpu"), progress=False,
                              fuse_rotary_store=False)
    assert isinstance(model, Recorded) and built[0]["fuse_rotary_store"] is False
    attention_layers = [m for m in model.modules() if isinstance(m, PagedAttention)]
    assert len(attention_layers) == ARCH.num_hidden_layers
    assert not any(m.fuse_rotary_store for m in attention_layers)
    assert float(model.norm.weight.sum()) == ARCH.hidden_size  # dummy weights loaded (norms at one)


def test_the_rotary_store_fusion_is_on_unless_built_off():
    on = LlamaForCausalLM(ARCH, torch.float32, torch.device("cpu"))
    off = LlamaForCausalLM(ARCH, torch.float32, torch.device("cpu"), fuse_rotary_store=False)
    assert all(m.fuse_rotary_store for m in on.modules() if isinstance(m, PagedAttention))
    assert not any(m.fuse_rotary_store for m in off.modules() if isinstance(m, PagedAttention))


def _fields(arch: ArchConfig) -> dict:
    return {name: getattr(arch, name) for name in arch.__dataclass_fields__}
