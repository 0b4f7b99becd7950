"""Llama-architecture causal LM (Llama 2/3, Mistral without sliding window, SmolLM2) over a flat token batch."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fitserve.config import ArchConfig
from fitserve.layers.activation import silu_and_mul, silu_and_mul_for_fp8
from fitserve.layers.attention import PagedAttention
from fitserve.forward_batch import ForwardBatch
from fitserve.layers.linear import Embedding, Linear
from fitserve.layers.norm import RMSNorm
from fitserve.layers.quantization import Fp8Linear, QuantizedRows, make_linear

FUSED_QUANT_SCHEME = "fp8"  # per-token activation scales: norms and SiLU-and-multiply quantize in their kernels
from fitserve.layers.rotary import RotaryEmbedding

# HF checkpoint projection name -> (our merged module, shard index)
_MERGED_SHARDS = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


class LlamaAttention(nn.Module):
    def __init__(self, arch: ArchConfig, rotary: RotaryEmbedding, dtype: torch.dtype, device: torch.device,
                 quantization: str | None = None) -> None:
        super().__init__()
        d = arch.head_dim
        self.qkv_sizes = (arch.num_attention_heads * d, arch.num_key_value_heads * d, arch.num_key_value_heads * d)
        self.qkv_proj = make_linear(arch.hidden_size, self.qkv_sizes, dtype, device, quantization)
        self.o_proj = make_linear(arch.num_attention_heads * d, arch.hidden_size, dtype, device, quantization)
        self.rotary = rotary  # shared by all layers; holds only derived, non-persistent buffers
        self.attn = PagedAttention(arch.num_attention_heads, arch.num_key_value_heads, d, scale=d ** -0.5)

    def forward(self, hidden: torch.Tensor | QuantizedRows, batch: ForwardBatch) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split(self.qkv_sizes, dim=-1)
        q, k = self.rotary(batch.positions, q, k)
        return self.o_proj(self.attn(q, k, v, batch))


class LlamaMLP(nn.Module):
    def __init__(self, arch: ArchConfig, dtype: torch.dtype, device: torch.device,
                 quantization: str | None = None) -> None:
        super().__init__()
        self.gate_up_proj = make_linear(arch.hidden_size, (arch.intermediate_size,) * 2, dtype, device, quantization)
        self.down_proj = make_linear(arch.intermediate_size, arch.hidden_size, dtype, device, quantization)
        self.fp8_input = quantization == FUSED_QUANT_SCHEME  # down_proj takes per-token fp8 rows

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        return self.down_proj(silu_and_mul_for_fp8(gate_up) if self.fp8_input else silu_and_mul(gate_up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig, rotary: RotaryEmbedding, dtype: torch.dtype, device: torch.device,
                 quantization: str | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, device)
        self.self_attn = LlamaAttention(arch, rotary, dtype, device, quantization)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, device)
        self.mlp = LlamaMLP(arch, dtype, device, quantization)
        # qkv_proj and gate_up_proj take per-token fp8 rows: the norms quantize what they write
        self.fp8_input = quantization == FUSED_QUANT_SCHEME

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None,
                batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [T, H] (this layer's input delta), residual [T, H] or None for layer 0."""
        normed, residual = self.input_layernorm(hidden, residual, quantize=self.fp8_input)
        hidden = self.self_attn(normed, batch)
        normed, residual = self.post_attention_layernorm(hidden, residual, quantize=self.fp8_input)
        return self.mlp(normed), residual


class LlamaForCausalLM(nn.Module):
    """forward(batch) -> final hidden states [T, H]; compute_logits(hidden [N, H]) -> [N, vocab] float32.

    `quantization` ("fp8", "fp8_per_tensor" or None) applies to the four linear layers of each
    block; embeddings, norms and lm_head stay in `dtype`.
    """

    def __init__(self, arch: ArchConfig, dtype: torch.dtype, device: torch.device,
                 quantization: str | None = None) -> None:
        super().__init__()
        self.arch, self.dtype, self.device = arch, dtype, torch.device(device)
        self.quantization = quantization
        max_positions = max(arch.max_position_embeddings, 1)
        rotary = RotaryEmbedding(arch.head_dim, arch.rope_theta, max_positions, arch.rope_scaling, self.device)
        self.embed_tokens = Embedding(arch.vocab_size, arch.hidden_size, dtype, self.device)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(arch, rotary, dtype, self.device, quantization) for _ in range(arch.num_hidden_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, self.device)
        self.lm_head = None if arch.tie_word_embeddings else Linear(arch.hidden_size, arch.vocab_size, dtype, self.device)

    def bind_kv_cache(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Per layer (K, V), each [num_blocks, block_size, num_kv_heads, head_dim] (the serving dtype or
        float8_e4m3fn); owned by the runner."""
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"need {len(self.layers)} (K, V) pairs, got {len(kv_caches)}")
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            layer.self_attn.attn.bind(k_cache, v_cache)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        hidden = self.embed_tokens(batch.input_ids)  # [T, H]
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, batch)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> logits [N, vocab] float32."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return torch.nn.functional.linear(hidden, weight).float()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors into our (partly merged) parameters; returns the HF names loaded."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            name = hf_name.removeprefix("model.")
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied checkpoints may still carry a copy of the embedding
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in _MERGED_SHARDS:
                merged, shard = _MERGED_SHARDS[parts[-2]]
                module = self.get_submodule(".".join(parts[:-2] + [merged]))
                module.load_shard(shard, tensor)
            elif isinstance(module := self._module_of(name), (Linear, Fp8Linear)):
                module.load_shard(0, tensor)  # o_proj, down_proj, lm_head (an fp8 layer quantizes here)
            elif name in params:
                if params[name].shape != tensor.shape:
                    raise ValueError(f"{hf_name}: expected {tuple(params[name].shape)}, got {tuple(tensor.shape)}")
                params[name].copy_(tensor)
            elif "rotary_emb" in name or name == "rope_freqs.weight":
                continue  # derived from the config
            else:
                raise ValueError(f"unexpected checkpoint tensor {hf_name!r}")
            loaded.add(hf_name)
        return loaded

    def _module_of(self, param_name: str) -> nn.Module | None:
        owner, _, leaf = param_name.rpartition(".")
        if leaf != "weight" or not owner:
            return None
        try:
            return self.get_submodule(owner)
        except AttributeError:
            return None

    def expected_weight_names(self) -> set[str]:
        """HF names a complete checkpoint provides (for a missing-tensor check)."""
        names = {"model.embed_tokens.weight", "model.norm.weight"}
        if self.lm_head is not None:
            names.add("lm_head.weight")
        per_layer = ["input_layernorm", "post_attention_layernorm"]
        projs = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
        for i in range(len(self.layers)):
            names.update(f"model.layers.{i}.{n}.weight" for n in per_layer + projs)
        return names
