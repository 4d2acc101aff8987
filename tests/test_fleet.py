"""Fleet-wide key health over Redis (issue 12), proven with real processes.

Every test runs several real keymux processes (`python -m sidecar --config FILE`) sharing a Redis:
the machine's (127.0.0.1:6379, under a namespace of the test's own, deleted afterwards) or a
`redis-server` the test starts on a free port when it must kill it or put it to sleep. The fake
provider runs in the test process, so what it saw (`fake.provider.seen`: the secret and model of
every request) is exact. The tests assert outcomes and order: which key each request reached, what
/keys and /metrics say; the only time bounds are generous deadlines so a broken run fails instead
of hanging, and "no request waits for Redis" as a bound far below the Redis stall it rides out.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import secrets
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from redis.exceptions import RedisError

from sidecar.redact import PIECE
from tests.conftest import FakeServer, read_json_log
from tests.redisfix import HOST, SHARED_PORT, Namespace, RedisServer, free_port, unique_namespace

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parent.parent
SHARED_URL = f"redis://{HOST}:{SHARED_PORT}/0"
UNREACHABLE = "shared store unreachable"


def secret(tag: str) -> str:
    return f"sk-{tag}-{secrets.token_hex(20)}"


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


# -- keymux processes ------------------------------------------------------------------------


@dataclass
class Pod:
    """One keymux process, a client session for it and its JSON log."""

    name: str
    process: asyncio.subprocess.Process
    url: str
    admin: str
    session: aiohttp.ClientSession
    log: list[dict[str, Any]] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    async def chat(self, model: str = "gpt-4o") -> tuple[int, float]:
        """One chat completion through this pod: (status, seconds it took)."""
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        started = time.perf_counter()
        async with asyncio.timeout(10), self.session.post(self.url + "/v1/chat/completions", json=body) as response:
            await response.read()
            return response.status, time.perf_counter() - started

    async def get(self, path: str) -> tuple[int, str]:
        async with asyncio.timeout(5), self.session.get(self.admin + path) as response:
            return response.status, await response.text()

    async def rows(self) -> dict[tuple[str, str], dict[str, Any]]:
        """/keys by (key name, model or '*')."""
        _, text = await self.get("/keys")
        return {(row["key"], row["model"]): row for row in json.loads(text)["keys"]}

    async def state(self, key: str, model: str = "*") -> str:
        row = (await self.rows()).get((key, model))
        return "usable" if row is None else row["state"]

    async def until(self, key: str, model: str = "*") -> float | None:
        """When /keys says this rest ends, as a wall-clock timestamp."""
        row = (await self.rows()).get((key, model))
        if row is None or row["until"] is None:
            return None
        return datetime.strptime(row["until"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()

    async def metric(self, name: str, **labels: str) -> float:
        """The sum of `name` over every series with these labels."""
        _, text = await self.get("/metrics")
        wanted = set(labels.items())
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and wanted <= set(sample.labels.items())
        )

    async def store_up(self) -> float:
        return await self.metric("keymux_shared_store_up")

    def logged(self, text: str) -> list[dict[str, Any]]:
        return [line for line in self.log if text in str(line.get("msg", ""))]


@dataclass
class Spec:
    name: str
    keys: list[tuple[str, str]]  # (name, secret), in the order of the config
    shared: dict[str, Any] | None = None
    health: dict[str, Any] | None = None


class Harness:
    """The pods, Redis servers and namespaces of one test, stopped and cleaned in that order."""

    def __init__(self, tmp_path: Path, fake: FakeServer) -> None:
        self.tmp = tmp_path
        self.fake = fake
        self.pods: list[Pod] = []
        self.servers: list[RedisServer] = []
        self.namespaces: list[Namespace] = []
        self.secrets: set[str] = set()
        self.key_names: set[str] = set()

    async def redis_server(self) -> RedisServer:
        server = RedisServer(self.tmp)
        self.servers.append(server)
        await server.start()
        return server

    async def namespace(self, url: str = SHARED_URL, tag: str = "fleet") -> Namespace:
        ns = Namespace(url, unique_namespace(tag))
        self.namespaces.append(ns)
        await ns.start_capture()
        return ns

    @staticmethod
    def shared(ns: Namespace, **overrides: Any) -> dict[str, Any]:
        section = {
            "redis_url": ns.url,
            "namespace": ns.name,
            "timeout": "250ms",
            "connect_timeout": "1s",
            "resync_interval": "5s",
            "probe_lease": "30s",
        }
        return section | overrides

    def config(self, spec: Spec, app: int, admin: int) -> str:
        self.secrets |= {value for _, value in spec.keys}
        self.key_names |= {name for name, _ in spec.keys}
        raw: dict[str, Any] = {
            "listen": f"{HOST}:{app}",
            "admin_listen": f"{HOST}:{admin}",
            "log_level": "warning",
            "providers": {
                "openai": {
                    "type": "openai",
                    "base_url": self.fake.url,
                    "keys": [{"name": name, "key": value} for name, value in spec.keys],
                }
            },
            "retry": {"max_wait": 0},
            "shutdown": {"drain_delay": 0, "drain_timeout": 1},
        }
        if spec.shared is not None:
            raw["shared"] = spec.shared
        if spec.health is not None:
            raw["health"] = spec.health
        return yaml.safe_dump(raw, sort_keys=False)

    async def start(self, specs: Iterable[Spec]) -> list[Pod]:
        """Start these pods side by side; each is returned once its /readyz answers 200."""
        pods = [await self._spawn(spec) for spec in specs]
        await asyncio.gather(*(self._ready(pod) for pod in pods))
        return pods

    async def _spawn(self, spec: Spec) -> Pod:
        app, admin = free_port(), free_port()
        path = self.tmp / f"{spec.name}-{len(self.pods)}.yaml"
        path.write_text(self.config(spec, app, admin))
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "--config", str(path),
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        pod = Pod(spec.name, process, f"http://{HOST}:{app}", f"http://{HOST}:{admin}", aiohttp.ClientSession())
        pod.reader = asyncio.create_task(read_json_log(process, pod.log))
        self.pods.append(pod)
        return pod

    @staticmethod
    async def _ready(pod: Pod) -> None:
        async def ready() -> bool:
            if pod.process.returncode is not None:
                raise AssertionError(f"{pod.name} exited with {pod.process.returncode}: {pod.log}")
            try:
                return (await pod.get("/readyz"))[0] == 200
            except (aiohttp.ClientConnectionError, TimeoutError):
                return False

        await eventually(ready, 15, f"{pod.name} to be ready")

    async def assert_no_secret(self) -> None:
        """Redis never holds a secret, a piece of one, nor a pod's name for a key: every key and
        value of every namespace, and every message captured on its channel."""
        for ns in self.namespaces:
            dumped = await ns.dump()
            blobs = [name + b"\x00" + value for name, value in dumped.items()] + list(ns.captured)
            assert blobs, f"nothing reached {ns.name}: the check would prove nothing"
            for blob in blobs:
                text = blob.decode(errors="replace")
                for value in self.secrets:
                    pieces = {value[i : i + PIECE] for i in range(len(value) - PIECE + 1)}
                    leaked = [piece for piece in pieces if piece in text]
                    assert not leaked, f"a piece of a secret is in Redis: {leaked[:3]} in {text[:200]!r}"
                for name in self.key_names:
                    assert name not in text, f"key name {name!r} is in Redis: {text[:200]!r}"

    async def stop(self, pod: Pod) -> None:
        await pod.session.close()
        if pod.process.returncode is None:
            pod.process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(5):
                    await pod.process.wait()
            except TimeoutError:
                pod.process.kill()
                await pod.process.wait()
        if pod.reader is not None:
            async with asyncio.timeout(5):
                await pod.reader

    async def close(self) -> None:
        for pod in self.pods:
            if pod.process.returncode is None:
                pod.process.send_signal(signal.SIGTERM)
        for pod in self.pods:
            await self.stop(pod)
        for ns in self.namespaces:
            await ns.close()
        for server in self.servers:
            await server.kill()


@pytest.fixture
async def fleet(tmp_path: Path, fake: FakeServer) -> AsyncIterator[Harness]:
    harness = Harness(tmp_path, fake)
    try:
        yield harness
    finally:
        await harness.close()


def seen_since(fake: FakeServer, mark: int) -> list[tuple[str | None, str | None]]:
    """(secret, model) of every request the fake saw after the first `mark`."""
    return [(s.key, s.model) for s in list(fake.provider.seen)[mark:]]


def fingerprint(salt: bytes, value: str) -> str:
    """A key's name in Redis, computed here from the layout fleet.py documents."""
    return hmac.new(salt, value.encode(), hashlib.sha256).hexdigest()[:32]


