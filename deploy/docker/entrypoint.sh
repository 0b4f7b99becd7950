#!/bin/sh
# The image's entrypoint: `fitserve serve --host 0.0.0.0 ARGS...`, so that the image takes the same
# arguments as vLLM's (`docker run IMAGE --model X --gpu-memory-utilization 0.90`). A --host in ARGS
# still wins: argparse keeps the last one. `docker run IMAGE fitserve|bash|sh|python3 ...` runs
# that command instead.
#
# Started as root (plain `docker run`), it first makes the model cache writable by the fitserve user
# (a host folder made by root, as in `-v /opt/models:/root/.cache/huggingface`), then drops to that
# user. Started as another user (Kubernetes runAsUser, `docker run --user`), it changes nothing.
set -eu

case "${1:-}" in
    fitserve|bash|sh|python|python3) run_as_given=1 ;;
    *) run_as_given=0 ;;
esac

if [ "$run_as_given" = 0 ]; then
    # The port, for the HEALTHCHECK (fitserve-healthcheck reads it): --port N or --port=N.
    port=8000
    previous=
    for arg in "$@"; do
        case "$previous" in --port) port=$arg ;; esac
        case "$arg" in --port=*) port=${arg#--port=} ;; esac
        previous=$arg
    done
    echo "$port" > /tmp/fitserve-port 2>/dev/null || true
    set -- fitserve serve --host 0.0.0.0 "$@"
fi

if [ "$(id -u)" = 0 ] && [ "${FITSERVE_RUN_AS_ROOT:-0}" != 1 ]; then
    for cache in "${HF_HOME:-/root/.cache/huggingface}" ${HF_HUB_CACHE:+"$HF_HUB_CACHE"}; do
        mkdir -p "$cache"
        if [ "$(stat -c %U "$cache")" != fitserve ]; then
            echo "fitserve-entrypoint: giving $cache to user fitserve (uid $(id -u fitserve)) so that downloads can be written" >&2
            chown -R fitserve:fitserve "$cache" ||
                echo "fitserve-entrypoint: could not chown $cache (read-only?); the cache must already hold the model" >&2
        fi
    done
    export HOME=/home/fitserve USER=fitserve
    exec setpriv --reuid=fitserve --regid=fitserve --init-groups -- "$@"
fi
exec "$@"
