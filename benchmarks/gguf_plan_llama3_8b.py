"""`fitserve plan` for Llama-3-8B-Instruct Q4_K_M without the 4.9 GB download: writes a GGUF whose
header lists the tensors llama.cpp's Q4_K_M gives Llama-3-8B (Q4_K, with attn_v and ffn_down in
Q6_K in the layers its `use_more_bits` picks, output.weight in Q6_K) over a sparse data region,
and plans it packed and dequantized. docs/quantization.md quotes the numbers.

    python benchmarks/gguf_plan_llama3_8b.py /tmp/llama3-8b-q4_k_m-header.gguf
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

HIDDEN, INTER, LAYERS, VOCAB, HEADS, KV_HEADS = 4096, 14336, 32, 128256, 32, 8
Q4_K, Q6_K, F32 = GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q6_K, GGMLQuantizationType.F32


def use_more_bits(layer: int, num_layers: int) -> bool:
    """llama.cpp (src/llama-quant.cpp): the first and last eighth of the layers, and every third between."""
    return layer < num_layers // 8 or layer >= 7 * num_layers // 8 or (layer - num_layers // 8) % 3 == 2


def tensors() -> list[tuple[str, tuple[int, ...], GGMLQuantizationType]]:
    """(name, numpy-order shape [out, in], type) of every tensor."""
    kv = KV_HEADS * HIDDEN // HEADS
    out = [("token_embd.weight", (VOCAB, HIDDEN), Q4_K), ("output_norm.weight", (HIDDEN,), F32),
           ("output.weight", (VOCAB, HIDDEN), Q6_K)]
    for i in range(LAYERS):
        more = Q6_K if use_more_bits(i, LAYERS) else Q4_K
        out += [(f"blk.{i}.attn_norm.weight", (HIDDEN,), F32), (f"blk.{i}.ffn_norm.weight", (HIDDEN,), F32),
                (f"blk.{i}.attn_q.weight", (HIDDEN, HIDDEN), Q4_K), (f"blk.{i}.attn_k.weight", (kv, HIDDEN), Q4_K),
                (f"blk.{i}.attn_v.weight", (kv, HIDDEN), more), (f"blk.{i}.attn_output.weight", (HIDDEN, HIDDEN), Q4_K),
                (f"blk.{i}.ffn_gate.weight", (INTER, HIDDEN), Q4_K), (f"blk.{i}.ffn_up.weight", (INTER, HIDDEN), Q4_K),
                (f"blk.{i}.ffn_down.weight", (HIDDEN, INTER), more)]
    return out


def write_header(path: str) -> int:
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(8192)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTER)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 128009)
    total = 0
    for name, shape, ggml_type in tensors():
        block_elements, block_bytes = GGML_QUANT_SIZES[ggml_type]
        numel = int(np.prod(shape))
        num_bytes = numel // block_elements * block_bytes
        byte_shape = shape if ggml_type == F32 else (*shape[:-1], shape[-1] // block_elements * block_bytes)
        writer.add_tensor_info(name, byte_shape, np.dtype(np.float32 if ggml_type == F32 else np.uint8), num_bytes,
                               raw_dtype=ggml_type)
        total += num_bytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    with open(path, "r+b") as f:  # the data region, sparse: GGUFReader maps it, plan never reads it
        f.seek(0, 2)
        start = f.tell()
        alignment = 32
        start += -start % alignment
        f.truncate(start + total + 64 * len(tensors()))
    return total


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "/tmp/llama3-8b-q4_k_m-header.gguf"
    print(f"tensor data: {write_header(path) / 1e9:.2f} GB")
    for extra in ([], ["--quantization", "fp8"]):
        subprocess.run([sys.executable, "-m", "fitserve", "plan", "--model", path, "--gpu", "h100", *extra], check=False)


if __name__ == "__main__":
    main()
