"""The integer words kernels (kernels/triton_int_words.py), plain and in the K-quant form (GGUF Q4_K), compiled
for an H100/H200 (sm_90) on a machine without a GPU: Triton's compiler and its bundled ptxas, then cuobjdump's
resource usage (registers, stack, local memory: a spill shows as STACK or LOCAL above 0) and the shared memory
of each, at the default table's shapes (the split GEMV, the transposed split tile, the 128-row tile, the
dequantizer). One JSON line a kernel; a kernel that does not compile raises.

    PYTHONPATH=src:/path/to/triton python benchmarks/int_words_offline_compile.py
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fitserve.kernels import triton_int_words as words

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
K_FORM = {"x_ptr": "*bf16", "q_ptr": "*i32", "s_ptr": "*u8", "z_ptr": "*u8", "sup_ptr": "*fp16", "y_ptr": "*bf16",
          "part_ptr": "*fp32", "count_ptr": "*i32", "w_ptr": "*bf16"}
PLAIN = dict(K_FORM, s_ptr="*fp32", sup_ptr="*fp32")  # GPTQ's float32 scales and zero bytes; sup_ptr unused


def resource_usage(fn, pointers: dict[str, str], constexprs: dict[str, object], num_warps: int) -> dict:
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "i32") for name in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(name),): value for name, value in constexprs.items()})
    kernel = triton.compile(source, target=TARGET, options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(CUOBJDUMP), "-res-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
    line = next(text for text in usage.splitlines() if "REG:" in text)
    fields = dict(item.split(":") for item in line.split() if ":" in item)
    return {"registers": int(fields["REG"]), "stack": int(fields["STACK"]), "local": int(fields["LOCAL"]),
            "shared_bytes": kernel.metadata.shared}


def main() -> None:
    for form, pointers, kq, seg_words in (("k_form", K_FORM, 8, 4), ("gptq_g128", PLAIN, 0, 16)):
        geometry = {"BITS": 4, "SEG_WORDS": seg_words, "SEGS_PER_GROUP": 1, "KQ": kq}
        cases = {
            "gemv_n16_t128_w4_split4": (words._gemv_words_kernel, dict(
                geometry, SEGS_PER_TILE=128 // seg_words, BLOCK_N=16, SPLIT_K=4, PDL=False), 4),
            "tile_m16_n64_k128_swap_split4": (words._tile_words_kernel, dict(
                geometry, SEGS_PER_TILE=16 // seg_words, BLOCK_M=16, BLOCK_N=64, SWAP=True, SPLIT_K=4), 4),
            "tile_m128_n64_k128_swap_split2": (words._tile_words_kernel, dict(
                geometry, SEGS_PER_TILE=16 // seg_words, BLOCK_M=128, BLOCK_N=64, SWAP=True, SPLIT_K=2), 4),
            "dequant_n32_w32": (words._dequant_words_kernel, dict(
                geometry, SEGS_PER_TILE=32 // seg_words, BLOCK_N=32), 4),
        }
        for name, (fn, constexprs, num_warps) in cases.items():
            print(json.dumps({"form": form, "kernel": name, "target": "sm_90", "triton": triton.__version__,
                              **resource_usage(fn, pointers, constexprs, num_warps)}), flush=True)


if __name__ == "__main__":
    main()
