#!/usr/bin/env bash
# Prefix caching on the CPU (docs/benchmarks.md, docs/prefix-caching.md): the shared-prefix
# workload (every request starts with the same 1000-token system prompt, then 24 tokens of its
# own, 16 output tokens) against the default model with --no-enable-prefix-caching, then with
# prefix caching on (the default). Each run gets a fresh server.
# Usage: benchmarks/prefix_cache_proof.sh   (PYTHON=..., PORT=..., OUT=..., QUIET_WAIT_S=...)
#
# Waits (up to QUIET_WAIT_S) for a quiet machine: a 1-minute load average under 1.0 and no
# process above 20% of a CPU. Each JSON records its load average before and after the run.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
export PYTHONPATH=$PWD/src
out=${OUT:-benchmarks/results}
port=${PORT:-8011}
url=http://127.0.0.1:$port
quiet_wait_s=${QUIET_WAIT_S:-1200}
mkdir -p "$out"
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT

wait_for_quiet() {
    local waited=0
    while [ "$waited" -lt "$quiet_wait_s" ]; do
        local load busiest
        load=$(cut -d' ' -f1 /proc/loadavg)
        busiest=$(ps -eo pcpu --sort=-pcpu | awk 'NR == 2 {print int($1)}')
        if awk -v l="$load" 'BEGIN {exit !(l < 1.0)}' && [ "$busiest" -le 20 ]; then
            return 0
        fi
        sleep 10
        waited=$((waited + 10))
    done
    echo "the machine did not get quiet in ${quiet_wait_s}s: running anyway (the JSON records the load)" >&2
}

run() {  # run on|off SERVER_FLAGS...
    local name=$1
    shift
    wait_for_quiet
    uptime
    ps -eo pid,pcpu,etime,args --sort=-pcpu | head -4 | cut -c1-150
    local load others
    load=$(cut -d' ' -f1-3 /proc/loadavg)
    others=$(ps -eo pcpu,comm --sort=-pcpu | awk 'NR > 1 && NR <= 4 {printf "%s%% %s; ", $1, $2}')
    "$py" -m fitserve serve --port "$port" --log-level warning "$@" > "${TMPDIR:-/tmp}/fitserve-prefix-$name.log" 2>&1 &
    local pid=$! rc=0
    for _ in $(seq 120); do curl -sf "$url/health" > /dev/null && break; sleep 1; done
    "$py" -m fitserve bench --base-url "$url" --workload shared-prefix --num-prompts 24 --max-concurrency 4 \
        --input-len 24 --output-len 16 --disable-tqdm --save-result "$out/cpu-shared-prefix-$name.json" \
        --metadata "prefix_caching=$name" "server_flags=$*" "load_at_start=$load" \
        "busiest_processes_at_start=$others" || rc=$?
    kill -INT "$pid"
    wait "$pid" || true
    return "$rc"
}

run off --no-enable-prefix-caching
run on
