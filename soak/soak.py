"""Soak: many requests through keymux (a subprocess) to the fake provider, mixing successes,
streams and every failure class, with a config reload (SIGHUP) every few seconds.

It reports, and fails unless:
  - no request was lost that a usable key could have served;
  - keymux's resident memory grew less than 10 % between the end of warm-up and the end;
  - at the end keymux has no request in flight, no app connection, no upstream connection
    checked out, as many asyncio tasks as before the load, and no file descriptor beyond its
    idle upstream pool; the fake provider has nothing in progress.

    python -m soak.soak                       # the full soak: 200,000 requests, 64 connections
    python -m soak.soak --requests 3000       # the shortened CI form

Everything runs on loopback; the run is bounded by --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from sidecar.fake_provider import FakeProvider
from soak.stack import LOOPBACK, Upstream, metric_sum, parse_metrics, start_upstream

ROOT = Path(__file__).resolve().parent.parent
RSS_GROWTH_LIMIT = 0.10

# -- the scenario ------------------------------------------------------------------------------

OPENAI_KEYS = {f"k{i}": f"sk-soak-k{i}-{i:02d}a7c3e9f1b5d2" for i in range(1, 7)}
ANTHROPIC_KEYS = {f"a{i}": f"sk-ant-soak-a{i}-{i:02d}4f8b2d6e" for i in range(1, 4)}
REVOKED = {OPENAI_KEYS["k6"], ANTHROPIC_KEYS["a1"]}

SERVED = "served"  # a usable key exists: anything but a complete 200 is a lost request
CLIENT_ERROR = "client_error"  # the app's own mistake: the provider's 400, passed through
MAY_BREAK = "may_break"  # a stream that a faulty key cuts after its first bytes: complete or cut
ABANDONED = "abandoned"  # the app hangs up after the first chunk


@dataclass(frozen=True)
class Case:
    name: str
    weight: int  # per 1000 requests
    route: str
    model: str
    stream: bool
    expect: str


CASES = (
    Case("ok", 360, "/openai", "gpt-4o", False, SERVED),
    Case("stream", 160, "/openai", "gpt-4o", True, SERVED),
    Case("anthropic", 60, "/anthropic", "claude-3-5-sonnet", False, SERVED),
    Case("anthropic_stream", 40, "/anthropic", "claude-3-5-sonnet", True, SERVED),
    Case("rate_limited", 50, "/openai", "rate-limited", False, SERVED),
    Case("model_access", 40, "/openai", "no-access", False, SERVED),
    Case("server_error", 50, "/openai", "server-error", False, SERVED),
    Case("reset", 40, "/openai", "reset", False, SERVED),
    Case("not_http", 30, "/openai", "not-http", False, SERVED),
    Case("quota", 15, "/openai", "quota", False, SERVED),
    Case("invalid_json", 20, "/openai", "invalid-json", False, SERVED),
    Case("slow_headers", 5, "/openai", "slow", False, SERVED),
    Case("big_error", 2, "/openai", "big-error", False, SERVED),
    Case("bad_request", 40, "/openai", "bad-request", False, CLIENT_ERROR),
    Case("cut_mid_stream", 40, "/openai", "cut", True, MAY_BREAK),
    Case("stalled_stream", 3, "/openai", "stall", True, MAY_BREAK),
    Case("app_hangs_up", 45, "/openai", "gpt-4o-long", True, ABANDONED),
)
assert sum(c.weight for c in CASES) == 1000


def script(fake: FakeProvider) -> None:
    """Each failing model fails on one key only (or is the app's fault): another key can serve."""
    k = OPENAI_KEYS
    fake.script(key=k["k1"], model="rate-limited", status=429, headers={"retry-after": "1"})
    fake.script(key=k["k1"], model="no-access", status=403, kind="model_access")
    fake.script(key=k["k2"], model="server-error", status=500)
    fake.script(key=k["k2"], model="slow", delay=1.5)
    fake.script(key=k["k2"], model="stall", fault="hang_body")
    fake.script(key=k["k3"], model="reset", fault="reset_before_headers")
    fake.script(key=k["k3"], model="cut", fault="reset_mid_stream")
    fake.script(key=k["k4"], model="not-http", fault="not_http")
    fake.script(key=k["k4"], model="big-error", fault="big_error", status=500)
    fake.script(key=k["k5"], model="quota", status=429, kind="quota")
    fake.script(model="bad-request", status=400, kind="bad_request")
    fake.script(model="invalid-json", fault="invalid_json")
    fake.script(model="gpt-4o-long", events=40, event_delay=0.02)


def config(upstream: str, admin_port: int, variant: int) -> str:
    """Two variants that a reload flips between: the same keys, in another order, with other
    health numbers, so health carries over and the metrics series stay."""
    openai_keys = list(OPENAI_KEYS.items())
    if variant:
        openai_keys.reverse()

    def keys(pairs: list[tuple[str, str]]) -> str:
        return "".join(f"      - name: {name}\n        key: {secret}\n" for name, secret in pairs)

    return f"""
listen: {LOOPBACK}:0
admin_listen: {LOOPBACK}:{admin_port}
log_level: warning
providers:
  openai:
    type: openai
    base_url: {upstream}
    keys:
{keys(openai_keys)}  anthropic:
    type: anthropic
    base_url: {upstream}
    keys:
{keys(list(ANTHROPIC_KEYS.items()))}routes:
  - prefix: /openai
    providers: [openai]
  - prefix: /anthropic
    providers: [anthropic]
health:
  failure_threshold: {3 + variant}
  failure_cooldown: 2
  failure_cooldown_max: 10
  credential_cooldown: 3
  credential_cooldown_max: 10
  model_cooldown: 2
  model_cooldown_max: 10
  rate_limit_cooldown: 1
  rate_limit_cooldown_max: 10
  quota_cooldown: 3
timeouts:
  connect: 1
  response_headers: 1
  idle: 1
  total: 20
shutdown:
  drain_delay: 0.1
  drain_timeout: 5
"""


def mix(count: int, seed: int = 6) -> list[Case]:
    table = [case for case in CASES for _ in range(case.weight)]
    random.Random(seed).shuffle(table)
    return [table[i % len(table)] for i in range(count)]


# -- one request -------------------------------------------------------------------------------


def body(case: Case) -> bytes:
    payload: dict[str, Any] = {"model": case.model, "messages": [{"role": "user", "content": "hi"}]}
    if case.route == "/anthropic":
        payload["max_tokens"] = 16
    if case.stream:
        payload["stream"] = True
    return json.dumps(payload).encode()


def complete(case: Case, status: int, data: bytes) -> bool:
    if status != 200:
        return False
    if case.model == "invalid-json":
        return data == b'{"id": "chatcmpl-1", "choices": ['
    if case.stream:
        return data.endswith(b"data: [DONE]\n\n") or data.rstrip().endswith(b'{"type": "message_stop"}')
    try:
        answer = json.loads(data)
    except ValueError:
        return False
    return "choices" in answer or answer.get("type") == "message"


async def one(session: aiohttp.ClientSession, url: str, case: Case) -> str:
    """Send one request; return its result: ok, client_error, cut, abandoned, or lost:<why>."""
    path = "/v1/messages" if case.route == "/anthropic" else "/v1/chat/completions"
    headers = {"Content-Type": "application/json"}
    try:
        async with session.post(url + case.route + path, data=body(case), headers=headers) as response:
            if case.expect == ABANDONED:
                await response.content.readany()
                response.close()
                return "abandoned"
            try:
                data = await response.read()
            except aiohttp.ClientPayloadError:
                return "cut" if case.expect == MAY_BREAK and response.status == 200 else "lost:cut"
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"lost:{type(exc).__name__}"
    if case.expect == CLIENT_ERROR:
        return "client_error" if status == 400 else f"lost:status_{status}"
    return "ok" if complete(case, status, data) else f"lost:status_{status}"


# -- the keymux process ------------------------------------------------------------------------


class Keymux:
    def __init__(self, workdir: Path, upstream: str) -> None:
        self.workdir = workdir
        self.upstream = upstream
        self.config_path = workdir / "keymux.yaml"
        self.stderr_path = workdir / "keymux.stderr"
        self.process: asyncio.subprocess.Process | None = None
        self.admin = ""
        self.app = ""
        self.variant = 0

    async def start(self) -> None:
        admin_port = free_port()
        self.config_path.write_text(config(self.upstream, admin_port, 0))
        self.admin = f"http://{LOOPBACK}:{admin_port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(self.stderr_path, "wb") as stderr:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "soak.keymux_child", str(self.config_path), env=env, cwd=ROOT, stderr=stderr
            )
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                try:
                    async with session.get(self.admin + "/healthz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
            else:
                raise RuntimeError("keymux did not start: " + self.stderr_path.read_text()[-2000:])
        self.app = f"http://{LOOPBACK}:{(await self.stats())['app_port']}"

    def reload(self) -> None:
        self.variant ^= 1
        admin_port = int(self.admin.rsplit(":", 1)[1])
        self.config_path.write_text(config(self.upstream, admin_port, self.variant))
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    async def stats(self, collect: bool = False) -> dict[str, int]:
        url = self.admin + "/_soak/stats" + ("?collect=1" if collect else "")
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            return await response.json()  # type: ignore[no-any-return]

    async def metrics(self) -> dict[Any, float]:
        async with aiohttp.ClientSession() as session, session.get(self.admin + "/metrics") as response:
            return parse_metrics(await response.text())

    async def stop(self) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 20)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        return self.process.returncode or 0

    def error_lines(self) -> list[str]:
        lines = self.stderr_path.read_text(errors="replace").splitlines()
        return [line for line in lines if '"level": "error"' in line or "Traceback" in line]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Report:
    requests: int
    connections: int
    seconds: float = 0.0
    completed: int = 0
    results: dict[str, int] = field(default_factory=dict)
    by_case: dict[str, dict[str, int]] = field(default_factory=dict)
    lost: int = 0
    reloads_sent: int = 0
    reloads_applied: float = 0.0
    rss_warm_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_peak_mb: float = 0.0
    rss_growth: float = 0.0
    baseline: dict[str, int] = field(default_factory=dict)
    end: dict[str, int] = field(default_factory=dict)
    upstream_active_end: int = 0
    upstream_connections_end: int = 0
    attempts_counted: float = 0.0
    attempts_by_outcome: dict[str, float] = field(default_factory=dict)
    upstream_requests: int = 0
    keymux_exit: int | None = None
    keymux_error_lines: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


