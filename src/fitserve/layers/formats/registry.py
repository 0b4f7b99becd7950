"""Weight formats by `--quantization` value (None: the serving dtype). Adding a format is one
module under layers/formats/ and one entry here (and its name in config.QUANTIZATIONS, which
the torch-free command line and planner check)."""

from __future__ import annotations

import torch

from fitserve.config import ConfigError
from fitserve.layers.formats import fp8
from fitserve.layers.formats.gguf import GGUF
from fitserve.layers.formats.unquantized import UNQUANTIZED
from fitserve.layers.weight_format import LinearLayer, WeightFormat

WEIGHT_FORMATS: dict[str | None, WeightFormat] = {
    None: UNQUANTIZED,
    "fp8": fp8.FP8,
    "fp8_per_tensor": fp8.FP8_PER_TENSOR,
    "gguf": GGUF,
}


def get_weight_format(quantization: str | WeightFormat | None) -> WeightFormat:
    """The format of a --quantization value, or a format made for one checkpoint (formats/int_quant.py)."""
    if isinstance(quantization, WeightFormat):
        return quantization
    try:
        return WEIGHT_FORMATS[quantization]
    except KeyError:
        names = ", ".join(name for name in WEIGHT_FORMATS if name is not None)
        raise ConfigError(f"--quantization must be one of {names} or left out, got {quantization!r}.") from None


def make_linear(in_features: int, out_features: int | tuple[int, ...], dtype: torch.dtype,
                device: torch.device, quantization: str | None) -> LinearLayer:
    """The linear layer for `--quantization` (None: the serving dtype)."""
    return get_weight_format(quantization).for_device(torch.device(device)).create(in_features, out_features, dtype, device)
