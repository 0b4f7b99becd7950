#!/usr/bin/env bash
# OpenMP wait policies for `fitserve serve` on the CPU (the embedded model) through HTTP, one server at
# a time (a spinning server left idle beside another takes its cores: cpu_http_ab.sh cannot compare
# them). PASSIVE (fitserve's default), SPIN300K (ACTIVE with GOMP_SPINCOUNT=300000: libgomp's own
# default when OMP_WAIT_POLICY is unset, as fitserve ran before it set PASSIVE) and ACTIVE (spin
# forever); per round each setting serves N1 requests one at a time, then N16 at 16 concurrent
# (128 prompt and 128 output token ids, ignore_eos, streamed).
#
#   ROUNDS=2 benchmarks/cpu_waitpolicy.sh            # JSON under $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
out=${OUT:-benchmarks/results/cpu_waitpolicy}
port=${PORT:-8141}
mkdir -p "$out"
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null' EXIT
for round in $(seq 1 "${ROUNDS:-2}"); do
    for setting in PASSIVE SPIN300K ACTIVE; do
        case $setting in
            PASSIVE) envs="OMP_WAIT_POLICY=PASSIVE" ;;
            SPIN300K) envs="OMP_WAIT_POLICY=ACTIVE GOMP_SPINCOUNT=300000" ;;
            ACTIVE) envs="OMP_WAIT_POLICY=ACTIVE" ;;
        esac
        env $envs PYTHONPATH="$PWD/src" "$py" -m fitserve serve --port "$port" >"$out/$setting-r$round-serve.log" 2>&1 &
        pid=$!
        until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do sleep 0.5; done
        for conc in 1 16; do
            num=$([ "$conc" = 1 ] && echo "${N1:-3}" || echo "${N16:-32}")
            PYTHONPATH="$PWD/src" "$py" -m fitserve bench --base-url "http://127.0.0.1:$port" --input-len 128 \
                --output-len 128 --num-prompts "$num" --max-concurrency "$conc" --vocab-size 32000 --disable-tqdm \
                --save-result "$out/$setting-c$conc-r$round.json" --metadata "setting=$setting" "round=$round" \
                | grep -E "Output token throughput|Median TPOT" | sed "s/^/$setting c$conc r$round: /"
        done
        kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
    done
done
