"""`keymux demo`: the sidecar in front of the built-in fake provider, with one revoked key.

No real key and no network: a newcomer sees rotation, retries and the health table at once.
"""

from __future__ import annotations

import asyncio
import json
import signal

import aiohttp
from aiohttp import web

from sidecar.config import load_config
from sidecar.fake_provider import FakeProvider
from sidecar.server import Sidecar, configure_logging

DEMO_KEYS = {
    "demo-a": "fk-demo-aaaaaaaaaaaa1111",
    "demo-b": "fk-demo-bbbbbbbbbbbb2222",
    "demo-c": "fk-demo-cccccccccccc3333",
}
REVOKED = "demo-b"

DEMO_CONFIG = """
listen: 127.0.0.1:{port}
admin_listen: 127.0.0.1:{admin_port}
log_level: warning
providers:
  openai:
    type: openai
    base_url: http://127.0.0.1:{fake_port}
    keys:
{keys}
  anthropic:
    type: anthropic
    base_url: http://127.0.0.1:{fake_port}
    keys:
      - name: claude-a
        key: fk-demo-claude-a-4444
routes:
  - prefix: /openai
    providers: [openai]
  - prefix: /anthropic
    providers: [anthropic]
"""


def demo_config_text(port: int, admin_port: int, fake_port: int) -> str:
    keys = "\n".join(f"      - name: {name}\n        key: {secret}" for name, secret in DEMO_KEYS.items())
    return DEMO_CONFIG.format(port=port, admin_port=admin_port, fake_port=fake_port, keys=keys)


async def run_demo(port: int, admin_port: int, exit_after_showing: bool) -> int:
    fake = FakeProvider(revoked={DEMO_KEYS[REVOKED]})
    runner = web.AppRunner(fake.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake_port = int(runner.addresses[0][1])
    config = load_config(demo_config_text(port, admin_port, fake_port), {}, lambda p: "")
    sidecar = Sidecar(config)
    configure_logging(config, sidecar)
    await sidecar.start()
    try:
        await _walk_through(sidecar, fake)
        if not exit_after_showing:
            print(_instructions(port, admin_port))
            await _wait_for_signal()
    finally:
        await sidecar.stop()
        await runner.cleanup()
    return 0


async def _walk_through(sidecar: Sidecar, fake: FakeProvider) -> None:
    port = sidecar.port("app")
    names = {secret: name for name, secret in DEMO_KEYS.items()}
    print(f"keymux demo: 3 OpenAI keys ({', '.join(DEMO_KEYS)}); {REVOKED} is revoked at the fake provider.\n")
    async with aiohttp.ClientSession() as session:
        for i in range(1, 7):
            before = len(fake.seen)
            async with session.post(
                f"http://127.0.0.1:{port}/openai/v1/chat/completions",
                json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": "Bearer placeholder"},
            ) as response:
                await response.read()
            tried = [names.get(s.key or "", "?") for s in list(fake.seen)[before:]]
            path = " -> ".join(tried)
            note = f"  ({REVOKED} answered 401: disabled, retried at once)" if REVOKED in tried else ""
            print(f"request {i}: HTTP {response.status} via {path}{note}")
    print("\nkey health (GET /keys on the admin port):")
    for row in sidecar.key_table():
        print("  " + json.dumps(row))


def _instructions(port: int, admin_port: int) -> str:
    return f"""
keymux is serving on http://127.0.0.1:{port} (admin: http://127.0.0.1:{admin_port}). Try:
  curl -s http://127.0.0.1:{port}/openai/v1/chat/completions -H 'content-type: application/json' \\
       -d '{{"model": "gpt-4o-mini", "messages": [{{"role": "user", "content": "hi"}}]}}'
  curl -s http://127.0.0.1:{admin_port}/keys
  curl -s http://127.0.0.1:{admin_port}/metrics | grep keymux_upstream_attempts
Ctrl-C to stop."""


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
