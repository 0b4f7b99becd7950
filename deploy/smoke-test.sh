#!/usr/bin/env bash
# Container smoke test: build the CPU image, run it the way the guide runs the vLLM image (the model
# cache a root-owned host folder, vLLM's flags as arguments), check /health, the image's HEALTHCHECK
# and one chat completion through the published port on 127.0.0.1, then stop it with SIGTERM.
#
# Usage: deploy/smoke-test.sh          (needs a running Docker engine and python3; about 3 minutes
#                                       on 2 cores with a warm layer cache)
# Settings (environment):
#   SMOKE_IMAGE       tag to build (fitserve:cpu-smoke)
#   BASE_IMAGE        base for the build; default: fitserve-base:bookworm if present, else made by
#                     deploy/make-base-image.sh when debootstrap is installed (no image registry
#                     needed), else debian:bookworm-slim from a registry
#   TORCH_INDEX_URL   where the CPU torch comes from; default: a torch==2.13.0+cpu wheel that this
#                     host's pip can find (served to the build on 127.0.0.1), else PyTorch's CPU index
#   SMOKE_TIMEOUT_S   how long the server may take to answer /health (300)
set -euo pipefail
cd "$(dirname "$0")/.."

image=${SMOKE_IMAGE:-fitserve:cpu-smoke}
torch_version=2.13.0
health_timeout_s=${SMOKE_TIMEOUT_S:-300}
healthcheck_timeout_s=60   # the HEALTHCHECK runs every 15 s; three chances to turn healthy
build_timeout_s=900
stable_wheel_port=38123
name=fitserve-smoke-$$
work=$(mktemp -d "${TMPDIR:-/tmp}/fitserve-smoke.XXXXXX")
wheel_server_pid=

log() { echo "smoke: $*"; }
fail() { echo "smoke: FAIL: $*" >&2; exit 1; }
cleanup() {
    docker rm -f "$name" >/dev/null 2>&1 || true
    if [[ -n "$wheel_server_pid" ]]; then kill "$wheel_server_pid" 2>/dev/null || true; fi
    rm -rf "$work" 2>/dev/null || true
}
trap cleanup EXIT

# A free port on 127.0.0.1: $1 if it is free, else any.
free_port() {
    python3 -c 'import socket, sys
for port in (int(sys.argv[1]), 0):
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
            print(s.getsockname()[1])
            break
    except OSError:
        pass' "${1:-0}"
}

docker info >/dev/null 2>&1 || fail "no Docker engine answers (start dockerd first)"

# 1. The base image.
if [[ -z "${BASE_IMAGE:-}" ]]; then
    BASE_IMAGE=fitserve-base:bookworm
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        log "base image $BASE_IMAGE (already made)"
    elif command -v debootstrap >/dev/null && [[ $(id -u) == 0 ]]; then
        deploy/make-base-image.sh "$BASE_IMAGE"
    else
        BASE_IMAGE=debian:bookworm-slim
        log "base image $BASE_IMAGE (from a registry)"
    fi
fi

# 2. Where the CPU torch comes from.
build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "TORCH_SPEC=torch==$torch_version+cpu")
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    build_args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
elif python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
        --platform manylinux_2_28_x86_64 -d "$work/wheels" "torch==$torch_version+cpu" >/dev/null 2>&1; then
    # A fixed port when it is free: the URL is a build argument, so part of the layer cache's key.
    wheel_port=$(free_port "$stable_wheel_port")
    python3 -m http.server --bind 127.0.0.1 --directory "$work/wheels" "$wheel_port" >/dev/null 2>&1 &
    wheel_server_pid=$!
    build_args+=(--build-arg "WHEELS_URL=http://127.0.0.1:$wheel_port/")
    log "torch: $(ls "$work/wheels") from this host, served to the build on 127.0.0.1:$wheel_port"
else
    build_args+=(--build-arg "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu")
fi

# 3. Build. --network host: the build reaches the package registries (and the wheel server) as this
# host does.
log "building $image"
start_s=$SECONDS
timeout "$build_timeout_s" docker build --network host -q -t "$image" "${build_args[@]}" . >"$work/build.log" 2>&1 || {
    tail -40 "$work/build.log" >&2
    fail "docker build"
}
log "built $image in $((SECONDS - start_s)) s, $(docker image inspect -f '{{.Size}}' "$image" | numfmt --to=iec)"

# 4. Run it as the guide runs vLLM's image: a root-made host folder as the model cache, vLLM's flags.
# HF_HUB_OFFLINE=1: the embedded model must need no download.
port=$(free_port)
mkdir -m 0700 "$work/models"
docker run -d --name "$name" --ipc=host -p "127.0.0.1:$port:8000" \
    -v "$work/models:/root/.cache/huggingface" -e HF_TOKEN=unused -e HF_HUB_OFFLINE=1 \
    "$image" --gpu-memory-utilization 0.90 --max-num-seqs 16 >/dev/null
log "started $name: docker run ... -p 127.0.0.1:$port:8000 $image --gpu-memory-utilization 0.90 --max-num-seqs 16"

# 5. /health through the published port.
start_s=$SECONDS
until [[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health") == 200 ]]; do
    if [[ $(docker inspect -f '{{.State.Running}}' "$name") != true ]]; then
        docker logs "$name" 2>&1 | tail -30 >&2
        fail "the container exited ($(docker inspect -f '{{.State.ExitCode}}' "$name"))"
    fi
    ((SECONDS - start_s < health_timeout_s)) || { docker logs "$name" 2>&1 | tail -30 >&2; fail "no 200 from /health in $health_timeout_s s"; }
    sleep 2
done
log "GET /health -> 200 after $((SECONDS - start_s)) s"

# 6. One chat completion.
reply=$(curl -s --max-time 120 "http://127.0.0.1:$port/v1/chat/completions" -H "Content-Type: application/json" \
    -d '{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "What is the capital of France?"}],
         "max_tokens": 24, "temperature": 0}')
python3 - "$reply" <<'EOF' || fail "chat completion: $reply"
import json, sys
reply = json.loads(sys.argv[1])
text = reply["choices"][0]["message"]["content"]
assert text.strip(), "empty completion"
print(f"smoke: POST /v1/chat/completions -> {json.dumps(text)} ({reply['usage']['completion_tokens']} tokens, "
      f"finish_reason {reply['choices'][0]['finish_reason']})")
EOF

# 7. What the container is: the image's HEALTHCHECK, the server's user, the cache folder's owner.
start_s=$SECONDS
until [[ $(docker inspect -f '{{.State.Health.Status}}' "$name") == healthy ]]; do
    ((SECONDS - start_s < healthcheck_timeout_s)) || fail "HEALTHCHECK still $(docker inspect -f '{{.State.Health.Status}}' "$name")"
    sleep 2
done
log "HEALTHCHECK: healthy"
server_uid=$(docker top "$name" -o pid,uid,args | awk '/fitserve serve/ {print $2; exit}')
[[ $server_uid == 1000 ]] || fail "the server runs as uid '$server_uid', not 1000"
log "server process uid $server_uid; model cache owned by uid $(stat -c %u "$work/models") (the entrypoint gave the root-made folder to fitserve)"

# 8. Stop it as docker stop and Kubernetes do: SIGTERM, then SIGKILL after the grace period.
start_s=$SECONDS
docker stop -t 30 "$name" >/dev/null
log "docker stop: exited $(docker inspect -f '{{.State.ExitCode}}' "$name") after $((SECONDS - start_s)) s"
log "PASS"
