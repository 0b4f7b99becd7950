"""The weight-format seam (layers/weight_format.py, layers/formats/): what a format allocates is
what it says it allocates (and what the planner counts), and a new format plugs into the model
without a change to the model."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from fitserve.arch_config import ArchConfig
from fitserve.config import ConfigError
from fitserve.layers.formats import registry
from fitserve.layers.formats.registry import WEIGHT_FORMATS, get_weight_format, make_linear
from fitserve.layers.weight_format import WEIGHT, WEIGHT_SCALE, LinearLayer, WeightFormat, WeightSpec
from fitserve.models.llama import LlamaForCausalLM
from fitserve.models.loader import init_dummy
from fitserve.plan.shapes import counts_from_arch, weight_bytes
from paged_helpers import PagedDriver

ARCH = ArchConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
CPU = torch.device("cpu")


# Formats whose tensors the checkpoint decides: gguf creates its packed parameters when the file's
# tensors arrive and is planned from the file's header (tests/test_gguf_quant.py checks both).
DECLARED_FORMATS = [q for q in WEIGHT_FORMATS if q != "gguf"]


@pytest.mark.parametrize("quantization", DECLARED_FORMATS)
def test_a_layer_holds_exactly_its_formats_weight_specs(quantization):
    fmt = get_weight_format(quantization)
    layer = make_linear(64, (48, 16, 16), torch.bfloat16, CPU, quantization)
    specs = fmt.weight_specs(64, (48, 16, 16), torch.bfloat16)
    params = dict(layer.named_parameters())
    assert {s.name: (s.shape, s.dtype) for s in specs} == {n: (tuple(p.shape), p.dtype) for n, p in params.items()}
    assert fmt.weight_bytes(64, (48, 16, 16), torch.bfloat16) == sum(p.numel() * p.element_size()
                                                                     for p in params.values())
    assert isinstance(layer, LinearLayer) and layer.out_features == 80 and layer.shard_sizes == (48, 16, 16)


@pytest.mark.parametrize("quantization", DECLARED_FORMATS)
def test_the_planner_counts_the_formats_weight_bytes(quantization):
    """plan/shapes.py (torch-free) counts the blocks' linear weights as the format allocates them."""
    model = LlamaForCausalLM(ARCH, torch.bfloat16, CPU, quantization=quantization)
    layers = [m for n, m in model.named_modules() if isinstance(m, LinearLayer) and n != "lm_head"]
    assert len(layers) == 4 * ARCH.num_hidden_layers
    planned = weight_bytes(counts_from_arch(ARCH), "bfloat16", quantization)
    assert planned.linear_bytes == sum(m.weight.numel() * m.weight.element_size() for m in layers)
    scale_bytes = sum(m.weight_scale.numel() * 4 for m in layers if hasattr(m, WEIGHT_SCALE))
    if quantization != "fp8":  # per-channel scales: the planner counts one float32 per layer, not per row
        assert planned.scale_bytes == scale_bytes


def test_an_unknown_format_is_refused_with_the_known_ones():
    with pytest.raises(ConfigError, match=r"fp8, fp8_per_tensor, gguf or left out, got 'int4'"):
        get_weight_format("int4")


def test_an_unquantized_layer_refuses_checkpoint_scales():
    layer = make_linear(16, 16, torch.float32, CPU, None)
    with pytest.raises(ValueError, match="needs --quantization fp8 or fp8_per_tensor"):
        layer.load(0, WEIGHT_SCALE, torch.ones(()))
    with pytest.raises(ValueError, match=r"expected \(16, 16\)"):
        layer.load(0, WEIGHT, torch.ones(8, 16))


class HalfStoredLinear(LinearLayer):
    """A test format: weights kept in float16 whatever the serving dtype, applied in float32."""

    def __init__(self, in_features: int, out_features: int | tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__(HALF_STORED, in_features, out_features, dtype, device)
        self.loads: list[tuple[int, str]] = []

    def load(self, shard_index: int, piece: str, tensor: torch.Tensor) -> None:
        assert piece == WEIGHT
        self.check_shard_shape(shard_index, tensor)
        start, rows = self.shard_rows(shard_index)
        self.weight.data[start:start + rows].copy_(tensor)
        self.loads.append((shard_index, piece))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() @ self.weight.float().T).to(x.dtype)


@dataclass(frozen=True, slots=True)
class HalfStoredFormat(WeightFormat):
    name: str = "half_stored"
    fused_input_quantization: bool = False

    def weight_specs(self, in_features, shard_sizes, dtype):
        return (WeightSpec(WEIGHT, (sum(shard_sizes), in_features), torch.float16),)

    def create(self, in_features, out_features, dtype, device):
        return HalfStoredLinear(in_features, out_features, dtype, device)


HALF_STORED = HalfStoredFormat()


def test_a_new_format_plugs_into_the_model_through_the_registry(monkeypatch):
    """One format module plus one registry entry: the Llama model builds, loads and runs it unchanged."""
    monkeypatch.setitem(registry.WEIGHT_FORMATS, "half_stored", HALF_STORED)
    model = LlamaForCausalLM(ARCH, torch.float32, CPU, quantization="half_stored")
    init_dummy(model)
    dense = LlamaForCausalLM(ARCH, torch.float32, CPU)
    init_dummy(dense)
    projections = [m for m in model.modules() if isinstance(m, HalfStoredLinear)]
    assert len(projections) == 4 * ARCH.num_hidden_layers
    assert all(m.weight.dtype == torch.float16 for m in projections)
    assert sorted({i for m in projections for i, _ in m.loads}) == [0, 1, 2]  # q, k, v shards of qkv_proj
    step = [("a", list(range(1, 12)))]
    got = PagedDriver(model, num_blocks=8, block_size=16).step(step)
    expected = PagedDriver(dense, num_blocks=8, block_size=16).step(step)
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)  # float16 rounding of the weights only