# -- 1. a revoked key is tried once across the fleet -------------------------------------------


async def test_a_revoked_key_is_tried_once_across_the_fleet_whatever_each_pod_calls_it(fleet, fake):
    ns = await fleet.namespace()
    bad, good = secret("revoked"), secret("good")
    fake.provider.revoked.add(bad)
    # Same secrets, other names, other orders: pod 0 tries the revoked key on its first request,
    # pods 1 and 2 on their second (requests 5 and 6), unless the fleet told them in between.
    orders = [[("bad", bad), ("good", good)], [("good", good), ("bad", bad)], [("good", good), ("bad", bad)]]
    specs = [
        Spec(f"p{i}", [(f"{kind}-key-of-p{i}", value) for kind, value in order], Harness.shared(ns))
        for i, order in enumerate(orders)
    ]
    pods = await fleet.start(specs)

    statuses = [(await pods[i % 3].chat())[0] for i in range(30)]

    assert statuses == [200] * 30
    assert [key for key, _ in seen_since(fake, 0)].count(bad) == 1
    for i, pod in enumerate(pods):
        assert await pod.state(f"bad-key-of-p{i}") == "disabled"
        assert await pod.state(f"good-key-of-p{i}") == "usable"
    for pod in pods[1:]:  # they knew it from the fleet, not from the provider
        assert await pod.metric("keymux_shared_facts_total", direction="in", result="applied") >= 1
    assert await pods[0].metric("keymux_shared_facts_total", direction="out", result="written") >= 1
    await fleet.assert_no_secret()


