"""Shared harness: the fake provider and keymux, both on real loopback sockets."""

from __future__ import annotations

import asyncio
import gc
import json
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import anthropic  # noqa: F401 (imported before the freeze below)
import hypothesis  # noqa: F401 (imported before the freeze below)
import openai  # noqa: F401 (imported before the freeze below)
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config import load_config
from sidecar.fake_provider import FakeProvider
from sidecar.server import Sidecar

# The leak checks collect garbage before and after each scenario (soak/stack.py), and a full
# collection walks every object the collector tracks: with the SDKs loaded that is some 230,000
# objects and 0.1 s a collection, 25 s over the suite. What the imports allocated lives as long
# as the process, so it moves to the permanent generation, which collections skip.
gc.collect()
gc.freeze()


@dataclass
class FakeServer:
    provider: FakeProvider
    url: str


@dataclass
class Running:
    sidecar: Sidecar
    url: str  # the app listener
    admin: str  # the admin listener
    session: aiohttp.ClientSession

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics, keyed by (name, sorted labels)."""
        async with self.session.get(self.admin + "/metrics") as response:
            text = await response.text()
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    async def value(self, name: str, **labels: str) -> float:
        samples = await self.metrics()
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    async def total(self, name: str, **labels: str) -> float:
        """The sum of `name` over every series that has these labels."""
        samples = await self.metrics()
        wanted = set(labels.items())
        return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


@pytest.fixture
async def fake() -> AsyncIterator[FakeServer]:
    provider = FakeProvider()
    runner = web.AppRunner(provider.app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield FakeServer(provider, f"http://127.0.0.1:{runner.addresses[0][1]}")
    await runner.cleanup()


StartKeymux = Callable[..., Awaitable[Running]]


@pytest.fixture
async def keymux() -> AsyncIterator[StartKeymux]:
    """Start keymux from YAML text (listeners on port 0 unless the YAML says otherwise)."""
    started: list[Running] = []

    async def start(
        yaml_text: str,
        env: dict[str, str] | None = None,
        files: dict[str, str] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> Running:
        text = textwrap.dedent(yaml_text)
        if "listen:" not in text:
            text = "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n" + text
        config = load_config(text, env or {}, lambda path: (files or {})[path])
        sidecar = Sidecar(config, env=env or {}, **({"clock": clock} if clock is not None else {}))
        await sidecar.start()
        session = aiohttp.ClientSession()
        running = Running(
            sidecar, f"http://127.0.0.1:{sidecar.port('app')}", f"http://127.0.0.1:{sidecar.port('admin')}", session
        )
        started.append(running)
        return running

    yield start
    for running in started:
        await running.session.close()
        await running.sidecar.stop()


def provider_config(type_: str, base_url: str, keys: dict[str, str], extra: str = "") -> str:
    """A one-provider config of `type_` (also its name): keys is name -> secret."""
    lines = "\n".join(f"      - name: {name}\n        key: {secret}" for name, secret in keys.items())
    return f"providers:\n  {type_}:\n    type: {type_}\n    base_url: {base_url}\n    keys:\n{lines}\n{extra}"


def openai_config(base_url: str, keys: dict[str, str], extra: str = "") -> str:
    return provider_config("openai", base_url, keys, extra)


async def read_json_log(process: asyncio.subprocess.Process, into: list[dict[str, object]]) -> None:
    """Collect a keymux subprocess's JSON log lines from its stderr (a line that is not JSON as its msg)."""
    assert process.stderr is not None
    async for raw in process.stderr:
        line = raw.decode(errors="replace").strip()
        try:
            into.append(json.loads(line))
        except ValueError:
            into.append({"msg": line})
