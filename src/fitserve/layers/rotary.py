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


def partial_rotary_order(head_dim: int, rotary_dim: int) -> list[int]:
    """A head's dims reordered for a partial rotary (transformers rotates dims [0, R) as the pairs
    (i, i + R/2) and passes [R, D) through): entry j is the checkpoint dim that goes to dim j, so that
    each rotated pair lands on (j, j + D/2), the pairing of the tables and kernels, with the pass-through
    dims on the rows whose table says cos 1, sin 0. q and k reordered alike keep every q.k."""
    half, rotary_half, pass_half = head_dim // 2, rotary_dim // 2, (head_dim - rotary_dim) // 2
    first = [*range(rotary_half), *range(rotary_dim, rotary_dim + pass_half)]
    second = [*range(rotary_half, rotary_dim), *range(rotary_dim + pass_half, head_dim)]
    assert len(first) == len(second) == half
    return first + second


class RotaryEmbedding(nn.Module):
    """Applies rope to q [T, H*D] and k [T, Hkv*D] at positions [T]; cos/sin cached per position.

    With `rotary_dim` R below head_dim D the table rotates its first R/2 frequencies (of base^(2i/R), as
    transformers) and leaves the other D/2 - R/2 columns at cos 1, sin 0: q and k must come in
    partial_rotary_order's layout (models/phi3.py reorders its q and k rows at load)."""

    def __init__(self, head_dim: int, rope_theta: float, max_positions: int,
                 scaling: Scaling, device: torch.device, rotary_dim: int | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        inv_freq = rope_inv_freq(rotary_dim, rope_theta, scaling).to(device)  # [R/2] float32
        positions = torch.arange(max_positions, device=device, dtype=torch.float32)
        angles = torch.outer(positions, inv_freq)  # [P, R/2] float32, radians
        # LongRoPE's attention factor scales cos and sin (so q.k by its square), as transformers does
        magnitude = scaling.attention_factor if isinstance(scaling, LongRopeScaling) else 1.0
        pass_through = torch.zeros(max_positions, (head_dim - rotary_dim) // 2, device=device)  # [P, (D-R)/2]
        cos = torch.cat([angles.cos() * magnitude, pass_through + 1.0], dim=-1)  # [P, D/2]
        sin = torch.cat([angles.sin() * magnitude, pass_through], dim=-1)
        # [P, D] float32 each; duplicated halves match rotate_half's layout
        self.register_buffer("cos", torch.cat([cos, cos], dim=-1), persistent=False)
        self.register_buffer("sin", torch.cat([sin, sin], dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, H*D], k [T, Hkv*D] -> rotated; on CUDA in place (q and k may be views of one qkv tensor)."""
        if q.is_cuda and triton_fused is not None:
            triton_fused.rotary_(q, k, positions, self.cos, self.sin, self.head_dim)
            return q, k
        return reference.rotary(q, k, positions, self.cos, self.sin, self.head_dim)