# -- 2. a 429 or a saturation learned by one pod reaches the others within 100 ms ----------------

FULL = {  # a 200 saying no request is left on this key for this model until the limit resets in 30 s
    "x-ratelimit-limit-requests": "1",
    "x-ratelimit-remaining-requests": "0",
    "x-ratelimit-reset-requests": "30s",
}


async def propagated(pod: Pod, key: str, model: str, state: str, timeout: float = 2.0) -> float:
    """Poll /keys back to back until (key, model) is in `state`: the seconds it took."""
    started = time.perf_counter()
    while await pod.state(key, model) != state:
        assert time.perf_counter() - started < timeout, f"{pod.name} never saw {key} {state} for {model}"
    return time.perf_counter() - started


@pytest.mark.parametrize("kind", ["429", "saturation"])
async def test_a_rest_learned_by_one_pod_is_honoured_by_another_within_100_ms(fleet, fake, kind):
    ns = await fleet.namespace()
    first, second = secret("first"), secret("second")
    a, b = await fleet.start(
        [
            Spec("a", [("a-first", first), ("a-second", second)], Harness.shared(ns)),
            Spec("b", [("b-first", first), ("b-second", second)], Harness.shared(ns)),
        ]
    )
    state = "cooling" if kind == "429" else "saturated"
    delays = []
    for trial in range(5):
        model = f"{kind}-model-{trial}"
        if kind == "429":
            fake.provider.script(key=first, model=model, status=429, headers={"retry-after": "30"}, times=1)
        else:
            fake.provider.script(key=first, model=model, headers=FULL, times=1)
        mark = len(fake.provider.seen)
        assert (await a.chat(model))[0] == 200  # a fresh round-robin starts on `first`
        delays.append(await propagated(b, "b-first", model, state))
        assert seen_since(fake, mark)[0] == (first, model)
        mark = len(fake.provider.seen)
        assert [(await b.chat(model))[0] for _ in range(4)] == [200] * 4
        assert {key for key, _ in seen_since(fake, mark)} == {second}  # B never sends it to `first`
    assert statistics.median(delays) <= 0.100, delays
    row = (await b.rows())[("b-first", "429-model-0" if kind == "429" else "saturation-model-0")]
    assert row["state"] == state
    if kind == "429":
        assert row["last_failure"] == "rate_limited"
        assert (await b.until("b-first", "429-model-0") or 0) - time.time() > 20  # the 30 s the provider asked for
    # Another model still uses the key, on both pods.
    mark = len(fake.provider.seen)
    for pod in (a, b):
        for _ in range(2):
            assert (await pod.chat("gpt-4o-mini"))[0] == 200
    assert [key for key, _ in seen_since(fake, mark)].count(first) == 2
    await fleet.assert_no_secret()


