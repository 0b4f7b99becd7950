"""The packed layouts `--load-format dummy` builds with a packed `--quantization`, and their bytes
(torch-free: the planner and weights/source.py use them; weights/dummy_quant.py makes the tensors).

Without a checkpoint, a packed value of `--quantization` picks the layout the hub's checkpoints
most often have, so that a benchmark of random weights moves the bytes a real one would:
- gptq: 4-bit integers, group 128, symmetric, in column order (desc_act false);
- awq: 4-bit integers, group 128, with zeros (AutoAWQ's GEMM version);
- compressed-tensors: W4A16, 4-bit, group 128, symmetric (llm-compressor's preset);
- gguf: llama.cpp's Q4_K_M mix for a Llama model (src/llama-quant.cpp, llama_tensor_get_type):
  Q4_K for every block projection but attn_v and ffn_down on the "more bits" layers
  (`use_more_bits`: the first and last eighth of the layers and every third one between), which
  take Q6_K; on an 80-layer model (llama.cpp's 70B) the other attn_v take Q5_K. A tensor whose
  row length is not whole 256-element blocks falls back as llama.cpp does (Q4_K -> Q5_0,
  Q6_K -> Q8_0; a row not of whole 32-element blocks, or Q5_K's fallback Q5_1, which fitserve
  does not keep packed, stays in --dtype). llama.cpp also stores output.weight in Q6_K and
  token_embd in Q4_K, but fitserve dequantizes those at load, so the dummy holds them in --dtype.
A checkpoint folder whose config.json has an integer quantization_config keeps its own scheme.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from fitserve.arch_config import ArchConfig
from fitserve.config import ConfigError
from fitserve.plan.gguf_bytes import held_bytes_16bit
from fitserve.plan.shapes import ParamCounts, counts_from_arch, with_packed_linears
from fitserve.weights.int_checkpoint import IntQuantScheme

DUMMY_INIT_STD = 0.02  # the dense dummy's standard deviation, and the packed ones' weight RMS: small enough
# that 32 random layers keep activations finite in bf16
SCALE_SPREAD = (0.5, 1.5)  # a packed dummy's group scales: the nominal one times a uniform factor in this range
DUMMY_GROUP_SIZE = 128  # the hub's common group size for GPTQ, AWQ and compressed-tensors W4A16
DUMMY_INT_SCHEMES = {
    "gptq": IntQuantScheme("gptq", 4, DUMMY_GROUP_SIZE, symmetric=True, act_order=False, zeros_minus_one=True),
    "awq": IntQuantScheme("awq", 4, DUMMY_GROUP_SIZE, symmetric=False, act_order=False),
    "compressed-tensors": IntQuantScheme("compressed-tensors", 4, DUMMY_GROUP_SIZE, symmetric=True, act_order=False),
}
PACKED_DUMMY_QUANTIZATIONS = (*DUMMY_INT_SCHEMES, "gguf")
LAYERS_OF_LLAMA_70B = 80  # llama.cpp's LLM_TYPE_70B for a Llama with grouped KV heads: attn_v in Q5_K
DENSE = "F16"  # llama.cpp's last fallback: the tensor unquantized (fitserve: in --dtype)
# llama.cpp's fallback for a row that is not whole 256-element blocks (tensor_type_fallback)
K_QUANT_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
# (block elements, block bytes) of the types the dummy uses, as the gguf package defines them
BLOCK_SIZES = {name: GGML_QUANT_SIZES[GGMLQuantizationType[name]] for name in ("Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q8_0")}
# HF projection -> its llama.cpp tensor name (weights/gguf_file.py maps the other way)
GGUF_PROJECTIONS = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


@dataclass(frozen=True, slots=True)
class BlockProjection:
    """One projection of one block, as a Llama checkpoint names it apart."""

    layer: int
    name: str  # "q_proj", ...
    num_rows: int  # out_features
    in_features: int


def block_projections(arch: ArchConfig) -> tuple[BlockProjection, ...]:
    """Every block's seven projections (Llama's names; the dummy's tensors and the planner's counts)."""
    hidden, head_dim = arch.hidden_size, arch.head_dim
    q_rows, kv_rows = arch.num_attention_heads * head_dim, arch.num_key_value_heads * head_dim
    shapes = {"q_proj": (q_rows, hidden), "k_proj": (kv_rows, hidden), "v_proj": (kv_rows, hidden),
              "o_proj": (hidden, q_rows), "gate_proj": (arch.intermediate_size, hidden),
              "up_proj": (arch.intermediate_size, hidden), "down_proj": (hidden, arch.intermediate_size)}
    return tuple(BlockProjection(layer, name, rows, cols) for layer in range(arch.num_hidden_layers)
                 for name, (rows, cols) in shapes.items())


def use_more_bits(layer: int, num_layers: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v and ffn_down Q4_K_M stores in Q6_K."""
    return layer < num_layers // 8 or layer >= 7 * num_layers // 8 or (layer - num_layers // 8) % 3 == 2


def q4_k_m_type(projection: BlockProjection, arch: ArchConfig) -> str:
    """The GGML type Q4_K_M gives a Llama block projection (DENSE: kept in --dtype)."""
    num_layers = arch.num_hidden_layers
    ggml_type = "Q4_K"
    if projection.name in ("v_proj", "down_proj") and use_more_bits(projection.layer, num_layers):
        ggml_type = "Q6_K"
    elif (projection.name == "v_proj" and num_layers == LAYERS_OF_LLAMA_70B
          and arch.num_key_value_heads < arch.num_attention_heads):
        ggml_type = "Q5_K"
    if projection.in_features % BLOCK_SIZES[ggml_type][0]:
        ggml_type = K_QUANT_FALLBACK[ggml_type]
        if ggml_type not in BLOCK_SIZES or projection.in_features % BLOCK_SIZES[ggml_type][0]:
            ggml_type = DENSE
    return ggml_type


def packed_bytes(ggml_type: str, num_rows: int, in_features: int) -> int:
    elements, block_bytes = BLOCK_SIZES[ggml_type]
    return num_rows * in_features // elements * block_bytes


def dummy_gguf_param_counts(arch: ArchConfig) -> ParamCounts:
    """The counts of a dummy Q4_K_M model: its packed projections at their bytes, the rest in --dtype."""
    elements = num_bytes = extra_16bit = 0
    for projection in block_projections(arch):
        ggml_type = q4_k_m_type(projection, arch)
        if ggml_type != DENSE:
            elements += projection.num_rows * projection.in_features
            stored = packed_bytes(ggml_type, projection.num_rows, projection.in_features)
            num_bytes += stored
            extra_16bit += held_bytes_16bit(ggml_type, stored) - stored
    return with_packed_linears(counts_from_arch(arch), elements, num_bytes, "gguf", "the dummy Q4_K_M layout",
                               extra_16bit=extra_16bit)


def check_dummy_packed(arch: ArchConfig, quantization: str) -> None:
    """ConfigError for a model the dummy packed layouts are not made for."""
    if arch.num_experts:
        raise ConfigError(f"--load-format dummy --quantization {quantization}: {arch.architecture} is a "
                          "Mixture-of-Experts model, whose experts fitserve holds in --dtype only; leave out "
                          "--quantization (or use fp8).")
