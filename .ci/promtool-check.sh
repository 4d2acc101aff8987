#!/usr/bin/env bash
# A real Prometheus scrape of a running keymux must pass `promtool check metrics`.
#
# Starts `keymux demo` (keymux in front of the built-in fake provider, one key revoked), sends a
# little more traffic so every metric family has samples (tokens from JSON and SSE, both
# providers), scrapes the admin listener and lints the scrape. Installs Debian's `prometheus`
# package (which ships promtool) when promtool is missing; CI runs as root.
#
# Usage: .ci/promtool-check.sh            (PYTHON=/path/to/python to pick the interpreter)
set -euo pipefail

cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

if ! command -v promtool >/dev/null 2>&1; then
    echo "promtool-check: promtool not found; installing Debian's prometheus package" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

work="$(mktemp -d)"
demo_pid=""
cleanup() {
    if [[ -n "$demo_pid" ]] && kill -0 "$demo_pid" 2>/dev/null; then
        kill "$demo_pid" 2>/dev/null || true
        wait "$demo_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# Two free loopback ports, one for the app listener and one for the admin listener.
read -r port admin_port < <("$PYTHON" - <<'EOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
for s in socks:
    s.close()
EOF
)

"$PYTHON" -m sidecar demo --port "$port" --admin-port "$admin_port" >"$work/demo.log" 2>&1 &
demo_pid=$!

# The demo prints its instructions once the walk-through is done and it keeps serving.
for _ in $(seq 1 300); do
    grep -q "keymux is serving" "$work/demo.log" && break
    kill -0 "$demo_pid" 2>/dev/null || { cat "$work/demo.log" >&2; echo "promtool-check: the demo exited" >&2; exit 1; }
    sleep 0.1
done
grep -q "keymux is serving" "$work/demo.log" || { cat "$work/demo.log" >&2; echo "promtool-check: the demo did not start" >&2; exit 1; }

"$PYTHON" - "$port" "$admin_port" "$work/metrics.txt" <<'EOF'
import json
import sys
import urllib.request

port, admin_port, out = sys.argv[1], sys.argv[2], sys.argv[3]
app = f"http://127.0.0.1:{port}"
chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
message = {"model": "claude-3-5-haiku", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
requests = [
    ("/openai/v1/chat/completions", {**chat, "stream": True, "stream_options": {"include_usage": True}}),
    ("/anthropic/v1/messages", message),
    ("/anthropic/v1/messages", {**message, "stream": True}),
]
for path, body in requests:
    request = urllib.request.Request(
        app + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()
with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as response:
    content_type = response.headers.get("Content-Type", "")
    text = response.read().decode()
if not content_type.startswith("text/plain"):
    sys.exit(f"promtool-check: /metrics answered Content-Type {content_type!r}")
for family in ("keymux_requests_total", "keymux_tokens_total", "keymux_key_state", "keymux_build_info"):
    if f"\n{family}{{" not in text:
        sys.exit(f"promtool-check: the scrape has no {family} sample")
with open(out, "w") as f:
    f.write(text)
EOF

if ! promtool check metrics <"$work/metrics.txt"; then
    echo "promtool-check: promtool rejected the scrape of keymux's /metrics" >&2
    exit 1
fi
echo "promtool-check: $(grep -c '^keymux_' "$work/metrics.txt") samples from a live keymux pass promtool check metrics"