# -- 3. one probe per recovered key across the fleet -------------------------------------------


async def test_one_probe_per_recovered_key_across_the_fleet(fleet, fake):
    ns = await fleet.namespace()
    bad, good = secret("revoked"), secret("good")
    fake.provider.revoked.add(bad)
    health = {"credential_cooldown": "1s", "credential_cooldown_max": "1s"}
    shared = Harness.shared(ns, probe_lease="2s")
    pods = await fleet.start(
        [Spec(f"p{i}", [(f"bad-of-p{i}", bad), (f"good-of-p{i}", good)], shared, health) for i in range(3)]
    )
    model = {pod.name: f"model-of-{pod.name}" for pod in pods}  # which pod sent a request: its model

    assert (await pods[0].chat(model["p0"]))[0] == 200  # learns it: revoked for 1 s
    learned = time.monotonic()
    assert seen_since(fake, 0) == [(bad, model["p0"]), (good, model["p0"])]
    mark = len(fake.provider.seen)
    for pod in pods:
        assert await pod.state(f"bad-of-{pod.name}") == "disabled"

    async def leased() -> bool:
        return len(await ns.names("p:*")) == 1

    await eventually(leased, 2, "one probe lease in Redis")
    await asyncio.sleep(max(learned + 1.3 - time.monotonic(), 0))  # the 1 s rest is over everywhere

    # Every pod at once, three requests each: only the pod holding the lease may probe.
    async def burst() -> list[int]:
        sent = [pod.chat(model[pod.name]) for pod in pods for _ in range(3)]
        return [status for status, _ in await asyncio.gather(*sent)]

    assert await burst() == [200] * 9
    probes = [m for key, m in seen_since(fake, mark) if key == bad]
    assert len(probes) == 1, probes  # one probe, still revoked: it rests again
    assert await burst() == [200] * 9
    assert [key for key, _ in seen_since(fake, mark)].count(bad) == 1

    # The key is good again: the next probe (once the lease lapses) passes, and every pod uses it.
    fake.provider.revoked.discard(bad)
    mark = len(fake.provider.seen)
    deadline = time.monotonic() + 10
    turn = 0
    while bad not in [key for key, _ in seen_since(fake, mark)]:  # a request to each pod in turn
        assert time.monotonic() < deadline, "no pod probed the recovered key"
        pod = pods[turn % 3]
        assert (await pod.chat(model[pod.name]))[0] == 200
        turn += 1
        await asyncio.sleep(0.01)

    async def usable_everywhere() -> bool:
        states = [await pod.state(f"bad-of-{pod.name}") for pod in pods]
        return states == ["usable"] * 3

    await eventually(usable_everywhere, 3, "the proven key to be usable on every pod")
    assert [key for key, _ in seen_since(fake, mark)].count(bad) == 1  # one probe for the fleet
    mark = len(fake.provider.seen)
    for pod in pods:
        for _ in range(2):  # equal weights: one of two requests goes to each key
            assert (await pod.chat(model[pod.name]))[0] == 200
    assert {m for key, m in seen_since(fake, mark) if key == bad} == set(model.values())
    await fleet.assert_no_secret()


