"""Gemma 2 (`Gemma2ForCausalLM`), and the blocks Gemma 3 shares (models/gemma3.py).

What differs from Llama (transformers' modeling_gemma2.py):
- the token embedding is scaled by sqrt(hidden_size), rounded to the model dtype first as transformers does;
- every RMSNorm scales by (1 + weight) in float32 (layers/norm.py GemmaRMSNorm; checkpoints hold weight
  centred on 0);
- four norms per layer: the attention output and the MLP output are normed (post_attention_layernorm,
  post_feedforward_layernorm) before they join the residual stream, and the MLP input has its own
  pre_feedforward_layernorm;
- the MLP is gated GELU (tanh approximation, `hidden_activation: gelu_pytorch_tanh`);
- the attention scale is query_pre_attn_scalar ** -0.5; scores are soft-capped at attn_logit_softcapping
  and the final logits at final_logit_softcapping (cap * tanh(x / cap));
- the "sliding_attention" layers (every other one, from layer 0) attend over the last sliding_window
  positions only; the others over the whole context. The KV cache still holds every layer's whole
  context (docs/models.md);
- the embeddings are tied.
Gemma 3 adds q/k norms and its local layers' own rope base (ArchConfig.qk_norm, rope_local_theta),
which the classes here build when the config asks for them.
"""

from __future__ import annotations

import torch
from torch import nn

from fitserve.arch_config import ArchConfig
from fitserve.forward_batch import ForwardBatch
from fitserve.layers.activation import gelu_tanh_and_mul, gelu_tanh_and_mul_for_fp8
from fitserve.layers.attention import PagedAttention
from fitserve.layers.formats.unquantized import Linear
from fitserve.layers.linear import Embedding
from fitserve.layers.norm import GemmaHeadRMSNorm, GemmaRMSNorm, norm_q_and_k
from fitserve.layers.parallel import SINGLE, TensorParallel
from fitserve.layers.rotary import RotaryEmbedding
from fitserve.layers.weight_format import QuantizedRows
from fitserve.models.base import LayerBuild
from fitserve.models.llama import LlamaForCausalLM, hf_tensor_shapes

_LAYER_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm")


def gemma_tensor_shapes(arch: ArchConfig) -> dict[str, tuple[int, ...]]:
    """Llama's tensors plus the pre- and post-feedforward norms of each layer and, with qk_norm (Gemma 3),
    self_attn.q_norm / k_norm [head_dim]."""
    shapes = hf_tensor_shapes(arch)
    for i in range(arch.num_hidden_layers):
        shapes.update({f"model.layers.{i}.{norm}.weight": (arch.hidden_size,) for norm in _LAYER_NORMS})
        if arch.qk_norm:
            shapes.update({f"model.layers.{i}.self_attn.{n}.weight": (arch.head_dim,) for n in ("q_norm", "k_norm")})
    return shapes


class GemmaAttention(nn.Module):
    """One layer's attention: its own window (None for a global layer) and rotary table; q/k norms when
    arch.qk_norm. `arch` is one rank's shard; o_proj's partial sums are all-reduced."""

    def __init__(self, arch: ArchConfig, rotary: RotaryEmbedding, build: LayerBuild, window: int | None) -> None:
        super().__init__()
        self.tp = build.tp
        d = arch.head_dim
        self.qkv_sizes = (arch.num_attention_heads * d, arch.num_key_value_heads * d, arch.num_key_value_heads * d)
        self.qkv_proj = build.linear(arch.hidden_size, self.qkv_sizes)
        self.o_proj = build.linear(arch.num_attention_heads * d, arch.hidden_size)
        self.q_norm = GemmaHeadRMSNorm(d, arch.rms_norm_eps, build.dtype, build.device) if arch.qk_norm else None
        self.k_norm = GemmaHeadRMSNorm(d, arch.rms_norm_eps, build.dtype, build.device) if arch.qk_norm else None
        scalar = arch.query_pre_attn_scalar if arch.query_pre_attn_scalar is not None else d
        self.attn = PagedAttention(arch.num_attention_heads, arch.num_key_value_heads, d, scale=scalar ** -0.5,
                                   rotary=rotary, fuse_rotary_store=build.fuse_rotary_store,
                                   sliding_window=window, softcap=arch.attn_logit_softcap)

    def forward(self, hidden: torch.Tensor | QuantizedRows, batch: ForwardBatch) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split(self.qkv_sizes, dim=-1)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = norm_q_and_k(q, k, self.q_norm, self.k_norm)  # before rotary, which PagedAttention applies
        return self.tp.all_reduce(self.o_proj(self.attn(q, k, v, batch)))