async def soak(requests: int, connections: int, reload_every: float, max_seconds: float, warmup: float) -> Report:
    report = Report(requests, connections)
    fake = FakeProvider(revoked=REVOKED, events=5)
    script(fake)
    upstream = await start_upstream(fake)
    with tempfile.TemporaryDirectory(prefix="keymux-soak-") as tmp:
        keymux = Keymux(Path(tmp), upstream.url)
        await keymux.start()
        try:
            await drive(report, keymux, upstream, requests, connections, reload_every, max_seconds, warmup)
        finally:
            report.keymux_exit = await keymux.stop()
            report.keymux_error_lines = len(keymux.error_lines())
            await upstream.close()
    judge(report)
    return report


async def drive(
    report: Report,
    keymux: Keymux,
    upstream: Upstream,
    requests: int,
    connections: int,
    reload_every: float,
    max_seconds: float,
    warmup: float,
) -> None:
    report.baseline = await keymux.stats(collect=True)
    cases = mix(requests)
    results: Counter[str] = Counter()
    by_case: dict[str, Counter[str]] = {c.name: Counter() for c in CASES}
    started = time.monotonic()
    deadline = started + max_seconds
    next_index = 0
    warm_at = max(int(requests * warmup), 1)
    warm = asyncio.Event()

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal next_index
        while next_index < requests and time.monotonic() < deadline:
            case = cases[next_index]
            next_index += 1
            result = await one(session, keymux.app, case)
            results[result.split(":")[0]] += 1
            by_case[case.name][result] += 1
            report.completed += 1
            if report.completed == warm_at:
                warm.set()

    async def reloader() -> None:
        while True:
            await asyncio.sleep(reload_every)
            keymux.reload()
            report.reloads_sent += 1

    async def sampler() -> None:
        await warm.wait()
        report.rss_warm_mb = (await keymux.stats(collect=True))["rss"] / 2**20
        while True:
            report.rss_peak_mb = max(report.rss_peak_mb, (await keymux.stats())["rss"] / 2**20)
            await asyncio.sleep(1.0)

    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=connections)
    helpers = [asyncio.create_task(reloader()), asyncio.create_task(sampler())]
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(connections)))
    for helper in helpers:
        helper.cancel()
    await asyncio.gather(*helpers, return_exceptions=True)
    report.seconds = round(time.monotonic() - started, 1)
    report.results = dict(results)
    report.by_case = {name: dict(counts) for name, counts in by_case.items()}
    report.lost = results["lost"]
    await settle(report, keymux, upstream)


