"""Rotary position embedding (the half-split "rotate_half" layout of HF Llama), with Llama 3, linear or
LongRoPE scaling.

The cos/sin table built here is the only place the frequencies are computed: the CPU path
(kernels/reference.rotary) and the CUDA kernels (triton_fused.rotary_, triton_attention.rotary_store_kv)
all read `RotaryEmbedding.cos` / `.sin`. LongRoPE (longrope.py) divides each inverse frequency by the
factor list the served context picks and multiplies both tables by its attention factor.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fitserve.arch_config import LinearRopeScaling, RopeScaling
from fitserve.kernels import reference
from fitserve.kernels.dispatch import triton_fused
from fitserve.longrope import LongRopeScaling


Scaling = RopeScaling | LinearRopeScaling | LongRopeScaling | None


def rope_inv_freq(head_dim: int, rope_theta: float, scaling: Scaling) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies, radians per position."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    if isinstance(scaling, LongRopeScaling):  # transformers' order: 1 / (ext * base^e)
        ext_factors = torch.tensor(scaling.ext_factors, dtype=torch.float32)
        return 1.0 / (ext_factors * rope_theta ** exponents)
    inv_freq = 1.0 / (rope_theta ** exponents)
    if scaling is None:
        return inv_freq
    if isinstance(scaling, LinearRopeScaling):  # positions divided by the factor (transformers' "linear")
        return inv_freq / scaling.factor
    return _llama3_scale(inv_freq, scaling)


def _llama3_scale(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3: long wavelengths divided by `factor`, short ones kept, a smooth blend between."""
    old_context_tokens = s.original_max_position_embeddings
    low_freq_wavelen_tokens = old_context_tokens / s.low_freq_factor
    high_freq_wavelen_tokens = old_context_tokens / s.high_freq_factor
    wavelen_tokens = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen_tokens > low_freq_wavelen_tokens, inv_freq / s.factor, inv_freq)
    smooth = (old_context_tokens / wavelen_tokens - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen_tokens >= high_freq_wavelen_tokens) & (wavelen_tokens <= low_freq_wavelen_tokens)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Applies rope to q [T, H*D] and k [T, Hkv*D] at positions [T]; cos/sin cached per position."""

    def __init__(self, head_dim: int, rope_theta: float, max_positions: int,
                 scaling: Scaling, device: torch.device) -> None:
        super().__init__()
        self.head_dim = head_dim
        inv_freq = rope_inv_freq(head_dim, rope_theta, scaling).to(device)  # [D/2] float32
        positions = torch.arange(max_positions, device=device, dtype=torch.float32)
        angles = torch.outer(positions, inv_freq)  # [P, D/2] float32, radians
        angles = torch.cat([angles, angles], dim=-1)  # [P, D]; duplicated halves match rotate_half's layout
        # LongRoPE's attention factor scales cos and sin (so q.k by its square), as transformers does
        magnitude = scaling.attention_factor if isinstance(scaling, LongRopeScaling) else 1.0
        # [P, D] float32 each
        self.register_buffer("cos", angles.cos() * magnitude, persistent=False)
        self.register_buffer("sin", angles.sin() * magnitude, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, H*D], k [T, Hkv*D] -> rotated; on CUDA in place (q and k may be views of one qkv tensor)."""
        if q.is_cuda and triton_fused is not None:
            triton_fused.rotary_(q, k, positions, self.cos, self.sin, self.head_dim)
            return q, k
        return reference.rotary(q, k, positions, self.cos, self.sin, self.head_dim)