async def test_one_probe_for_a_key_nobody_asked_for_while_its_probe_lease_lapsed(fleet, fake):
    ns = await fleet.namespace(tag="idle")
    first, second = secret("first"), secret("second")
    shared = Harness.shared(ns, probe_lease="1s")
    pods = await fleet.start([Spec(n, [(f"{n}-first", first), (f"{n}-second", second)], shared) for n in "abc"])
    fake.provider.script(key=first, model="idle", status=429, headers={"retry-after": "1"}, times=1)
    assert (await pods[0].chat("idle"))[0] == 200  # (first, idle) rests 1 s on every pod
    await asyncio.sleep(4)  # no request for that model meanwhile: the lease lapses, and lapses again
    fake.provider.script(key=first, model="idle", status=429, headers={"retry-after": "1"})  # still limited
    mark = len(fake.provider.seen)

    statuses = await asyncio.gather(*(pod.chat("idle") for pod in pods for _ in range(2)))

    assert [status for status, _ in statuses] == [200] * 6
    assert [key for key, _ in seen_since(fake, mark)].count(first) == 1


# -- 4. a pod started later inherits the state -------------------------------------------------


async def test_a_pod_started_later_knows_the_fleet_state_before_it_is_ready(fleet, fake):
    ns = await fleet.namespace()
    bad, good = secret("revoked"), secret("good")
    fake.provider.revoked.add(bad)
    (a,) = await fleet.start([Spec("a", [("a-bad", bad), ("a-good", good)], Harness.shared(ns))])
    assert (await a.chat())[0] == 200
    assert seen_since(fake, 0)[0] == (bad, "gpt-4o")
    assert await a.state("a-bad") == "disabled"
    mark = len(fake.provider.seen)

    (b,) = await fleet.start([Spec("b", [("b-bad", bad), ("b-good", good)], Harness.shared(ns))])

    assert await b.state("b-bad") == "disabled"  # before any request to it
    assert [(await b.chat())[0] for _ in range(6)] == [200] * 6
    assert {key for key, _ in seen_since(fake, mark)} == {good}
    await fleet.assert_no_secret()


# -- 5. Redis killed mid-load --------------------------------------------------------------------


async def test_redis_killed_mid_load_fails_no_request_and_state_converges_once_it_returns(fleet, fake):
    server = await fleet.redis_server()
    ns = await fleet.namespace(server.url, "killed")
    good, rested_by_a, rested_by_b = secret("good"), secret("by-a"), secret("by-b")
    a, b = await fleet.start(
        [
            Spec("a", [("a-good", good), ("a-one", rested_by_a), ("a-two", rested_by_b)], Harness.shared(ns)),
            Spec("b", [("b-good", good), ("b-one", rested_by_a), ("b-two", rested_by_b)], Harness.shared(ns)),
        ]
    )
    results: dict[str, list[tuple[int, float]]] = {"a": [], "b": []}
    stop = asyncio.Event()

    async def load(pod: Pod) -> None:
        while not stop.is_set():
            results[pod.name].append(await pod.chat("gpt-4o"))
            await asyncio.sleep(0.005)

    loads = [asyncio.create_task(load(pod)) for pod in (a, b)]
    try:
        await asyncio.sleep(0.3)
        await server.kill()

        async def down() -> bool:
            return [await a.store_up(), await b.store_up()] == [0.0, 0.0]

        await eventually(down, 5, "store_up 0 on both pods")
        assert [(await pod.get("/readyz"))[0] for pod in (a, b)] == [200, 200]
        # While Redis is away, each pod learns a rest the other does not know.
        fake.provider.script(key=rested_by_a, model="only-a", status=429, headers={"retry-after": "60"})
        fake.provider.script(key=rested_by_b, model="only-b", status=429, headers={"retry-after": "60"})
        for pod, model, value in ((a, "only-a", rested_by_a), (b, "only-b", rested_by_b)):
            mark = len(fake.provider.seen)
            for _ in range(3):
                assert (await pod.chat(model))[0] == 200
            assert [key for key, m in seen_since(fake, mark) if m == model].count(value) == 1
        assert await a.state("a-one", "only-a") == "cooling"
        assert await b.state("b-two", "only-b") == "cooling"
        assert await b.state("b-one", "only-a") == "usable"  # not shared: there is no Redis
        assert await a.state("a-two", "only-b") == "usable"
        await asyncio.sleep(0.3)

        await server.start()

        async def up() -> bool:
            return [await a.store_up(), await b.store_up()] == [1.0, 1.0]

        await eventually(up, 15, "store_up 1 on both pods")

        async def converged() -> bool:
            return (await b.state("b-one", "only-a"), await a.state("a-two", "only-b")) == ("cooling", "cooling")

        await eventually(converged, 3, "each pod to know what the other learned while Redis was down")
        await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.gather(*loads)

    for name, served in results.items():
        assert len(served) > 20, (name, len(served))
        assert {status for status, _ in served} == {200}, name
        slowest = max(seconds for _, seconds in served)
        assert slowest < 1.0, (name, slowest)  # none waited on the dead Redis (1 s connect timeout)
    for pod in (a, b):
        assert len(pod.logged(UNREACHABLE)) == 1, pod.logged(UNREACHABLE)
        assert pod.logged(UNREACHABLE)[0]["level"] == "warning"
    await fleet.assert_no_secret()


