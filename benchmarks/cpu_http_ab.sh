#!/usr/bin/env bash
# Before/after of the CPU path through HTTP: two `fitserve serve` (the embedded model, CPU
# defaults) started side by side from two source trees, benched in turn by `fitserve bench`
# with the same requests (128 prompt and 128 output tokens, token ids, ignore_eos, streamed):
# N1 requests one at a time, then N16 at 16 concurrent; ROUNDS rounds, the two servers
# alternating within each round, so a busy minute on a shared machine hits both.
#
#   BEFORE_SRC=/path/to/old/src benchmarks/cpu_http_ab.sh        # JSON under $OUT
#
# BEFORE_SRC defaults to the main checkout's src, AFTER_SRC to this tree's; EXTRA_BEFORE and
# EXTRA_AFTER add serve flags to one side (e.g. EXTRA_AFTER="--cpu-threads 1"); ENV_BEFORE and ENV_AFTER
# set environment variables for one side's server (e.g. ENV_BEFORE="OMP_WAIT_POLICY=ACTIVE"); CONCS="1"
# runs the single stream only. Compare OpenMP wait policies one server at a time, not with this script:
# a server started with OMP_WAIT_POLICY=ACTIVE spins its threads while idle and takes the cores from
# the other side (a first try measured the PASSIVE side at 16 streams at 50 tok/s instead of 82).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
before_src=${BEFORE_SRC:-/work/main/src}
after_src=${AFTER_SRC:-$PWD/src}
out=${OUT:-benchmarks/results/cpu_http_ab}
rounds=${ROUNDS:-2}
n1=${N1:-3}
n16=${N16:-16}
mkdir -p "$out"
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT

serve() {  # name src port extra-flags env-assignments
    env $5 PYTHONPATH="$2" "$py" -m fitserve serve --port "$3" $4 >"$out/$1-serve.log" 2>&1 &
    pids+=($!)
}
serve before "$before_src" 8121 "${EXTRA_BEFORE:-}" "${ENV_BEFORE:-}"
serve after "$after_src" 8122 "${EXTRA_AFTER:-}" "${ENV_AFTER:-}"
for port in 8121 8122; do
    until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do sleep 1; done
done
for round in $(seq 1 "$rounds"); do
    for conc in ${CONCS:-1 16}; do
        num=$([ "$conc" = 1 ] && echo "$n1" || echo "$n16")
        for side in before after; do
            port=$([ "$side" = before ] && echo 8121 || echo 8122)
            PYTHONPATH=$after_src "$py" -m fitserve bench --base-url "http://127.0.0.1:$port" --input-len 128 \
                --output-len 128 --num-prompts "$num" --max-concurrency "$conc" --vocab-size 32000 --disable-tqdm \
                --save-result "$out/$side-c$conc-r$round.json" --metadata "side=$side" "round=$round" \
                | grep -E "Output token throughput|Median TPOT|Median TTFT" | sed "s/^/$side c$conc r$round: /"
        done
    done
done
