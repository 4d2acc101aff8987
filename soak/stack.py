"""The fake provider and keymux on loopback in one process, and counts of what each holds open.

Shared by the soak and the reliability suites (tests/test_faults.py and friends): they all need
to start the two servers, drive requests through real sockets, and then prove that nothing was
left behind: no upstream request still being answered, no request in flight, no connection
checked out of keymux's pool, no task, no file descriptor.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import socket
import textwrap
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config import load_config
from sidecar.fake_provider import FakeProvider
from sidecar.server import Sidecar

LOOPBACK = "127.0.0.1"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

QUIET = {"upstream_active": 0, "inflight": 0, "upstream_in_use": 0, "app_connections": 0}


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS line")


def parse_metrics(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric_sum(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name` over every series carrying these labels."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


async def _serve(app: web.Application, port: int = 0) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, port)
    await site.start()
    return runner, int(runner.addresses[0][1])


@dataclass
class Upstream:
    """The fake provider on a loopback port."""

    provider: FakeProvider
    runner: web.AppRunner
    url: str

    @property
    def connections(self) -> int:
        server = self.runner.server
        return 0 if server is None else len(server.connections)

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_upstream(provider: FakeProvider | None = None) -> Upstream:
    provider = provider or FakeProvider()
    runner, port = await _serve(provider.app())
    return Upstream(provider, runner, f"http://{LOOPBACK}:{port}")


class Tripwire:
    """A loopback listener that no request may ever reach: it counts every connection."""

    def __init__(self) -> None:
        self.connections = 0
        self.received = b""
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> Tripwire:
        self._server = await asyncio.start_server(self._accept, LOOPBACK, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(TimeoutError, OSError):
            self.received += await asyncio.wait_for(reader.read(4096), 1.0)
        writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def keymux_busy(sidecar: Sidecar) -> dict[str, int]:
    """Requests in flight, upstream connections checked out and idle in keymux's pool, and
    connections open on its app listener."""
    session = sidecar.proxy.session
    connector = session.connector if session is not None else None
    runners = sidecar._runners
    runner = runners.get("app") if isinstance(runners, dict) else (runners[-1] if runners else None)
    app_server = runner.server if runner is not None else None
    return {
        "inflight": int(sidecar.metrics.inflight.value),
        "upstream_in_use": connections_checked_out(connector) if connector is not None else 0,
        "upstream_idle": connections_idle(connector) if connector is not None else 0,
        "app_connections": len(app_server.connections) if app_server is not None else 0,
    }


# aiohttp has no public count of a client pool's connections, and no public way to give an
# existing connector another resolver (keymux builds its own). These functions are the only
# places that reach inside aiohttp; tests/test_faults.py checks on every run that what they read
# still means what it did, so an aiohttp release that renames it fails there, by name, instead of
# letting every leak check pass by counting nothing.


def connections_checked_out(connector: aiohttp.BaseConnector) -> int:
    """Connections lent to a request now (connecting ones included). Reads aiohttp's private
    `BaseConnector._acquired`: the set of protocols checked out of the pool."""
    return len(_aiohttp_private(connector, "_acquired"))


def connections_idle(connector: aiohttp.BaseConnector) -> int:
    """Connections kept alive in the pool for reuse. Reads aiohttp's private
    `BaseConnector._conns`: ConnectionKey -> list of (protocol, time released)."""
    return sum(len(pooled) for pooled in _aiohttp_private(connector, "_conns").values())


def use_resolver(connector: aiohttp.BaseConnector, resolver: AbstractResolver) -> None:
    """Make `connector` look names up with `resolver`. Writes aiohttp's private
    `TCPConnector._resolver`; it is read first, so a rename fails here instead of quietly
    leaving the real resolver in charge."""
    _aiohttp_private(connector, "_resolver")
    connector._resolver = resolver  # type: ignore[attr-defined]


def _aiohttp_private(obj: object, name: str) -> Any:
    try:
        return getattr(obj, name)
    except AttributeError:
        raise AttributeError(
            f"aiohttp {aiohttp.__version__} has no {type(obj).__name__}.{name}: soak/stack.py reads it "
            "to count connections and to swap resolvers, and needs another way in"
        ) from None


class StubResolver(AbstractResolver):
    """Loopback DNS for keymux's client: the names it knows go to their ports, any other name
    to `default` (a Tripwire); every name asked for is recorded."""

    def __init__(self, ports: dict[str, int], default: int) -> None:
        self.ports = ports
        self.default = default
        self.asked: list[str] = []

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        self.asked.append(host)
        found = self.ports.get(host, self.default)
        return [ResolveResult(hostname=host, host=LOOPBACK, port=found, family=socket.AF_INET, proto=0, flags=0)]

    async def close(self) -> None:
        return None


@dataclass
class Stack:
    """keymux in front of the fake provider, and an app-side client session."""

    upstream: Upstream
    sidecar: Sidecar
    url: str  # the app listener
    admin: str
    client: aiohttp.ClientSession
    baseline: Baseline
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    _closed: bool = field(default=False, repr=False)

    @property
    def provider(self) -> FakeProvider:
        return self.upstream.provider

    def resolve_with(self, resolver: AbstractResolver) -> None:
        """Make keymux's upstream client look names up with `resolver` (before any request)."""
        session = self.sidecar.proxy.session
        assert session is not None and session.connector is not None
        use_resolver(session.connector, resolver)

    async def metrics(self) -> Samples:
        # A session of its own: the app-side client may be closed already, and admin
        # connections must not count as app connections.
        async with aiohttp.ClientSession() as session, session.get(self.admin + "/metrics") as response:
            return parse_metrics(await response.text())

    async def keys(self) -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as session, session.get(self.admin + "/keys") as response:
            return (await response.json())["keys"]

    async def attempts(self, **labels: str) -> float:
        return metric_sum(await self.metrics(), "keymux_upstream_attempts_total", **labels)

    def busy(self) -> dict[str, int]:
        """What is still going on; QUIET when every exchange has ended."""
        inside = keymux_busy(self.sidecar)
        del inside["upstream_idle"]
        return {"upstream_active": self.provider.active, **inside}

    async def quiet(self, timeout: float = 5.0) -> dict[str, int]:
        """Close the app's connections, wait for every exchange to end, and say what is left."""
        await self.client.close()
        return await wait_for_value(self.busy, QUIET, timeout)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.client.close()
        await self.sidecar.stop()
        await self.upstream.close()
        for close in self.closers:
            await close()

    async def finish(self) -> Ending:
        """End the scenario: wait for quiet, read the metrics, close everything, count leftovers."""
        busy = await self.quiet()
        samples = await self.metrics()
        await self.close()
        return Ending(
            busy=busy,
            inflight_gauge=metric_sum(samples, "keymux_inflight_requests"),
            attempts=metric_sum(samples, "keymux_upstream_attempts_total"),
            upstream_requests=len(self.provider.seen),
            leftovers=await self.baseline.leftovers(),
            samples=samples,
        )


