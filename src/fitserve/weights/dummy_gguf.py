"""Random GGUF blocks with valid scales, for the dummy Q4_K_M layout (weights/dummy_layouts.py).

A block's quantized values are random bits; its scale fields are written so that the weights it
dequantizes to (kernels/gguf.py) are finite, of root mean square about DUMMY_INIT_STD, and centred:
the K-quants' per-sub-block mins cancel the mean of their values (min = scale x mean value), so a
random layer adds no bias. Scales are float16, as GGML stores them; each block's is the nominal
one times a uniform factor in SCALE_SPREAD.
"""

from __future__ import annotations

import torch

from fitserve.weights.dummy_layouts import BLOCK_SIZES, DUMMY_INIT_STD, SCALE_SPREAD

SUB_SCALE_RANGE = (1, 64)  # Q4_K / Q5_K: the 6-bit sub-block scales drawn from [1, 64)
Q6_K_SCALE_RANGE = (1, 16)  # Q6_K: |int8 sub-block scale| drawn from [1, 16), random sign
K_MIN_STEP = {"Q4_K": 8, "Q5_K": 16}  # dmin = d x this, so min = scale x mean value fits in 6 bits


def _uniform_rms(num_values: int) -> float:
    """Root mean square of (q - mean) for q uniform over num_values integers."""
    return ((num_values**2 - 1) / 12) ** 0.5


def _f16_bytes(values: torch.Tensor) -> torch.Tensor:
    """[B] float -> [B, 2] uint8, little-endian float16 as GGML stores it."""
    return values.to(torch.float16).reshape(-1, 1).view(torch.uint8)


def _block_scales(num_blocks: int, nominal: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    low, high = SCALE_SPREAD
    return (torch.rand(num_blocks, generator=generator, device=device) * (high - low) + low) * nominal


def encode_k_scales(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Q4_K / Q5_K: eight 6-bit scales and mins [B, 8] each -> their 12 bytes [B, 12] (the inverse of
    kernels/gguf.py _k_scale_min)."""
    sc, mn = sc.to(torch.uint8), mn.to(torch.uint8)
    low = torch.cat([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mn[:, :4] | ((mn[:, 4:] >> 4) << 6)], dim=1)
    return torch.cat([low, (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)], dim=1)


def _k_quant(blocks: torch.Tensor, type_name: str, generator: torch.Generator) -> None:
    """Q4_K (q in [0, 16)) or Q5_K (q in [0, 32)): d, dmin, then 8 sub-block scales and mins."""
    num_values = 16 if type_name == "Q4_K" else 32
    num_blocks, device = blocks.shape[0], blocks.device
    sc = torch.randint(*SUB_SCALE_RANGE, (num_blocks, 8), generator=generator, device=device)
    sc_rms = float(((sc.float() ** 2).mean()) ** 0.5) if num_blocks else 1.0
    d = _block_scales(num_blocks, DUMMY_INIT_STD / (_uniform_rms(num_values) * sc_rms), generator, device)
    step = K_MIN_STEP[type_name]
    mn = torch.round(sc * ((num_values - 1) / 2) / step)  # dmin x mn = d x sc x mean(q)
    blocks[:, 0:2] = _f16_bytes(d)
    blocks[:, 2:4] = _f16_bytes(d * step)
    blocks[:, 4:16] = encode_k_scales(sc, mn)


def _q6_k(blocks: torch.Tensor, generator: torch.Generator) -> None:
    """Q6_K: q in [0, 64) minus 32, 16 int8 sub-block scales, d last."""
    num_blocks, device = blocks.shape[0], blocks.device
    magnitude = torch.randint(*Q6_K_SCALE_RANGE, (num_blocks, 16), generator=generator, device=device)
    sign = torch.randint(0, 2, (num_blocks, 16), generator=generator, device=device) * 2 - 1
    scales = (magnitude * sign).to(torch.int8)
    scale_rms = float(((magnitude.float() ** 2).mean()) ** 0.5) if num_blocks else 1.0
    blocks[:, 192:208] = scales.view(torch.uint8)
    blocks[:, 208:210] = _f16_bytes(_block_scales(num_blocks, DUMMY_INIT_STD / (_uniform_rms(64) * scale_rms),
                                                  generator, device))


def random_blocks(type_name: str, shape: tuple[int, int], generator: torch.Generator,
                  device: torch.device) -> torch.Tensor:
    """A weight [N, K] in `type_name` as packed rows [N, K / block_elements * block_bytes] uint8."""
    elements, block_bytes = BLOCK_SIZES[type_name]
    num_rows, in_features = shape
    num_blocks = num_rows * in_features // elements
    blocks = torch.randint(0, 256, (num_blocks, block_bytes), dtype=torch.uint8, generator=generator, device=device)
    if type_name in K_MIN_STEP:
        _k_quant(blocks, type_name, generator)
    elif type_name == "Q6_K":
        _q6_k(blocks, generator)
    else:  # Q5_0 (q in [0, 32) minus 16) and Q8_0 (int8): d first
        num_values = 32 if type_name == "Q5_0" else 256
        blocks[:, 0:2] = _f16_bytes(_block_scales(num_blocks, DUMMY_INIT_STD / _uniform_rms(num_values),
                                                  generator, device))
    return blocks.reshape(num_rows, -1)