async def settle(report: Report, keymux: Keymux, upstream: Upstream) -> None:
    """Wait (bounded) for keymux to come back to rest, then take the end figures."""
    wanted = {"inflight": 0, "app_connections": 0, "upstream_in_use": 0, "tasks": report.baseline["tasks"]}
    end: dict[str, int] = {}
    for _ in range(200):
        end = await keymux.stats(collect=True)
        if {k: end[k] for k in wanted} == wanted and upstream.provider.active == 0:
            break
        await asyncio.sleep(0.05)
    report.end = end
    report.rss_end_mb = end["rss"] / 2**20
    report.rss_peak_mb = max(report.rss_peak_mb, report.rss_end_mb)
    if report.rss_warm_mb:
        report.rss_growth = round((report.rss_end_mb - report.rss_warm_mb) / report.rss_warm_mb, 4)
    report.upstream_active_end = upstream.provider.active
    report.upstream_connections_end = upstream.connections
    samples = await keymux.metrics()
    for _ in range(100):  # a SIGHUP sent just before the load ended may still be on its way
        if metric_sum(samples, "keymux_config_reloads_total", result="success") >= report.reloads_sent:
            break
        await asyncio.sleep(0.05)
        samples = await keymux.metrics()
    report.attempts_counted = metric_sum(samples, "keymux_upstream_attempts_total")
    for (name, labels), value in samples.items():
        if name == "keymux_upstream_attempts_total" and value:
            outcome = dict(labels)["outcome"]
            report.attempts_by_outcome[outcome] = report.attempts_by_outcome.get(outcome, 0.0) + value
    report.reloads_applied = metric_sum(samples, "keymux_config_reloads_total", result="success")
    report.upstream_requests = upstream.provider.completed