# -- 6. a slow Redis never adds latency --------------------------------------------------------


async def test_a_redis_asleep_for_2_s_adds_no_latency_and_the_pods_recover(fleet, fake):
    server = await fleet.redis_server()
    ns = await fleet.namespace(server.url, "slow")
    good, other = secret("good"), secret("other")
    a, b = await fleet.start(
        [
            Spec("a", [("a-other", other), ("a-good", good)], Harness.shared(ns)),
            Spec("b", [("b-other", other), ("b-good", good)], Harness.shared(ns)),
        ]
    )
    fake.provider.script(key=other, model="learned-by-a", status=429, headers={"retry-after": "60"})
    fake.provider.script(key=other, model="learned-by-b", status=429, headers={"retry-after": "60"})
    control = server.client(timeout=5)
    probe = server.client(timeout=0.1)
    sleeper = asyncio.create_task(control.execute_command("DEBUG", "SLEEP", "2"))
    try:

        async def asleep() -> bool:
            try:
                await probe.ping()
            except (OSError, TimeoutError, RedisError):
                return True
            return False

        await eventually(asleep, 2, "Redis to be asleep")
        # While Redis sleeps: each pod learns a rest (so it has something to write) and serves.
        served: list[tuple[int, float]] = [await a.chat("learned-by-a"), await b.chat("learned-by-b")]
        for _ in range(20):
            for pod in (a, b):
                served.append(await pod.chat("gpt-4o"))
        assert not sleeper.done(), "the requests outlasted the sleep: they proved nothing"
        await sleeper
    finally:
        if not sleeper.done():
            await asyncio.wait([sleeper], timeout=5)
        await control.aclose()
        await probe.aclose()

    assert {status for status, _ in served} == {200}
    slowest = max(seconds for _, seconds in served)
    assert slowest < 1.0, slowest  # Redis took 2 s to answer anything
    for pod in (a, b):  # they did reach for Redis, and gave up on it, not on the requests
        assert await pod.metric("keymux_shared_facts_total", direction="out", result="failed") >= 1

    async def up() -> bool:
        return [await a.store_up(), await b.store_up()] == [1.0, 1.0]

    await eventually(up, 10, "store_up 1 on both pods")

    async def converged() -> bool:
        return (await b.state("b-other", "learned-by-a"), await a.state("a-other", "learned-by-b")) == (
            "cooling",
            "cooling",
        )

    await eventually(converged, 3, "what each pod learned during the stall to reach the other")
    await fleet.assert_no_secret()


# -- 7. malformed or hostile messages ----------------------------------------------------------


