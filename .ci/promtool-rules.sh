#!/usr/bin/env bash
# The alert rules in deploy/prometheus/keymux-alerts.yaml (a Prometheus Operator PrometheusRule)
# must pass `promtool check rules` and their unit tests, `promtool test rules`.
#
# promtool reads plain rules files, not a PrometheusRule: the manifest's `spec` (its groups) is
# written to a temporary rules file, named as the unit tests' `rule_files` expects, beside a copy
# of the tests. Installs Debian's `prometheus` package (which ships promtool) when promtool is
# missing; CI runs as root.
#
# Usage: .ci/promtool-rules.sh            (PYTHON=/path/to/python to pick the interpreter)
set -euo pipefail

cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

rules=deploy/prometheus/keymux-alerts.yaml
tests=deploy/prometheus/keymux-alerts.test.yaml

if ! command -v promtool >/dev/null 2>&1; then
    echo "promtool-rules: promtool not found; installing Debian's prometheus package" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

rule_file="$("$PYTHON" - "$rules" "$tests" "$work" <<'EOF'
import sys
from pathlib import Path

import yaml

rules, tests, work = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
docs = [doc for doc in yaml.safe_load_all(rules.read_text()) if doc]
if len(docs) != 1 or docs[0].get("kind") != "PrometheusRule":
    sys.exit(f"promtool-rules: {rules} must hold exactly one PrometheusRule")
manifest = docs[0]
if manifest.get("apiVersion") != "monitoring.coreos.com/v1":
    sys.exit(f"promtool-rules: {rules}: apiVersion must be monitoring.coreos.com/v1")
spec = manifest.get("spec") or {}
if set(spec) != {"groups"} or not spec["groups"]:
    sys.exit(f"promtool-rules: {rules}: spec must hold groups, and only groups")
unit_tests = yaml.safe_load(tests.read_text())
[rule_file] = unit_tests["rule_files"]
if "/" in rule_file:
    sys.exit(f"promtool-rules: {tests}: rule_files must name a file beside the tests, got {rule_file!r}")
(work / rule_file).write_text(yaml.safe_dump(spec, sort_keys=False))
(work / tests.name).write_text(tests.read_text())
print(work / rule_file)
EOF
)"

echo "promtool-rules: promtool check rules $rules (spec)"
promtool check rules "$rule_file"
echo "promtool-rules: promtool test rules $tests"
promtool test rules "$work/$(basename "$tests")"
echo "promtool-rules: ok"
