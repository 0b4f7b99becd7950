"""Llama-architecture causal LM (Llama 2/3, Mistral without sliding window, SmolLM2) over a flat token batch."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fitserve.arch_config import ArchConfig
from fitserve.forward_batch import ForwardBatch
from fitserve.kernels import fp8
from fitserve.layers.activation import silu_and_mul, silu_and_mul_for_fp8
from fitserve.layers.attention import PagedAttention
from fitserve.kernels.reference import soft_cap
from fitserve.layers.formats.unquantized import Linear
from fitserve.layers.linear import Embedding, linear
from fitserve.layers.norm import RMSNorm
from fitserve.layers.parallel import SINGLE, TensorParallel, TensorShard
from fitserve.layers.rotary import RotaryEmbedding
from fitserve.layers.weight_format import (
    CHECKPOINT_PIECES,
    INT_CHECKPOINT_PIECES,
    WEIGHT,
    WEIGHT_SCALE,
    LinearLayer,
    QuantizedRows,
    WeightFormat,
)
from fitserve.models.base import LayerBuild

# HF checkpoint projection name -> (our merged module, shard index)
_MERGED_SHARDS = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}
# An fp8 checkpoint's KV-cache scales per layer, by the last part of the name (self_attn.k_scale /
# v_scale, or the older k_proj.output_scale / v_proj.output_scale); a linear layer's own scales
# (weight_scale, input_scale: weight_format.CHECKPOINT_PIECES) go to the layer like its weight.
_KV_SCALES = ("k_scale", "v_scale", "output_scale")
# HF projection -> the dimension tensor parallelism splits (layers/parallel.py): 0 = output rows
# (column-parallel), 1 = input columns (row-parallel, followed by an all-reduce)
_SPLIT_DIMS = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "gate_proj": 0, "up_proj": 0, "o_proj": 1, "down_proj": 1}


def layer_projection_shapes(arch: ArchConfig) -> dict[str, tuple[int, int]]:
    """HF projection name -> its full [out, in] shape in one block."""
    d, hidden, inter = arch.head_dim, arch.hidden_size, arch.intermediate_size
    q_rows, kv_rows = arch.num_attention_heads * d, arch.num_key_value_heads * d
    return {"self_attn.q_proj": (q_rows, hidden), "self_attn.k_proj": (kv_rows, hidden),
            "self_attn.v_proj": (kv_rows, hidden), "self_attn.o_proj": (hidden, q_rows),
            "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}


def hf_tensor_shapes(arch: ArchConfig) -> dict[str, tuple[int, ...]]:
    """Every HF-named tensor of a complete checkpoint and its full (unsplit) shape."""
    hidden = arch.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (arch.vocab_size, hidden),
                                          "model.norm.weight": (hidden,)}
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, hidden)
    per_layer = {"input_layernorm": (hidden,), "post_attention_layernorm": (hidden,), **layer_projection_shapes(arch)}
    for i in range(arch.num_hidden_layers):
        shapes.update({f"model.layers.{i}.{name}.weight": shape for name, shape in per_layer.items()})
    return shapes


def tensor_shard(hf_name: str, arch: ArchConfig, tp: TensorParallel) -> TensorShard | None:
    """This rank's slice of a checkpoint tensor (arch: the full model); None when every rank
    holds all of it. Heads stay whole: a slice of q rows is H/N heads of head_dim rows each."""
    parts = hf_name.split(".")
    if tp.size == 1 or len(parts) < 3 or parts[-2] not in _SPLIT_DIMS or parts[-1] != "weight":
        return None  # scales are read whole (load_weights slices per-channel ones)
    dim = _SPLIT_DIMS[parts[-2]]
    length = layer_projection_shapes(arch)[".".join(parts[-3:-1])][dim] // tp.size
    return TensorShard(dim, tp.rank * length, length)


def _load_piece(module: LinearLayer, shard_index: int, piece: str, tensor: torch.Tensor, hf_name: str) -> None:
    try:
        module.load(shard_index, piece, tensor)
    except ValueError as exc:
        raise ValueError(f"{hf_name}: {exc}") from None


class LlamaAttention(nn.Module):
    """`arch` is one rank's shard (ArchConfig.shard): its heads only; o_proj's partial sums are all-reduced."""

    def __init__(self, arch: ArchConfig, rotary: RotaryEmbedding, build: LayerBuild) -> None:
        super().__init__()
        self.tp = build.tp
        d = arch.head_dim
        self.qkv_sizes = (arch.num_attention_heads * d, arch.num_key_value_heads * d, arch.num_key_value_heads * d)
        self.qkv_proj = build.linear(arch.hidden_size, self.qkv_sizes)
        self.o_proj = build.linear(arch.num_attention_heads * d, arch.hidden_size)
        # rotary: shared by all layers, only derived non-persistent buffers; the attention layer applies it
        # (on CUDA in its KV-store kernel)
        self.attn = PagedAttention(arch.num_attention_heads, arch.num_key_value_heads, d, scale=d ** -0.5,
                                   rotary=rotary, fuse_rotary_store=build.fuse_rotary_store)

    def forward(self, hidden: torch.Tensor | QuantizedRows, batch: ForwardBatch) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split(self.qkv_sizes, dim=-1)
        return self.tp.all_reduce(self.o_proj(self.attn(q, k, v, batch)))


class LlamaMLP(nn.Module):
    """`arch` is one rank's shard: intermediate_size of its columns; down_proj's partial sums are all-reduced."""

    def __init__(self, arch: ArchConfig, build: LayerBuild) -> None:
        super().__init__()
        self.tp = build.tp
        self.gate_up_proj = build.linear(arch.hidden_size, (arch.intermediate_size,) * 2)
        self.down_proj = build.linear(arch.intermediate_size, arch.hidden_size)
        self.fp8_input = build.weight_format.fused_input_quantization  # down_proj takes per-token fp8 rows

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        return self.tp.all_reduce(
            self.down_proj(silu_and_mul_for_fp8(gate_up) if self.fp8_input else silu_and_mul(gate_up)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig, rotary: RotaryEmbedding, build: LayerBuild,
                 attention_class: type[LlamaAttention] = LlamaAttention, mlp: nn.Module | None = None,
                 layer: int = 0) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, build.dtype, build.device)
        self.self_attn = attention_class(arch, rotary, build)
        # this layer's sliding window (Mistral v0.1, Phi-3, Qwen2's windowed layers), None for full attention
        self.self_attn.attn.sliding_window = arch.layer_window(layer)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, build.dtype, build.device)
        self.mlp = LlamaMLP(arch, build) if mlp is None else mlp  # another MLP: layers/moe.py MoE
        # qkv_proj and gate_up_proj take per-token fp8 rows: the norms quantize what they write
        self.fp8_input = build.weight_format.fused_input_quantization
        self.fp8_mlp_input = self.fp8_input and isinstance(self.mlp, LlamaMLP)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None,
                batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [T, H] (this layer's input delta), residual [T, H] or None for layer 0."""
        normed, residual = self.input_layernorm(hidden, residual, quantize=self.fp8_input)
        hidden = self.self_attn(normed, batch)
        normed, residual = self.post_attention_layernorm(hidden, residual, quantize=self.fp8_mlp_input)
        return self.mlp(normed), residual