async def test_malformed_or_hostile_facts_are_ignored_counted_and_capped(fleet, fake):
    ns = await fleet.namespace(tag="hostile")
    one, two, victim = secret("one"), secret("two"), secret("victim")
    health = {"credential_cooldown_max": "2h"}
    (pod,) = await fleet.start(
        [
            Spec(
                "p",
                [("k-one", one), ("k-two", two), ("k-victim", victim)],
                Harness.shared(ns, resync_interval="1s"),
                health,
            )
        ]
    )
    salt = await ns.redis.get(f"{ns.name}:salt")
    assert salt
    fp = fingerprint(salt, victim)
    stranger = secrets.token_hex(16)

    def fact(**fields: Any) -> bytes:
        body = {"v": 1, "pod": "evil", "k": fp, "s": "*", "op": "rest", "why": "credential_error", "ttl": 60, "n": 0}
        return json.dumps(body | fields).encode()

    invalid = [
        b"\x00\xffnot json at all",
        b"\xff\xfe{}",
        b"{" * 500,
        b"[" * 1000 + b"]" * 1000,  # too long, and too deep
        b" " * 2000 + fact(),  # oversized
        b"null",
        b"[1, 2, 3]",
        b'"a string"',
        fact(v=2),  # another schema
        fact(v="1"),
        fact(pod=""),
        fact(pod="x" * 65),
        fact(pod=7),
        fact(k=fp.upper()),
        fact(k=fp[:31]),
        fact(k="../../etc/passwd"),
        fact(s=""),
        fact(s="m" * 300),
        fact(s=["*"]),
        fact(op="delete"),
        fact(op="REST"),
        fact(why="success"),
        fact(why="permission_error"),  # a model's rest may not rest the whole key
        fact(why="saturated"),
        fact(ttl=-5),
        fact(ttl=0),
        fact(ttl="60"),
        fact(ttl=True),
        fact(ttl=None),
        fact(n=99),
        fact(n=-1),
        fact(n=1.5),
        fact(ttl="TTL").replace(b'"TTL"', b"NaN"),
        fact(ttl="TTL").replace(b'"TTL"', b"Infinity"),
        fact(ttl="TTL").replace(b'"TTL"', b"1e999"),
    ]
    ignored = [  # well formed, about no key this pod holds
        fact(k=stranger),
        fact(k=stranger, op="clear"),
        fact(k=stranger, s="gpt-4o", why="rate_limited", ttl=1e12),
    ]
    for message in invalid + ignored:
        assert await ns.redis.publish(ns.channel, message) == 2  # the pod and the capture

    async def counted() -> bool:
        return await pod.metric("keymux_shared_facts_total", direction="in", result="invalid") >= len(
            invalid
        ) and await pod.metric("keymux_shared_facts_total", direction="in", result="ignored") >= len(ignored)

    await eventually(counted, 3, "every hostile message counted")
    assert await pod.metric("keymux_shared_facts_total", direction="in", result="invalid") == len(invalid)
    assert await pod.metric("keymux_shared_facts_total", direction="in", result="applied") == 0
    assert {(k, m): r["state"] for (k, m), r in (await pod.rows()).items()} == {
        ("k-one", "*"): "usable",
        ("k-two", "*"): "usable",
        ("k-victim", "*"): "usable",
    }

    # Garbage stored as a fact: read by the resync, counted, and nothing else.
    await ns.redis.set(f"{ns.name}:h:{{{fp}}}:x", b"\x00garbage", px=30_000)
    await ns.redis.set(f"{ns.name}:h:{{{fp}}}:y", fact(why="no such reason"), px=30_000)
    before = await pod.metric("keymux_shared_facts_total", direction="in", result="invalid")

    async def resynced() -> bool:
        return await pod.metric("keymux_shared_facts_total", direction="in", result="invalid") >= before + 2

    await eventually(resynced, 4, "the stored garbage read and counted")

    # Routing unchanged: every key serves, in turn.
    mark = len(fake.provider.seen)
    assert [(await pod.chat())[0] for _ in range(6)] == [200] * 6
    assert sorted(key for key, _ in seen_since(fake, mark)) == sorted([one, two, victim] * 2)

    # A valid fact asking for an absurd rest rests the key, for no longer than this pod's cap.
    await ns.redis.publish(ns.channel, fact(ttl=1e12))

    async def rested() -> bool:
        return await pod.state("k-victim") == "disabled"

    await eventually(rested, 3, "the capped rest applied")
    until = await pod.until("k-victim")
    assert until is not None and until <= time.time() + 2 * 3600 + 2
    assert until > time.time() + 2 * 3600 - 60
    assert pod.process.returncode is None
    assert (await pod.get("/healthz"))[0] == 200
    assert await pod.store_up() == 1.0
    await fleet.assert_no_secret()