CLEAN = {"busy": QUIET, "inflight_gauge": 0.0, "leftovers": {"tasks": 0, "fds": 0}}


@dataclass
class Ending:
    busy: dict[str, int]
    inflight_gauge: float
    attempts: float  # the sum of keymux_upstream_attempts_total
    upstream_requests: int  # requests that reached the fake provider
    leftovers: dict[str, int]
    samples: Samples = field(repr=False)

    def state(self) -> dict[str, Any]:
        """Compare with CLEAN: nothing busy, nothing in flight, nothing left behind."""
        return {"busy": self.busy, "inflight_gauge": self.inflight_gauge, "leftovers": self.leftovers}

    def attempts_by(self, *labels: str) -> dict[tuple[str, ...], float]:
        """keymux_upstream_attempts_total by the given labels, zero series left out."""
        found: dict[tuple[str, ...], float] = {}
        for (name, series), value in self.samples.items():
            if name == "keymux_upstream_attempts_total" and value:
                values = dict(series)
                group = tuple(values[label] for label in labels)
                found[group] = found.get(group, 0.0) + value
        return found


async def start_stack(
    yaml_text: str,
    *,
    provider: FakeProvider | None = None,
    clock: Callable[[], float] | None = None,
    env: dict[str, str] | None = None,
    baseline: Baseline | None = None,
) -> Stack:
    """keymux from YAML text in which `{base_url}` stands for the fake provider's URL.

    The baseline of tasks and descriptors is taken first (or given, when the caller started
    something of its own before), so `finish()` can tell what the scenario left behind.
    """
    baseline = baseline or await Baseline.take()
    upstream = await start_upstream(provider)
    text = textwrap.dedent(yaml_text).replace("{base_url}", upstream.url)
    if "listen:" not in text:
        text = f"listen: {LOOPBACK}:0\nadmin_listen: {LOOPBACK}:0\n" + text
    config = load_config(text, env or {}, lambda path: "")
    extra: dict[str, Any] = {} if clock is None else {"clock": clock}
    sidecar = Sidecar(config, env=env or {}, **extra)
    await sidecar.start()
    client = aiohttp.ClientSession()
    app, admin = sidecar.port("app"), sidecar.port("admin")
    return Stack(upstream, sidecar, f"http://{LOOPBACK}:{app}", f"http://{LOOPBACK}:{admin}", client, baseline)


