#!/usr/bin/env bash
# One device call for the one-row int4 GEMV with K split (kernels/triton_int_words.py gemv_words, min_programs;
# docs/quantization.md): the GEMV tests, every gemv_* variant of triton_int_quant.VARIANTS at one row against
# the default table and bf16 (int_quant_bench.py), then Llama-3-8B in GPTQ int4 through the engine with the
# fastest of them beside bf16 (device_models.py: single stream, W1, W2).
#   OUT=... benchmarks/int4_gemv_call.sh
set -u
cd "$(dirname "$0")/.."
out=${OUT:?set OUT}
start=$SECONDS
mkdir -p "$out/gemv" "$out/dm"
variants=$(python -c "from fitserve.kernels.triton_int_quant import VARIANTS; print(' '.join(v for v in VARIANTS if v.startswith('gemv_')))")
timeout 150 python -m pytest -q --noconftest tests/test_int_quant_gpu.py \
    -k "split_k or words_kernels_in_fp16 or (every_variant and (gemv_n16_t128_w4_p1024 or gemv_n8_t64_w2_p4096))" \
    >"$out/tests.log" 2>&1
tail -2 "$out/tests.log"
timeout 200 python benchmarks/int_quant_bench.py --out "$out/gemv" --rows 1 --bits 4 8 \
    --variant swap_n64_k4_m128s_k2 $variants >"$out/gemv/log.jsonl" 2>&1
best=$(python - "$out/gemv/log.jsonl" <<'PY'
import json, sys
best = {}
for line in open(sys.argv[1]):
    try:
        d = json.loads(line)
    except ValueError:
        print(line.strip()[:160], file=sys.stderr); continue
    print(d.get("variant", d["kind"]), d["kind"], d["rows"], d.get("ms"), d.get("rel_err"), d.get("error", "")[:120],
          file=sys.stderr)
    if d["kind"] == "int4_g128" and d.get("ms"):
        best[d["variant"]] = d["ms"]
print(min(best, key=best.get))
PY
)
echo "kernels done at $((SECONDS - start)) s; fastest at one row: $best"
left=$((580 - (SECONDS - start)))
timeout $((left - 5)) python benchmarks/device_models.py --parts llama-bf16 llama-gptq_int4 --budget-s $((left - 20)) \
    --int-kernels "$best" --out "$out/dm" 2>&1 | grep -v "^target" | tail -12
exit 0
