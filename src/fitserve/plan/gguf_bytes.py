"""What a GGUF file's tensors weigh when `--quantization gguf` keeps them packed (torch-free).

The header (gguf.GGUFReader, which maps the file and reads no tensor data) gives each tensor's
GGML type and byte size. A block projection (attn_q/k/v/output, Phi-3's fused attn_qkv, ffn_gate/up/down) in one of
`PACKED_TYPES` is held as its bytes, exactly as stored, except that serving in 16 bits on a GPU holds Q4_K
in the integer kernels' K-quant form (`HELD_BLOCK_BYTES`: 148 bytes a block of 256 against 144; the planner
counts it for any 16-bit --dtype); one in F32/F16/BF16 is dequantized to
`--dtype` as without the flag, and so are the embedding, output and norm tensors. A projection in
any other quantized type (Q2_K, IQ4_XS, ...) is refused here, naming the type and the tensor,
before a weight is read. kernels/gguf.py holds the same types' block layouts.
"""

from __future__ import annotations

from dataclasses import dataclass

from fitserve.config import ConfigError

# The GGML types fitserve multiplies in packed form (kernels/gguf.py BLOCK_TYPES, a test checks)
PACKED_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
DENSE_TYPES = ("F32", "F16", "BF16")  # dequantized to --dtype like the other tensors
# Bytes of a block served in 16 bits on a GPU where they differ from the file's (layers/formats/gguf.py
# takes_k_form)
HELD_BLOCK_BYTES = {"Q4_K": (144, 148)}  # type: (file, held)
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_qkv")  # qkv: Phi-3


@dataclass(frozen=True, slots=True)
class GgufLinearBytes:
    """The block projections of a GGUF file as `--quantization gguf` holds them."""

    packed_bytes: int  # bytes of the projections in PACKED_TYPES, as stored
    extra_16bit: int  # what serving them in 16 bits on a GPU adds (HELD_BLOCK_BYTES)
    packed_params: int  # their elements (the rest of the linear elements are dequantized to --dtype)
    types: tuple[tuple[str, int], ...]  # (GGML type name, projection tensors of that type), by name


def held_bytes_16bit(type_name: str, file_bytes: int) -> int:
    """Bytes a packed projection of `file_bytes` in the file takes served in 16 bits on a GPU."""
    file_block, held_block = HELD_BLOCK_BYTES.get(type_name, (1, 1))
    return file_bytes // file_block * held_block


def is_projection(gguf_name: str) -> bool:
    """'blk.3.attn_q.weight' -> True; norms, token_embd, output -> False."""
    parts = gguf_name.split(".")
    return len(parts) == 4 and parts[0] == "blk" and parts[2] in PROJECTIONS and parts[3] == "weight"


def packed_linear_bytes(reader: object) -> GgufLinearBytes:
    """Count the projections of a parsed file (a gguf.GGUFReader); ConfigError for a projection in a
    quantized type fitserve cannot keep packed."""
    packed_bytes = packed_params = extra_16bit = 0
    types: dict[str, int] = {}
    for tensor in reader.tensors:  # type: ignore[attr-defined]
        if not is_projection(tensor.name):
            continue
        type_name = tensor.tensor_type.name
        if type_name not in PACKED_TYPES and type_name not in DENSE_TYPES:
            raise ConfigError(
                f"GGUF tensor {tensor.name} is {type_name}, which --quantization gguf cannot keep packed "
                f"(it multiplies {', '.join(PACKED_TYPES)}); leave out --quantization to dequantize the model "
                "at load.")
        types[type_name] = types.get(type_name, 0) + 1
        if type_name in PACKED_TYPES:
            packed_bytes += int(tensor.n_bytes)
            extra_16bit += held_bytes_16bit(type_name, int(tensor.n_bytes)) - int(tensor.n_bytes)
            packed_params += int(tensor.n_elements)
    return GgufLinearBytes(packed_bytes, extra_16bit, packed_params, tuple(sorted(types.items())))


def read_packed_linear_bytes(path: str) -> GgufLinearBytes:
    """packed_linear_bytes of the file at `path` (reads the header; ConfigError for a file gguf cannot read)."""
    from gguf import GGUFReader  # numpy only; imported here so the planner starts without it
    try:
        reader = GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"Cannot read GGUF file {path!r}: {exc}") from None
    return packed_linear_bytes(reader)


def gguf_quantization(requested: str | None, gguf_path: str | None, on_gpu: bool,
                      tensor_parallel_size: int = 1, cpu_int4: bool = False) -> str | None:
    """The --quantization a model runs with, as far as GGUF decides it: a .gguf model (`gguf_path`)
    takes `gguf` by default on one GPU, where the packed kernels read a quarter of the bytes, and on a
    CPU where `cpu_int4` (bf16 serving on a CPU with bf16 units: its 4-bit projections decode through
    torch's int4 matmul at twice the dequantized model's single-stream speed, docs/quantization.md);
    elsewhere (float32 on the CPU, split over GPUs) it is dequantized at load unless asked. ConfigError
    for `gguf` asked of a model that is not a .gguf file."""
    if requested == "gguf" and gguf_path is None:
        raise ConfigError("--quantization gguf keeps a .gguf file's blocks packed; this model is not a .gguf file.")
    if requested is None and gguf_path is not None and (on_gpu or cpu_int4) and tensor_parallel_size == 1:
        return "gguf"
    return requested