async def wait_for_value(probe: Callable[[], Any], wanted: Any, timeout: float) -> Any:
    """Poll `probe` until it returns `wanted` or the time is up; return what it last said."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    value = probe()
    while value != wanted and loop.time() < deadline:
        await asyncio.sleep(0.02)
        value = probe()
    return value


@dataclass
class Answer:
    """What the app received: status, headers, body, and what cut the body short if anything."""

    status: int
    headers: dict[str, str]
    raw_headers: bytes
    body: bytes
    broken: str | None = None  # the exception class that ended the body early

    def json(self) -> Any:
        return json.loads(self.body)


def chat(model: str | None = "gpt-4o", stream: bool = False) -> bytes:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}
    if model is not None:
        body["model"] = model
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


async def ask(
    session: aiohttp.ClientSession,
    url: str,
    *,
    body: bytes | None = None,
    method: str = "POST",
    headers: dict[str, str] | None = None,
    timeout: float = 20.0,
) -> Answer:
    """One app request; a body cut short is reported in `broken`, not raised."""
    sent = {"Content-Type": "application/json", "Authorization": "Bearer app-placeholder"}
    sent.update(headers or {})
    request_timeout = aiohttp.ClientTimeout(total=timeout)
    async with session.request(method, url, data=body, headers=sent, timeout=request_timeout) as response:
        chunks = []
        broken = None
        try:
            async for chunk in response.content.iter_any():
                chunks.append(chunk)
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
            broken = type(exc).__name__
        raw = b"".join(k + b": " + v + b"\r\n" for k, v in response.raw_headers)
        return Answer(response.status, dict(response.headers), raw, b"".join(chunks), broken)


async def send_raw(url: str, data: bytes, timeout: float = 5.0) -> bytes:
    """Write raw bytes to a listener and return everything it answers until it closes."""
    host, _, port = url.removeprefix("http://").partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def raw_status(answer: bytes) -> int:
    """The status code of the first response in raw bytes (0 when there is none)."""
    line = answer.split(b"\r\n", 1)[0].split()
    return int(line[1]) if len(line) > 1 and line[0].startswith(b"HTTP/") else 0


class Baseline:
    """Tasks and file descriptors of this process before a scenario, to compare after it."""

    def __init__(self, tasks: int, fds: int) -> None:
        self.tasks = tasks
        self.fds = fds

    @classmethod
    async def take(cls) -> Baseline:
        """Count once earlier scenarios' garbage is gone: finalizers (of SDK clients, say) close
        sockets and start closing tasks when collected, which must not happen mid-scenario."""
        gc.collect()
        counts = (len(asyncio.all_tasks()), open_fds())
        for _ in range(50):  # until two looks a tick apart agree
            await asyncio.sleep(0.01)
            previous, counts = counts, (len(asyncio.all_tasks()), open_fds())
            if counts == previous:
                break
        return cls(*counts)

    def _extra(self) -> dict[str, int]:
        gc.collect()
        return {"tasks": len(asyncio.all_tasks()) - self.tasks, "fds": open_fds() - self.fds}

    async def leftovers(self, timeout: float = 5.0) -> dict[str, int]:
        """What the scenario left behind once everything it started was closed."""
        return await wait_for_value(self._extra, {"tasks": 0, "fds": 0}, timeout)
