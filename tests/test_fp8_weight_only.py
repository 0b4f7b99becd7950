"""fp8 weights without fp8 tensor cores (W8A16): the format's form by device, and its CPU path.

The Triton kernel (kernels/triton_w8a16.py) is checked against this path on the GPU, with the
weight-only form forced on an H200 (tests/test_fp8_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from fitserve.kernels import fp8
from fitserve.layers.formats import fp8 as quantization
from fitserve.layers.formats.registry import get_weight_format, make_linear

CPU = torch.device("cpu")


def weight_only_layer(quant: str, weight: torch.Tensor, dtype: torch.dtype) -> quantization.Fp8Linear:
    fmt = get_weight_format(quant)
    assert isinstance(fmt, quantization.Fp8Format)
    layer = quantization.Fp8Format(fmt.name, fmt.per_tensor, weight_only=True).create(
        weight.shape[1], weight.shape[0], dtype, CPU)
    layer.load_shard(0, weight)
    return layer


def test_the_form_follows_the_device(monkeypatch):
    assert get_weight_format("fp8").for_device(CPU) is get_weight_format("fp8"), "the CPU keeps W8A8"
    forced = quantization.FP8.__class__("fp8", per_tensor=False, weight_only=True)
    assert not forced.fused_input_quantization, "norms and SiLU must hand it plain activations"
    assert quantization.FP8.fused_input_quantization
    assert forced.weight_specs(64, (32, 16), torch.bfloat16) == quantization.FP8.weight_specs(64, (32, 16), torch.bfloat16)


@pytest.mark.parametrize("quant", ["fp8", "fp8_per_tensor"])
def test_weight_only_multiplies_the_activations_by_the_stored_weight(quant):
    torch.manual_seed(0)
    weight = torch.randn(48, 96) * 0.05
    layer = weight_only_layer(quant, weight, torch.float32)
    x = torch.randn(5, 96) * 10  # activations that fp8 would round: weight-only keeps them
    dequantized = layer.weight.float() * (layer.weight_scale.reshape(-1, 1) if quant == "fp8" else layer.weight_scale)
    torch.testing.assert_close(layer(x), x @ dequantized.t(), rtol=1e-5, atol=1e-5)
    w8a8 = make_linear(96, 48, torch.float32, CPU, quant)
    w8a8.load_shard(0, weight)
    assert torch.equal(w8a8.weight.view(torch.uint8), layer.weight.view(torch.uint8)), "the same stored bytes"
    assert not torch.allclose(w8a8(x), layer(x), rtol=1e-4, atol=1e-4), "W8A8 also rounds the activations"


def test_weight_only_reference_rounds_once_to_the_activation_dtype():
    qw, scale = fp8.quantize_per_row(torch.randn(8, 32))
    x = torch.randn(3, 32).to(torch.bfloat16)
    out = fp8.weight_only_mm_reference(x, qw, scale.reshape(1, -1))
    assert out.dtype == torch.bfloat16
    expected = ((x.float() @ qw.float().t()) * scale.reshape(1, -1)).to(torch.bfloat16)
    assert torch.equal(out, expected)


def test_weight_only_layers_are_not_calibrated():
    from torch import nn

    layer = weight_only_layer("fp8_per_tensor", torch.randn(16, 32), torch.float32)
    with quantization.observe_activations(nn.Sequential(layer)) as num_layers:
        layer(torch.randn(2, 32))
    assert num_layers == 0 and layer.input_scale is None