def judge(report: Report) -> None:
    fail = report.failures.append
    if report.completed != report.requests:
        fail(f"only {report.completed} of {report.requests} requests ran before --max-seconds")
    if report.lost:
        fail(f"{report.lost} requests lost that a usable key could have served")
    if not report.rss_warm_mb:
        fail("no warm-up memory figure")
    elif report.rss_growth >= RSS_GROWTH_LIMIT:
        fail(f"resident memory grew {report.rss_growth:.1%} after warm-up")
    base, end = report.baseline, report.end
    for name in ("inflight", "app_connections", "upstream_in_use"):
        if end.get(name) != 0:
            fail(f"{name} is {end.get(name)} at the end, not 0")
    if end.get("tasks") != base.get("tasks"):
        fail(f"asyncio tasks: {end.get('tasks')} at the end, {base.get('tasks')} before the load")
    beyond_pool = end.get("fds", 0) - end.get("upstream_idle", 0) - base.get("fds", 0)
    if beyond_pool != 0:
        fail(f"{beyond_pool} file descriptors beyond the idle upstream pool at the end")
    if report.upstream_active_end:
        fail(f"the fake provider still answers {report.upstream_active_end} requests")
    if report.reloads_sent and report.reloads_applied < report.reloads_sent:
        fail(f"{report.reloads_sent} reloads sent, {report.reloads_applied:.0f} applied")
    if report.keymux_exit != 0:
        fail(f"keymux exited with {report.keymux_exit} after SIGTERM")
    if report.keymux_error_lines:
        fail(f"keymux logged {report.keymux_error_lines} error lines")


def summary(report: Report) -> str:
    rate = report.completed / report.seconds if report.seconds else 0
    lines = [
        f"keymux soak: {report.completed}/{report.requests} requests at {report.connections} connections "
        f"in {report.seconds} s ({rate:.0f} req/s), {report.reloads_sent} reloads",
        f"  results: {report.results}",
        f"  lost that a usable key could have served: {report.lost}",
        f"  RSS after warm-up {report.rss_warm_mb:.1f} MB, at the end {report.rss_end_mb:.1f} MB "
        f"(growth {report.rss_growth:+.1%}), peak {report.rss_peak_mb:.1f} MB",
        f"  before load: {report.baseline}",
        f"  at the end:  {report.end}",
        f"  fake provider: {report.upstream_active_end} active, {report.upstream_connections_end} connections open",
        f"  upstream attempts counted {report.attempts_counted:.0f}, upstream requests made {report.upstream_requests}",
        f"  attempts by outcome: { {k: int(v) for k, v in sorted(report.attempts_by_outcome.items())} }",
        f"  keymux exit {report.keymux_exit}, error lines {report.keymux_error_lines}",
        "  PASS" if report.passed else "  FAIL: " + "; ".join(report.failures),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--reload-every", type=float, default=3.0, help="seconds between config reloads")
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="stop issuing requests after this")
    parser.add_argument("--warmup", type=float, default=0.1, help="fraction of requests before the memory baseline")
    parser.add_argument("--json", help="also write the report as JSON to this file")
    args = parser.parse_args(argv)
    report = asyncio.run(soak(args.requests, args.connections, args.reload_every, args.max_seconds, args.warmup))
    print(summary(report))
    if args.json:
        Path(args.json).write_text(json.dumps({**asdict(report), "passed": report.passed}, indent=2))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
