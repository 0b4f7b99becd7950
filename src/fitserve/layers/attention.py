"""Paged attention layer: stores this step's K/V into the bound cache, then attends over it.

The cache is in the serving dtype or, with `--kv-cache-dtype fp8`, float8_e4m3fn: then K and
V are stored as k / k_scale and v / v_scale and read back times the scale. The scales are per
layer and fixed at 1.0 (vLLM's choice without calibration data): Llama's K and V stay far
inside e4m3's +-448, and e4m3's relative precision (3 mantissa bits) is the same at any
magnitude from 2^-6 up, so a scale would only matter for values outside that range.
`fitserve check-quant --kv-cache-dtype fp8` measures what this costs (docs/quantization.md).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from fitserve.forward_batch import ForwardBatch
from fitserve.kernels import reference
from fitserve.kernels.dispatch import triton_attention

DEFAULT_KV_SCALE = 1.0  # per layer, for K and for V; see the module docstring


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        # [num_blocks, block_size, Hkv, D] each; set by bind_kv_cache, owned by the runner
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        # float32 scales of an fp8 cache (cache value * scale = K or V); unused by other dtypes
        self.k_scale = DEFAULT_KV_SCALE
        self.v_scale = DEFAULT_KV_SCALE

    def bind(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        expected = (self.num_kv_heads, self.head_dim)
        if tuple(k_cache.shape[2:]) != expected or k_cache.shape != v_cache.shape:
            raise ValueError(f"KV cache must be [blocks, block_size, {expected[0]}, {expected[1]}], got {tuple(k_cache.shape)}")
        self.k_cache, self.v_cache = k_cache, v_cache

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """q [T, H*D], k/v [T, Hkv*D] -> [T, H*D]."""
        if self.k_cache is None or self.v_cache is None:
            raise RuntimeError("bind_kv_cache() must be called before forward()")
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if q.is_cuda and triton_attention is not None:
            triton_attention.store_kv(k, v, self.k_cache, self.v_cache, batch.slot_mapping, self.k_scale, self.v_scale)
            out = self._triton_attention(q, batch)
        else:
            reference.store_kv(k, v, self.k_cache, self.v_cache, batch.slot_mapping, self.k_scale, self.v_scale)
            out = reference.paged_attention(q, self.k_cache, self.v_cache, batch, self.scale,
                                            self.k_scale, self.v_scale)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)

    def _triton_attention(self, q: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        out = torch.empty_like(q)
        if batch.max_query_len == 1:
            num_splits = triton_attention.decode_num_splits(batch.num_seqs, self.num_kv_heads, _num_sms(q.device))
            if num_splits > 1:
                return triton_attention.paged_decode_attention(
                    q, self.k_cache, self.v_cache, out, batch.query_start_loc, batch.seq_lens,
                    batch.block_tables, self.scale, num_splits, self.k_scale, self.v_scale,
                )
        return triton_attention.paged_attention(
            q, self.k_cache, self.v_cache, out, batch.query_start_loc, batch.seq_lens,
            batch.block_tables, batch.max_query_len, self.scale, self.k_scale, self.v_scale,
        )


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count
