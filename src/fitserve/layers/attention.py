"""Paged attention layer: stores this step's K/V into the bound cache, then attends over it."""

from __future__ import annotations

import functools

import torch
from torch import nn

from fitserve.forward_batch import ForwardBatch
from fitserve.kernels import reference
from fitserve.kernels.dispatch import triton_attention


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        # [num_blocks, block_size, Hkv, D] each; set by bind_kv_cache, owned by the runner
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

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
            triton_attention.store_kv(k, v, self.k_cache, self.v_cache, batch.slot_mapping)
            out = self._triton_attention(q, batch)
        else:
            reference.store_kv(k, v, self.k_cache, self.v_cache, batch.slot_mapping)
            out = reference.paged_attention(q, self.k_cache, self.v_cache, batch, self.scale)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)

    def _triton_attention(self, q: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        out = torch.empty_like(q)
        if batch.max_query_len == 1:
            num_splits = triton_attention.decode_num_splits(batch.num_seqs, self.num_kv_heads, _num_sms(q.device))
            if num_splits > 1:
                return triton_attention.paged_decode_attention(
                    q, self.k_cache, self.v_cache, out, batch.query_start_loc, batch.seq_lens,
                    batch.block_tables, self.scale, num_splits,
                )
        return triton_attention.paged_attention(
            q, self.k_cache, self.v_cache, out, batch.query_start_loc, batch.seq_lens,
            batch.block_tables, batch.max_query_len, self.scale,
        )


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count
