#!/usr/bin/env bash
# CPU settings or source trees through HTTP, one server at a time: `fitserve serve` (the embedded
# model) per variant, benched by `fitserve bench` with N1 requests one at a time, then N16 at 16
# concurrent (128 prompt and 128 output token ids, ignore_eos, streamed); ROUNDS rounds, the
# variants in turn within each round. One server at a time, because a server whose OpenMP threads
# spin takes the cores of another left idle beside it. (It replaces cpu_http_ab.sh, which ran a
# before and an after server side by side: `"before=OLD/src,," "after=.,,"` does the same here.)
#
# A variant is NAME=SRC,ENV,FLAGS: SRC a tree's src folder ("." for this one), ENV space-separated
# assignments for the server, FLAGS extra `fitserve serve` flags; ENV and FLAGS may be empty.
#
#   ROUNDS=3 benchmarks/cpu_http_seq.sh "old=/tmp/old/src,," "new=.,GOMP_SPINCOUNT=30000,--dtype bfloat16"
#
# JSON under $OUT (default benchmarks/results/cpu_http_seq), one file per variant, concurrency and round.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
out=${OUT:-benchmarks/results/cpu_http_seq}
port=${PORT:-8141}
mkdir -p "$out"
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null' EXIT
for round in $(seq 1 "${ROUNDS:-2}"); do
    for variant in "$@"; do
        name=${variant%%=*}
        IFS=, read -r src envs flags <<<"${variant#*=}"
        [ "$src" = . ] && src=$PWD/src
        echo "# $name r$round: load $(cut -d' ' -f1-3 /proc/loadavg)"
        env $envs PYTHONPATH="$src" "$py" -m fitserve serve --port "$port" $flags >"$out/$name-r$round-serve.log" 2>&1 &
        pid=$!
        until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do sleep 0.5; done
        for conc in 1 16; do
            num=$([ "$conc" = 1 ] && echo "${N1:-3}" || echo "${N16:-32}")
            PYTHONPATH="$PWD/src" "$py" -m fitserve bench --base-url "http://127.0.0.1:$port" --input-len 128 \
                --output-len 128 --num-prompts "$num" --max-concurrency "$conc" --vocab-size 32000 --disable-tqdm \
                --save-result "$out/$name-c$conc-r$round.json" --metadata "variant=$name" "round=$round" \
                | grep -E "Output token throughput|Median TTFT|Median TPOT" | sed "s/^/$name c$conc r$round: /"
        done
        kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
    done
done
