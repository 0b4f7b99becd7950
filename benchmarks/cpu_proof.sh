#!/usr/bin/env bash
# The CPU benchmark runs committed under benchmarks/results/ (docs/benchmarks.md shows them):
# W1 scaled to a 2-core CPU, the default model's output tokens/s at 1 and 8 concurrent requests
# (128-token prompts and outputs), W5, and three sweeps (max_num_seqs; KV-cache size, the CPU's
# counterpart of --gpu-memory-utilization; bf16 against fp8 weights). Usage: benchmarks/cpu_proof.sh [all|w1|w5|concurrency|sweep-seqs|sweep-kv|sweep-fp8]
#
# The numbers depend on how busy the machine is: each JSON records the load average before and
# after its run, and this script prints `uptime` and the busiest processes first.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
# This checkout's code, whatever the virtual environment's editable install points at.
py=${PYTHON:-.venv/bin/python}
export PYTHONPATH=$PWD/src
fitserve() { "$py" -m fitserve "$@"; }
out=${OUT:-benchmarks/results}
port=${PORT:-8000}
url=http://127.0.0.1:$port
mkdir -p "$out"
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT  # a server left by an interrupted run

uptime
ps -eo pid,pcpu,etime,args --sort=-pcpu | head -6 | cut -c1-150
load=$(cut -d' ' -f1-3 /proc/loadavg)
# The three busiest processes when the script starts (others' test runs share these CPUs).
others=$(ps -eo pcpu,comm --sort=-pcpu | awk 'NR > 1 && NR <= 4 {printf "%s%% %s; ", $1, $2}')
meta=(--metadata "load_at_start=$load" "busiest_processes_at_start=$others")

with_server() {  # with_server CMD...: a default-model server on $port around CMD
    "$py" -m fitserve serve --port "$port" --log-level warning > "${TMPDIR:-/tmp}/fitserve-bench-server.log" 2>&1 &
    local pid=$! rc=0
    for _ in $(seq 120); do curl -sf "$url/health" > /dev/null && break; sleep 1; done
    "$@" || rc=$?
    kill -INT "$pid"
    wait "$pid" || true
    return "$rc"
}

run_w1() {
    fitserve bench --base-url "$url" --workload W1 --num-prompts 20 --max-concurrency 4 \
        --save-result "$out/cpu-w1-20req-c4.json" "${meta[@]}" "scale=W1 scaled: 20 requests at concurrency 4"
}

run_concurrency() {
    fitserve bench --base-url "$url" --num-prompts 6 --max-concurrency 1 --input-len 128 --output-len 128 \
        --save-result "$out/cpu-throughput-c1-128in-128out.json" "${meta[@]}"
    fitserve bench --base-url "$url" --num-prompts 24 --max-concurrency 8 --input-len 128 --output-len 128 \
        --save-result "$out/cpu-throughput-c8-128in-128out.json" "${meta[@]}"
}

run_w5() {  # the guide's "2+2 while an essay streams", with a 256-token essay
    fitserve bench --base-url "$url" --workload W5 --output-len 256 \
        --save-result "$out/cpu-w5-essay256.json" "${meta[@]}"
}

run_sweep_seqs() {
    fitserve sweep --grid max_num_seqs=1,2,4,8 --workload W1 --num-prompts 16 --max-concurrency 8 \
        --input-len 256 --output-len 64 --output-dir "$out/cpu-sweep-max-num-seqs" "${meta[@]}"
}

run_sweep_kv() {
    # 23,040 bytes per token (30 layers x 3 KV heads x 64 x 2 (K, V) x 2 bytes): 16MiB holds 720
    # tokens (45 blocks of 16), less than one --max-model-len 1024 request: that point fails at start-up.
    fitserve sweep --grid kv_cache_memory_bytes=16MiB,24MiB,48MiB,96MiB,default \
        --server-args "--max-model-len 1024" --workload W1 --num-prompts 16 --max-concurrency 8 \
        --input-len 256 --output-len 64 --output-dir "$out/cpu-sweep-kv-cache" "${meta[@]}"
}

run_sweep_fp8() {  # the guide's FP16 against FP8; on the CPU, fp8 weights are dequantized per matmul
    fitserve sweep --grid quantization=default,fp8 --workload W1 --num-prompts 16 --max-concurrency 8 \
        --input-len 256 --output-len 64 --output-dir "$out/cpu-sweep-fp8" "${meta[@]}"
}

case $what in
    w1) with_server run_w1 ;;
    w5) with_server run_w5 ;;
    concurrency) with_server run_concurrency ;;
    sweep-seqs) run_sweep_seqs ;;
    sweep-kv) run_sweep_kv ;;
    sweep-fp8) run_sweep_fp8 ;;
    all) with_server run_w1; with_server run_concurrency; with_server run_w5; run_sweep_seqs; run_sweep_kv; run_sweep_fp8 ;;
    *) echo "usage: $0 [all|w1|w5|concurrency|sweep-seqs|sweep-kv|sweep-fp8]" >&2; exit 2 ;;
esac
