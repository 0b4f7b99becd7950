#!/usr/bin/env bash
# One device call for GGUF Q4_K in the integer kernels' K-quant form (kernels/int_quant.py; docs/quantization.md):
# the GGUF, dummy-layout and integer-kernel GPU tests, then Llama-3-8B's 128 projections in Q4_K as stored
# (triton_gguf) against the K-quant form and bf16 at 1 to 256 rows (gguf_gemv_bench.py --k-form), then
# Llama-3-8B Q4_K_M through the engine beside bf16 (device_models.py: single stream, W1, W2, then W6 as time allows).
#   OUT=... benchmarks/gguf_k_form_call.sh
set -u
cd "$(dirname "$0")/.."
out=${OUT:?set OUT}
start=$SECONDS
mkdir -p "$out/kernels" "$out/dm"
timeout 240 python -m pytest -q --noconftest tests/test_gguf_quant_gpu.py tests/test_dummy_quant_gpu.py \
    tests/test_int_quant_gpu.py -k "not int_quant_gpu or split_k or words_kernels_in_fp16 or each_path" \
    >"$out/tests.log" 2>&1
grep -E "passed|failed|Error" "$out/tests.log" | tail -8
echo "tests done at $((SECONDS - start)) s"
timeout 170 python benchmarks/gguf_gemv_bench.py --k-form --out "$out/kernels" >"$out/kernels/log.jsonl" 2>&1
tail -24 "$out/kernels/log.jsonl"
echo "kernels done at $((SECONDS - start)) s"
left=$((585 - (SECONDS - start)))
timeout $((left - 5)) python benchmarks/device_models.py --parts llama-bf16 llama-q4_k_m llama-bf16-W6 llama-q4_k_m-W6 \
    --budget-s $((left - 20)) \
    --out "$out/dm" 2>&1 | grep -v "^target" | tail -16
exit 0
