#!/usr/bin/env bash
# One device call for the int4 kernel tables (docs/quantization.md): the split-K and dequantize-then-cuBLAS
# tests, the tables at 64 to 2048 rows against bf16 (int_quant_bench.py), then Llama-3-8B in GPTQ int4
# through the engine with table A beside bf16, and with table B if time is left (device_models.py).
#   TABLE_A=swap_n64_k4_dequant128 TABLE_B=swap_n64_k4_m128_k2 benchmarks/int4_tables_call.sh   # $OUT set
set -u
cd "$(dirname "$0")/.."
out=${OUT:?set OUT}
start=$SECONDS
mkdir -p "$out/many" "$out/dm_a" "$out/dm_b"
timeout 100 python -m pytest -q --noconftest tests/test_int_quant_gpu.py -k "split_k or dequant_mm" >"$out/tests.log" 2>&1
tail -2 "$out/tests.log"
timeout 140 python benchmarks/int_quant_bench.py --out "$out/many" --rows 64 128 256 512 2048 \
    --variant words_n16_narrow "${TABLE_A:-swap_n64_k4_dequant128}" swap_n64_k4_m128s_k2 swap_n64_k4_m128_k2 \
    >"$out/many/log.jsonl" 2>&1
python - "$out/many/log.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    try:
        d = json.loads(line)
    except ValueError:
        print(line.strip()[:160]); continue
    print(d.get("variant", d["kind"]), d["rows"], d.get("ms"), d.get("rel_err"), d.get("error", "")[:120])
PY
echo "kernels done at $((SECONDS - start)) s"
timeout 230 python benchmarks/device_models.py --parts llama-bf16 llama-gptq_int4 --budget-s 200 \
    --int-kernels "${TABLE_A:-swap_n64_k4_dequant128}" --out "$out/dm_a" 2>&1 | grep -v "^target" | tail -12
left=$((575 - (SECONDS - start)))
echo "table B with $left s left"
[ "$left" -gt 110 ] && timeout $((left - 5)) python benchmarks/device_models.py --parts llama-gptq_int4 \
    --budget-s $((left - 15)) --int-kernels "${TABLE_B:-swap_n64_k4_m128_k2}" --out "$out/dm_b" 2>&1 | tail -6
exit 0