class GemmaMLP(nn.Module):
    def __init__(self, arch: ArchConfig, build: LayerBuild) -> None:
        super().__init__()
        self.tp = build.tp
        self.gate_up_proj = build.linear(arch.hidden_size, (arch.intermediate_size,) * 2)
        self.down_proj = build.linear(arch.intermediate_size, arch.hidden_size)
        self.fp8_input = build.weight_format.fused_input_quantization  # down_proj takes per-token fp8 rows

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        return self.tp.all_reduce(
            self.down_proj(gelu_tanh_and_mul_for_fp8(gate_up) if self.fp8_input else gelu_tanh_and_mul(gate_up)))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig, rotary: RotaryEmbedding, build: LayerBuild, window: int | None) -> None:
        super().__init__()
        norm = lambda: GemmaRMSNorm(arch.hidden_size, arch.rms_norm_eps, build.dtype, build.device)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()
        self.self_attn = GemmaAttention(arch, rotary, build, window)
        self.mlp = GemmaMLP(arch, build)
        # qkv_proj and gate_up_proj take per-token fp8 rows: the norms before them quantize what they write
        self.fp8_input = build.weight_format.fused_input_quantization

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch,
                hidden_norm: GemmaRMSNorm | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [T, H]: the previous layer's MLP output, to be normed by hidden_norm (that layer's
        post_feedforward_layernorm) and added to residual [T, H]; for layer 0 the embedding, residual
        and hidden_norm None. Returns this layer's pair: its MLP output not yet normed by its own
        post_feedforward_layernorm (the next layer's, or the final, norm applies it: one kernel on CUDA
        for post norm, residual add and the next norm), and the residual."""
        normed, residual = self.input_layernorm.after(hidden_norm, hidden, residual, quantize=self.fp8_input)
        # residual += post_attention_layernorm(attention), then the pre-feedforward norm: one kernel on CUDA
        normed, residual = self.pre_feedforward_layernorm.after(
            self.post_attention_layernorm, self.self_attn(normed, batch), residual, quantize=self.fp8_input)
        return self.mlp(normed), residual


class Gemma2ForCausalLM(LlamaForCausalLM):
    """Gemma 2 (and, with the config's q/k norms and local rope base, Gemma 3's text model) over a flat
    token batch (models/base.py CausalLM). Loading, tensor-parallel slicing and the KV cache binding
    are Llama's: the projections and norms carry Llama's names plus the extra norms."""

    def __init__(self, arch: ArchConfig, dtype: torch.dtype, device: torch.device, *,
                 quantization: str | None = None, tp: TensorParallel = SINGLE, fuse_rotary_store: bool = True) -> None:
        nn.Module.__init__(self)  # Llama's blocks are not built: only its loading methods are shared
        self.full_arch, self.tp = arch, tp
        arch = arch.shard(tp.size)
        self.arch, self.dtype, self.device = arch, dtype, torch.device(device)
        self.quantization = quantization
        build = LayerBuild.for_model(dtype, self.device, quantization, tp, fuse_rotary_store)
        max_positions = max(arch.max_position_embeddings, 1)
        rotary = RotaryEmbedding(arch.head_dim, arch.rope_theta, max_positions, arch.rope_scaling, self.device)
        local_rotary = rotary if arch.rope_local_theta is None else RotaryEmbedding(
            arch.head_dim, arch.rope_local_theta, max_positions, None, self.device)  # no scaling on local layers
        windows = [arch.layer_window(i) for i in range(arch.num_hidden_layers)]
        self.embed_tokens = Embedding(arch.vocab_size, arch.hidden_size, dtype, self.device)
        # sqrt(hidden_size) in the model dtype, as transformers multiplies (bf16: sqrt(3072) = 55.5, not 55.43)
        self.register_buffer("embed_scale", torch.tensor(arch.hidden_size ** 0.5, dtype=dtype, device=self.device),
                             persistent=False)
        self.layers = nn.ModuleList(GemmaDecoderLayer(arch, rotary if window is None else local_rotary, build, window)
                                    for window in windows)
        self.norm = GemmaRMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, self.device)
        self.lm_head = (None if arch.tie_word_embeddings
                        else Linear(arch.hidden_size, arch.vocab_size, dtype, self.device))

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """As Llama's, with each layer's post-feedforward norm applied by the norm after it
        (GemmaDecoderLayer.forward)."""
        hidden, residual, hidden_norm = self.embed(batch.input_ids), None, None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, batch, hidden_norm)
            hidden_norm = layer.post_feedforward_layernorm
        hidden, _ = self.norm.after(hidden_norm, hidden, residual)
        return hidden

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids) * self.embed_scale

    def checkpoint_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return gemma_tensor_shapes(self.full_arch)

    def expected_weight_names(self) -> set[str]:
        return set(gemma_tensor_shapes(self.full_arch))
