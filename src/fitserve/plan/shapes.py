"""What a model's tensors weigh, from its config.json or its safetensors headers (torch-free).

Counts follow what `models/llama.py` (and qwen2.py, qwen3.py) allocate: merged qkv and gate_up
projections, o and down projections (the "linear layers"), the token embedding, an lm_head unless
the embeddings are tied, the RMSNorm weights (Qwen3 and Gemma 3 also a [head_dim] q_norm and k_norm
per layer; Gemma 2/3 four norms per layer, and Gemma 3 a second rotary table for its local layers), the
q, k, v biases of Qwen2, and the rotary cos/sin tables (float32 buffers,
[max_position_embeddings, head_dim] each). With `--quantization fp8` the linear layers take one
byte per weight plus a float32 scale per tensor; everything else (biases too) stays in `--dtype`.
A Mixture-of-Experts layer (models/mixtral.py, qwen3_moe.py) has no dense MLP but a router
[E, H] and every expert's gate, up [I, H] and down [H, I]: all experts are resident, in `--dtype`
whatever `--quantization` (layers/moe.py), and split over tensor-parallel ranks like the MLP.

With `--quantization gguf` the projections a GGUF file stores in a block type take their stored
bytes (`ParamCounts.packed_linear_bytes`, from the file's header: plan/gguf_bytes.py).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, replace
from pathlib import Path

from fitserve.arch_config import ArchConfig
from fitserve.config import KV_CACHE_DTYPES, QUANTIZATIONS, ConfigError
from fitserve.kv_groups import kv_layout

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}
AUTO_DTYPE = "bfloat16"  # fitserve's --dtype auto
FP8_SCALE_BYTES = 4  # one float32 scale per quantized weight tensor
FP8_QUANTIZATIONS = ("fp8", "fp8_per_tensor")
ROTARY_TABLE_BYTES = 4  # cos and sin are float32
# A block's projections as checkpoints name them: apart (Llama, Qwen) or fused (Phi-3's qkv_proj,
# gate_up_proj); each of the first set begins one of fitserve's 4 merged linear layers of a block.
MERGED_LINEAR_STARTS = ("q_proj", "qkv_proj", "o_proj", "gate_proj", "gate_up_proj", "down_proj")
LINEAR_PROJECTIONS = (*MERGED_LINEAR_STARTS, "k_proj", "v_proj", "up_proj")
BIASED_PROJECTIONS = ("q_proj", "k_proj", "v_proj")
LINEARS_PER_LAYER = 4  # qkv_proj, o_proj, gate_up_proj, down_proj after merging
ATTENTION_LINEARS = 2  # qkv_proj, o_proj: the linear layers of an MoE layer (its experts are not)
VISION_TENSOR_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                          "model.multi_modal_projector.")
SAFETENSORS_HEADER_LEN_BYTES = 8  # a little-endian u64 before the JSON header


def resolve_dtype(dtype: str) -> str:
    name = AUTO_DTYPE if dtype == "auto" else dtype
    if name not in DTYPE_BYTES or name == "fp8":
        raise ConfigError(f"--dtype must be auto, bfloat16, float16 or float32, got {dtype!r}.")
    return name


def kv_dtype_name(kv_cache_dtype: str, model_dtype: str) -> str:
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ConfigError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}.")
    return model_dtype if kv_cache_dtype == "auto" else "fp8"


def kv_bytes_per_token(arch: ArchConfig, kv_dtype: str) -> int:
    """K and V of every layer for one token: 2 x layers x kv_heads x head_dim x dtype bytes."""
    return arch.kv_elements_per_token * DTYPE_BYTES[kv_dtype]


def kv_block_bytes(arch: ArchConfig, kv_dtype: str, block_size: int) -> int:
    """One block of the pool: block_size tokens of K and V of the layers of one KV cache group
    (kv_groups.py: every layer, unless the model mixes windowed and full layers)."""
    num_layers = kv_layout(arch.layer_windows).num_layers_per_block
    return kv_bytes_per_token(arch, kv_dtype) * num_layers // arch.num_hidden_layers * block_size


@dataclass(frozen=True, slots=True)
class ParamCounts:
    """Elements of each kind of tensor fitserve allocates for a model."""

    linear_params: int  # qkv, o, gate_up, down of every layer
    num_linear_tensors: int  # after merging: 4 per layer
    embedding_params: int  # embed_tokens, plus lm_head when not tied
    norm_params: int
    rotary_elements: int  # cos and sin tables together
    source: str  # "config.json" or "safetensors headers"
    bias_params: int = 0  # q, k, v biases (Qwen2), split like their projections' rows
    expert_params: int = 0  # every expert's gate, up and down of every MoE layer, split like the MLP
    router_params: int = 0  # the MoE layers' routers [E, H], replicated
    # A GGUF file's projections kept packed by --quantization gguf (plan/gguf_bytes.py): their
    # elements (part of linear_params) and stored bytes; 0 for other models
    packed_linear_params: int = 0
    packed_linear_bytes: int = 0
    packed_16bit_extra_bytes: int = 0  # what serving them in 16 bits adds (Q4_K's K-quant form on a GPU)
    packed_format: str = "gguf"  # the report's name for them: "gguf", or an integer checkpoint's method
    # an integer checkpoint is always held as stored; a GGUF's blocks only with --quantization gguf
    packed_always: bool = False

    @property
    def num_params(self) -> int:
        return (self.linear_params + self.embedding_params + self.norm_params + self.bias_params
                + self.expert_params + self.router_params)

    def per_rank(self, tensor_parallel_size: int) -> ParamCounts:
        """One GPU's share under tensor parallelism: 1/N of every linear layer and bias, the rest replicated."""
        if tensor_parallel_size == 1:
            return self
        return replace(self, linear_params=self.linear_params // tensor_parallel_size,
                       bias_params=self.bias_params // tensor_parallel_size,
                       expert_params=self.expert_params // tensor_parallel_size)


def block_projections(arch: ArchConfig) -> tuple[tuple[int, int], ...]:
    """(rows, in_features) of a dense block's four projections: fused qkv, o, fused gate_up, down."""
    hidden, head_dim = arch.hidden_size, arch.head_dim
    qkv_rows = (arch.num_attention_heads + 2 * arch.num_key_value_heads) * head_dim
    return ((qkv_rows, hidden), (hidden, arch.num_attention_heads * head_dim),
            (2 * arch.intermediate_size, hidden), (hidden, arch.intermediate_size))


def counts_from_arch(arch: ArchConfig) -> ParamCounts:
    hidden, head_dim = arch.hidden_size, arch.head_dim
    qkv_rows = (arch.num_attention_heads + 2 * arch.num_key_value_heads) * head_dim
    attention = qkv_rows * hidden + hidden * arch.num_attention_heads * head_dim
    dense_mlp = 3 * arch.intermediate_size * hidden
    num_moe_layers = sum(arch.is_moe_layer(i) for i in range(arch.num_hidden_layers))
    num_dense_layers = arch.num_hidden_layers - num_moe_layers
    num_embeddings = 1 if arch.tie_word_embeddings else 2
    qk_norm_params = 2 * head_dim if arch.qk_norm else 0
    norms_per_layer = 4 if arch.sandwich_norms else 2  # Gemma: post-attention and pre/post-feedforward norms
    return ParamCounts(
        linear_params=attention * arch.num_hidden_layers + dense_mlp * num_dense_layers,
        num_linear_tensors=LINEARS_PER_LAYER * num_dense_layers + ATTENTION_LINEARS * num_moe_layers,
        embedding_params=num_embeddings * arch.vocab_size * hidden,
        norm_params=(norms_per_layer * arch.num_hidden_layers + 1) * hidden + arch.num_hidden_layers * qk_norm_params,
        rotary_elements=_rotary_elements(arch),
        source="config.json",
        bias_params=arch.num_hidden_layers * qkv_rows if arch.qkv_bias else 0,
        expert_params=num_moe_layers * arch.num_experts * 3 * arch.moe_intermediate_size * hidden,
        router_params=num_moe_layers * arch.num_experts * hidden,
    )


def _rotary_elements(arch: ArchConfig) -> int:
    """cos and sin tables; a second pair when local layers have their own rope base (Gemma 3)."""
    num_tables = 1 if arch.rope_local_theta is None else 2
    return num_tables * 2 * max(arch.max_position_embeddings, 1) * arch.head_dim


def read_safetensors_shapes(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) from one file's JSON header; reads no tensor data."""
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(SAFETENSORS_HEADER_LEN_BYTES))
            header = json.loads(f.read(header_len))
    except (OSError, struct.error, ValueError) as exc:
        raise ConfigError(f"Cannot read the safetensors header of {path}: {exc}") from None
    return {name: (meta["dtype"], tuple(meta["shape"])) for name, meta in header.items() if name != "__metadata__"}