async def test_a_key_of_another_type_in_the_namespace_is_ignored_and_counted(fleet, fake):
    ns = await fleet.namespace(tag="wrongtype")
    one = secret("one")
    (pod,) = await fleet.start([Spec("p", [("k-one", one)], Harness.shared(ns, resync_interval="500ms"))])
    await ns.redis.rpush(f"{ns.name}:h:{{{'0' * 32}}}:x", "not a string")
    await asyncio.sleep(1.5)  # three resyncs

    assert await pod.metric("keymux_shared_resyncs_total", result="failure") == 0
    assert await pod.store_up() == 1.0


# -- 8. Redis never holds a secret ---------------------------------------------------------------


async def test_redis_never_holds_a_secret_nor_a_key_name(fleet, fake):
    ns = await fleet.namespace(tag="hygiene")
    kinds = ("revoked", "limited", "saturated", "failing", "denied", "good")
    keys = {kind: secret(kind[:4]) for kind in kinds}
    health = {"model_cooldown": "1s", "model_cooldown_max": "1s", "failure_threshold": 1}
    shared = Harness.shared(ns, probe_lease="2s")
    a, b = await fleet.start(
        [
            Spec("a", [(f"name-a-{kind}", value) for kind, value in keys.items()], shared, health),
            Spec("b", [(f"name-b-{kind}", value) for kind, value in keys.items()], shared, health),
        ]
    )
    fake.provider.revoked.add(keys["revoked"])
    fake.provider.script(key=keys["limited"], status=429, headers={"retry-after": "30"}, times=1)
    fake.provider.script(key=keys["saturated"], headers=FULL, times=1)
    fake.provider.script(key=keys["failing"], status=500, times=1)
    fake.provider.script(key=keys["denied"], model="gpt-4o", status=403, times=1)
    for _ in range(12):  # until every key failed its own way once
        assert (await a.chat())[0] == 200
        if set(keys.values()) <= {key for key, _ in seen_since(fake, 0)}:
            break
    assert set(keys.values()) <= {key for key, _ in seen_since(fake, 0)}
    await propagated(b, "name-b-denied", "gpt-4o", "cooling")  # B knows before it is asked
    mark = len(fake.provider.seen)

    # The permission rest (1 s) ends: one pod probes the key, the probe passes, the fleet is told.
    async def proven() -> bool:
        for pod in (a, b):
            assert (await pod.chat())[0] == 200
        return keys["denied"] in [key for key, _ in seen_since(fake, mark)]

    await eventually(proven, 8, "the denied key probed again")

    async def cleared() -> bool:
        states = await a.state("name-a-denied", "gpt-4o"), await b.state("name-b-denied", "gpt-4o")
        return states == ("usable", "usable")

    await eventually(cleared, 3, "the proven key usable on both pods")
    assert await b.state("name-b-revoked") == "disabled"
    facts = [json.loads(message) for message in ns.captured]
    assert {fact["op"] for fact in facts} == {"rest", "clear"}
    reasons = {fact.get("why") for fact in facts}
    assert {"credential_error", "rate_limited", "saturated", "permission_error", "upstream_error"} <= reasons, reasons
    assert len(await ns.names("h:*")) >= 4
    await fleet.assert_no_secret()


# -- 9. without shared: nothing of the fleet ------------------------------------------------------


async def test_without_shared_nothing_of_the_fleet_is_exported(fleet, fake):
    (pod,) = await fleet.start([Spec("alone", [("only", secret("only"))])])
    assert (await pod.chat())[0] == 200
    status, text = await pod.get("/metrics")
    assert status == 200 and "keymux_requests" in text
    assert "keymux_shared" not in text
