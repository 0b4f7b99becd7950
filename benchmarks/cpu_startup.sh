#!/usr/bin/env bash
# Start-up time of `fitserve serve` on the CPU (the embedded model) to a healthy /health, with and without
# the compiled decode step: eager, then `--cpu-compile decode` with an empty inductor cache (the first
# start-up: it compiles), then again (the second: inductor's cache is warm, dynamo still traces).
# One server at a time; seconds from the process's start to /health's first 200, then the seconds of one
# 16-token completion (a compiled step that compiles again at its first request would show here), one
# JSON line each.
#
#   benchmarks/cpu_startup.sh            # JSON lines under $OUT/startup.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
out=${OUT:-benchmarks/results/cpu_startup}
port=${PORT:-8131}
cache=$(mktemp -d)  # a fresh inductor cache, shared by the two compiled start-ups
mkdir -p "$out"
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$cache"' EXIT

start_once() {  # name extra-flags
    local start_s end_s
    start_s=$(date +%s.%N)
    TORCHINDUCTOR_CACHE_DIR=$cache "$py" -m fitserve serve --port "$port" $2 >"$out/$1-serve.log" 2>&1 &
    pid=$!
    until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do
        kill -0 "$pid" 2>/dev/null || { echo "$1: the server exited (see $out/$1-serve.log)" >&2; exit 1; }
        sleep 0.2
    done
    end_s=$(date +%s.%N)
    curl -sf "http://127.0.0.1:$port/v1/completions" -H 'Content-Type: application/json' \
        -d '{"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}' >/dev/null
    request_s=$(echo "$(date +%s.%N) - $end_s" | bc)
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
    printf '{"run": "%s", "flags": "%s", "startup_to_health_s": %.1f, "first_request_s": %.1f, "load_avg": "%s"}\n' \
        "$1" "$2" "$(echo "$end_s - $start_s" | bc)" "$request_s" "$(cut -d' ' -f1-3 /proc/loadavg)" \
        | tee -a "$out/startup.jsonl"
}
start_once eager ""
start_once compile-first "--cpu-compile decode"
start_once compile-second "--cpu-compile decode"