def counts_from_safetensors(folder: Path, arch: ArchConfig) -> ParamCounts | None:
    """Counts from the checkpoint's headers, or None when the folder has no safetensors files."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    linear = embedding = norm = bias = num_linear = experts = routers = 0
    for path in files:
        for name, (_, shape) in read_safetensors_shapes(path).items():
            if name.startswith(VISION_TENSOR_PREFIXES):
                continue  # the vision tower of an image-text checkpoint (Gemma 3): not loaded
            numel = 1
            for dim in shape:
                numel *= dim
            prefix, _, piece = name.rpartition(".")
            owner = prefix.rpartition(".")[2]  # the projection or norm a tensor belongs to
            if ".experts." in name and piece == "weight":  # model.layers.i.*.experts.e.w1.weight
                experts += numel
            elif owner == "gate" and piece == "weight":  # an MoE layer's router (block_sparse_moe.gate, mlp.gate)
                routers += numel
            elif owner in LINEAR_PROJECTIONS and piece == "weight":
                linear += numel
                num_linear += owner in MERGED_LINEAR_STARTS
            elif "embed_tokens" in name or (name.startswith("lm_head") and not arch.tie_word_embeddings):
                embedding += numel
            elif name.endswith("norm.weight"):
                norm += numel
            elif owner in BIASED_PROJECTIONS and piece == "bias":
                bias += numel
    return ParamCounts(linear, num_linear, embedding, norm, _rotary_elements(arch), "safetensors headers", bias,
                       experts, routers)


def model_param_counts(arch: ArchConfig, folder: str | None) -> ParamCounts:
    """Header counts when the folder holds a checkpoint, else counts from the config."""
    if folder is not None and Path(folder).is_dir():
        from_headers = counts_from_safetensors(Path(folder), arch)
        if from_headers is not None:
            return from_headers
    return counts_from_arch(arch)


@dataclass(frozen=True, slots=True)
class WeightBytes:
    linear_dtype: str  # "bfloat16", "float16", "float32", "fp8" or "gguf" (packed blocks)
    linear_bytes: int
    other_dtype: str  # embeddings, lm_head, norms and biases
    embedding_bytes: int
    norm_bytes: int
    rotary_bytes: int  # float32 cos/sin tables
    scale_bytes: int  # fp8 scales
    bias_bytes: int = 0  # q, k, v biases (Qwen2)
    expert_bytes: int = 0  # MoE experts and routers, in other_dtype whatever --quantization

    @property
    def total_bytes(self) -> int:
        return (self.linear_bytes + self.embedding_bytes + self.norm_bytes + self.bias_bytes + self.rotary_bytes
                + self.scale_bytes + self.expert_bytes)


def with_packed_linears(counts: ParamCounts, packed_params: int, packed_bytes: int, packed_format: str = "gguf",
                        source: str = "the GGUF header", always: bool = False, extra_16bit: int = 0) -> ParamCounts:
    """`counts` of a model whose projections can be held as stored: a GGUF's blocks (under --quantization
    gguf), or an integer checkpoint's values, scales and zeros (`always`: weights/int_checkpoint.py);
    extra_16bit: what serving them in 16 bits adds (plan/gguf_bytes.py HELD_BLOCK_BYTES)."""
    return replace(counts, packed_linear_params=packed_params, packed_linear_bytes=packed_bytes,
                   packed_16bit_extra_bytes=extra_16bit, packed_format=packed_format, packed_always=always,
                   source=f"{counts.source} and {source}")


def weight_bytes(counts: ParamCounts, dtype: str, quantization: str | None) -> WeightBytes:
    if quantization not in QUANTIZATIONS:
        names = ", ".join(q for q in QUANTIZATIONS if q)
        raise ConfigError(f"--quantization must be one of {names}, or left out; got {quantization!r}.")
    dtype_bytes = DTYPE_BYTES[dtype]
    if quantization == "gguf" or counts.packed_always:
        # held as stored (GGUF blocks, an integer checkpoint's values), any other projection in --dtype
        linear_dtype = counts.packed_format
        linear = (counts.packed_linear_bytes + (counts.packed_16bit_extra_bytes if dtype_bytes == 2 else 0)
                  + (counts.linear_params - counts.packed_linear_params) * dtype_bytes)
    else:
        linear_dtype = "fp8" if quantization is not None else dtype
        linear = counts.linear_params * DTYPE_BYTES[linear_dtype]
    return WeightBytes(
        linear_dtype=linear_dtype,
        linear_bytes=linear,
        other_dtype=dtype,
        embedding_bytes=counts.embedding_params * dtype_bytes,
        norm_bytes=counts.norm_params * dtype_bytes,
        rotary_bytes=counts.rotary_elements * ROTARY_TABLE_BYTES,
        scale_bytes=counts.num_linear_tensors * FP8_SCALE_BYTES if quantization in FP8_QUANTIZATIONS else 0,
        bias_bytes=counts.bias_params * dtype_bytes,
        expert_bytes=(counts.expert_params + counts.router_params) * dtype_bytes,
    )
