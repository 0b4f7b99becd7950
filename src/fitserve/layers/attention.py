"""Paged attention layer: rotates this step's q and k (when given the model's rotary embedding),
stores K/V into the bound cache, then attends over it. On CUDA the rotation and the store are
one kernel (triton_attention.rotary_store_kv); a small decode batch's attention is split over
the context (kernels/triton_decode.py).

The cache is in the serving dtype or, with `--kv-cache-dtype fp8`, float8_e4m3fn: then K and
V are stored as k / k_scale and v / v_scale and read back times the scale. The scales are per
layer: an fp8 checkpoint's calibrated ones (set_kv_scale), else 1.0 (vLLM's choice without
calibration data): Llama's K and V stay far
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
from fitserve.kernels.dispatch import triton_attention, triton_decode
from fitserve.layers.rotary import RotaryEmbedding

DEFAULT_KV_SCALE = 1.0  # per layer, for K and for V; see the module docstring


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 rotary: RotaryEmbedding | None = None, fuse_rotary_store: bool = True,
                 sliding_window: int | None = None, softcap: float | None = None) -> None:
        super().__init__()
        assert rotary is None or rotary.head_dim == head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        # a query sees only the last `sliding_window` positions (Mistral, Gemma's local layers); scores
        # soft-capped as softcap * tanh(score / softcap) (Gemma 2); kernels.reference.paged_attention
        self.sliding_window = sliding_window
        self.softcap = softcap
        self.rotary = rotary  # applied to q and k at batch.positions before the store; shared by all layers
        # CUDA: the rotary embedding and the KV store in one kernel, else rotary_ then store_kv. Off only
        # to measure the fusion (benchmarks/fusion_bench.py); read at every forward, so a CUDA graph
        # keeps the choice it was captured with.
        self.fuse_rotary_store = fuse_rotary_store
        # [num_blocks, block_size, Hkv, D] each; set by bind_kv_cache, owned by the runner
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        # The KV cache group whose slots and block table this layer reads (kv_groups.py; 0 but in
        # models mixing windowed and full layers); set by bind
        self.kv_group = 0
        # float32 scales of an fp8 cache (cache value * scale = K or V); unused by other dtypes
        self.k_scale = DEFAULT_KV_SCALE
        self.v_scale = DEFAULT_KV_SCALE

    def set_kv_scale(self, which: str, scale: float) -> None:
        """An fp8 checkpoint's calibrated scale for this layer's K ("k") or V ("v") cache."""
        if not (scale > 0 and scale < float("inf")):
            raise ValueError(f"{which}_scale must be finite and positive, got {scale}")
        if which == "k":
            self.k_scale = scale
        else:
            self.v_scale = scale

    def bind(self, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_group: int = 0) -> None:
        expected = (self.num_kv_heads, self.head_dim)
        if tuple(k_cache.shape[2:]) != expected or k_cache.shape != v_cache.shape:
            raise ValueError(f"KV cache must be [blocks, block_size, {expected[0]}, {expected[1]}], got {tuple(k_cache.shape)}")
        self.k_cache, self.v_cache = k_cache, v_cache
        self.kv_group = kv_group

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """q [T, H*D], k/v [T, Hkv*D] (q and k not yet rotated; views of one qkv tensor allowed) -> [T, H*D].

        On CUDA q and k may be overwritten (rotated in place)."""
        if self.k_cache is None or self.v_cache is None:
            raise RuntimeError("bind_kv_cache() must be called before forward()")
        if self.kv_group:
            batch = batch.for_kv_group(self.kv_group)  # this group's slot mapping and block tables
        num_tokens = q.shape[0]
        kv_shape = (num_tokens, self.num_kv_heads, self.head_dim)
        if q.is_cuda and triton_attention is not None:
            q = self._triton_rotary_store(q, k, v, batch)
            out = self._triton_attention(q.view(num_tokens, self.num_heads, self.head_dim), batch)
        else:
            if self.rotary is not None:
                q, k = self.rotary(batch.positions, q, k)
            reference.store_kv(k.view(kv_shape), v.view(kv_shape), self.k_cache, self.v_cache, batch.slot_mapping,
                               self.k_scale, self.v_scale)
            out = reference.paged_attention(q.view(num_tokens, self.num_heads, self.head_dim), self.k_cache,
                                            self.v_cache, batch, self.scale, self.k_scale, self.v_scale,
                                            self.sliding_window, self.softcap)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)

    def _triton_rotary_store(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """k (rotated) and v stored at batch.slot_mapping, by one kernel or two; returns q rotated (in place)."""
        if self.rotary is not None and self.fuse_rotary_store:
            triton_attention.rotary_store_kv(q, k, v, self.k_cache, self.v_cache, batch.slot_mapping, batch.positions,
                                             self.rotary.cos, self.rotary.sin, self.k_scale, self.v_scale)
            return q
        if self.rotary is not None:
            q, k = self.rotary(batch.positions, q, k)  # in place on CUDA
        kv_shape = (q.shape[0], self.num_kv_heads, self.head_dim)
        triton_attention.store_kv(k.view(kv_shape), v.view(kv_shape), self.k_cache, self.v_cache, batch.slot_mapping,
                                  self.k_scale, self.v_scale)
        return q

    def _triton_attention(self, q: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        out = torch.empty_like(q)
        if batch.max_query_len == 1:
            num_splits = triton_decode.decode_num_splits(batch.num_seqs, self.num_kv_heads, _num_sms(q.device))
            if num_splits > 1:
                return triton_decode.paged_decode_attention(
                    q, self.k_cache, self.v_cache, out, batch.query_start_loc, batch.seq_lens,
                    batch.block_tables, self.scale, num_splits, self.k_scale, self.v_scale,
                    self.sliding_window, self.softcap,
                )
        return triton_attention.paged_attention(
            q, self.k_cache, self.v_cache, out, batch.query_start_loc, batch.seq_lens,
            batch.block_tables, batch.max_query_len, self.scale, self.k_scale, self.v_scale,
            self.sliding_window, self.softcap,
        )


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count