class LlamaForCausalLM(nn.Module):
    """forward(batch) -> final hidden states [T, H]; compute_logits(hidden [N, H]) -> [N, vocab] float32
    (models/base.py CausalLM).

    `quantization` (a weight format's name, layers/formats/registry.py: "fp8", "fp8_per_tensor" or
    None) applies to the four linear layers of each block; embeddings, norms and lm_head stay in
    `dtype`. With `tp` of size N the blocks hold this rank's 1/N (layers/parallel.py): `full_arch`
    is the model, `arch` this rank's shard. `fuse_rotary_store`: layers/attention.py.
    An fp8 layer's scales are computed on the rank's own slice (per output row of the slice, or
    one per slice), so a row-parallel fp8 layer is quantized a little finer than with N = 1.
    """

    # the blocks' attention: a subclass changes it alone (models/qwen2.py: q/k/v biases, qwen3.py: q/k norms)
    attention_class: type[LlamaAttention] = LlamaAttention

    def __init__(self, arch: ArchConfig, dtype: torch.dtype, device: torch.device, *,
                 quantization: str | WeightFormat | None = None, tp: TensorParallel = SINGLE,
                 fuse_rotary_store: bool = True) -> None:
        super().__init__()
        self.full_arch, self.tp = arch, tp
        arch = arch.shard(tp.size)  # ConfigError when N does not divide the heads or MLP columns
        self.arch, self.dtype, self.device = arch, dtype, torch.device(device)
        self.quantization = quantization
        build = LayerBuild.for_model(dtype, self.device, quantization, tp, fuse_rotary_store)
        max_positions = max(arch.max_position_embeddings, 1)
        rotary = RotaryEmbedding(arch.head_dim, arch.rope_theta, max_positions, arch.rope_scaling, self.device,
                                 rotary_dim=arch.rotary_dim)  # a partial rotary: Phi-3 only (models/phi3.py)
        self.embed_tokens = Embedding(arch.vocab_size, arch.hidden_size, dtype, self.device)
        self.layers = nn.ModuleList(LlamaDecoderLayer(arch, rotary, build, self.attention_class,
                                                      self.build_mlp(layer, arch, build), layer)
                                    for layer in range(arch.num_hidden_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, self.device)
        self.lm_head = None if arch.tie_word_embeddings else Linear(arch.hidden_size, arch.vocab_size, dtype, self.device)

    def build_mlp(self, layer_index: int, arch: ArchConfig, build: LayerBuild) -> nn.Module | None:
        """Layer `layer_index`'s MLP; None: LlamaMLP (models/mixtral.py builds experts)."""
        return None

    def bind_kv_cache(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                      kv_groups: list[int] | None = None) -> None:
        """Per layer (K, V), each [num_blocks, block_size, num_kv_heads, head_dim] (the serving dtype or
        float8_e4m3fn), and per layer the KV cache group whose block table it reads (None: all group 0;
        kv_groups.py); owned by the runner."""
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"need {len(self.layers)} (K, V) pairs, got {len(kv_caches)}")
        groups = kv_groups if kv_groups is not None else [0] * len(self.layers)
        for layer, (k_cache, v_cache), group in zip(self.layers, kv_caches, groups):
            layer.self_attn.attn.bind(k_cache, v_cache, group)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        hidden = self.embed(batch.input_ids)  # [T, H]
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, batch)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The token embeddings [T, H] the first block reads (Gemma scales them)."""
        return self.embed_tokens(input_ids)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> logits [N, vocab] float32, soft-capped in float32 when the config says so (Gemma 2)."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return soft_cap(linear(hidden, weight).float(), self.arch.final_logit_softcap)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors into our (partly merged) parameters; returns the HF names loaded.

        A split tensor may arrive whole (this rank takes its slice) or already sliced (a reader
        that reads only this rank's part, weights/loader.py). A projection's tensors (its weight,
        and an fp8 checkpoint's scales) go to its layer, whose weight format takes them."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            name = hf_name.removeprefix("model.")
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied checkpoints may still carry a copy of the embedding
            shard = tensor_shard(hf_name, self.full_arch, self.tp)
            if shard is not None and tensor.shape[shard.dim] != shard.length:
                tensor = tensor.narrow(shard.dim, shard.start, shard.length).contiguous()
            parts = name.split(".")
            if parts[-1] in _KV_SCALES:
                self._load_kv_scale(hf_name, parts, tensor)
            elif len(parts) >= 2 and parts[-2] in _SPLIT_DIMS and parts[-1] in CHECKPOINT_PIECES:
                self._load_projection_piece(hf_name, parts, tensor)
            elif len(parts) >= 2 and parts[-2] in _SPLIT_DIMS and parts[-1] in INT_CHECKPOINT_PIECES:
                self._load_projection_piece(hf_name, parts, tensor)
                loaded.add(f"{hf_name.rpartition('.')[0]}.weight")  # the projection, for the missing-tensor check
            elif parts[-1] in CHECKPOINT_PIECES[1:]:
                raise ValueError(f"{hf_name}: fitserve reads fp8 scales only for the linear layers of each block "
                                 "(lm_head and embeddings stay in --dtype)")
            elif fp8.is_fp8(tensor.dtype):
                raise ValueError(f"{hf_name} is stored in fp8: fitserve keeps embeddings, norms and lm_head in "
                                 "--dtype and reads fp8 only for the linear layers of each block")
            elif name == "lm_head.weight" and self.lm_head is not None:
                _load_piece(self.lm_head, 0, WEIGHT, tensor, hf_name)
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

    def _load_projection_piece(self, hf_name: str, parts: list[str], tensor: torch.Tensor) -> None:
        """A projection's weight, or its weight_scale ([] or [1] per tensor, [rows, 1] per channel) or
        input_scale, into its (merged) layer."""
        piece, owner = parts[-1], parts[-2]
        merged, shard_index = _MERGED_SHARDS.get(owner, (owner, 0))
        try:
            module = self.get_submodule(".".join(parts[:-2] + [merged]))
        except AttributeError:  # a layer index past num_hidden_layers, a misplaced projection
            raise ValueError(f"unexpected checkpoint tensor {hf_name!r}") from None
        assert isinstance(module, LinearLayer), f"{merged} is built by the weight format"
        shard = tensor_shard(f"{hf_name.rpartition('.')[0]}.weight", self.full_arch, self.tp)
        if piece == WEIGHT_SCALE and shard is not None and shard.dim == 0 and tensor.numel() > 1:
            tensor = tensor.reshape(-1).narrow(0, shard.start, shard.length)  # this rank's rows' scales
        _load_piece(module, shard_index, piece, tensor, hf_name)

    def _load_kv_scale(self, hf_name: str, parts: list[str], tensor: torch.Tensor) -> None:
        """layers.i.self_attn.k_scale, or layers.i.self_attn.k_proj.output_scale: one value."""
        kind, owner = parts[-1], parts[-2]
        which = kind[0] if owner == "self_attn" else owner[0]
        if tensor.numel() != 1 or which not in "kv" or "self_attn" not in parts:
            raise ValueError(f"unexpected KV-cache scale {hf_name!r} of shape {tuple(tensor.shape)}")
        attn = self.get_submodule(".".join(parts[:parts.index("self_attn") + 1])).attn
        attn.set_kv_scale(which, float(tensor.float().reshape(())))

    def checkpoint_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return hf_tensor_shapes(self.full_arch)

    def checkpoint_slice(self, hf_name: str) -> TensorShard | None:
        return tensor_shard(hf_name, self.full_arch, self.tp)

    def expected_weight_names(self) -> set[str]:
        """HF names a complete checkpoint provides (for a missing-tensor check)."""
        return set(hf_tensor_shapes(self.full_arch))
