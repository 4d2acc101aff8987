"""One run of the benchmark: start the servers, drive the seven scenarios, print one table.

Scenarios follow issue 5. Every figure is measured against three targets on loopback:
direct (the fake provider itself), bare (bench/passthrough.py in front of it) and keymux
(in front of it, with 3 providers of 4 keys each and metrics on, in the default config: the
access log on). A fourth, keymux-quiet, is the same keymux with log_level: warning; it joins
scenarios 1 and 2 to show what the access log costs.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import re
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import aiohttp

from bench import load, profile
from bench.load import LoadResult
from bench.procs import HOST, BenchError, Fleet, Server, free_port, port_open, raise_fd_limit
from bench.report import Report, Row

CHAT_PATH = "/v1/chat/completions"
MODEL = "gpt-4o-mini"
MAX_MODELS = 100  # keymux's metrics.max_models in the bench config
BIG_BODY = 200 * 1024
MB = 1024 * 1024
KEYMUX, QUIET = "keymux", "keymux-quiet"
ACCESS_LINE = b'"keymux.access"'  # the logger name, in each JSON access line keymux writes


@dataclass(frozen=True)
class Sizes:
    rounds: int  # scenarios 1-4 run in interleaved rounds (direct, bare, keymux, direct, ...)
    latency_seconds: int  # per round, scenarios 1 and 3, one connection each
    throughput_seconds: int  # per round, scenario 2
    connections: int  # scenario 2
    streams: int  # scenario 4, in total
    stream_concurrency: int
    events: int  # per stream, from the fake provider
    event_delay: float  # seconds between two events at the fake provider
    ramp: float  # seconds over which the streams start
    models: int  # scenario 7: requests, each with its own model name
    model_concurrency: int
    ready_runs: int  # scenario 6: spawns per server, the median is reported
    warmup: int  # requests per target before anything is measured


# Scenario 4 spaces events 40 ms apart: 500 streams then ask for 12,500 events/s, which 2 cores
# serve without falling behind, so each event crosses the proxy as its own chunk. (When the
# machine saturates, events coalesce into bigger chunks and CPU per event stops comparing
# like with like.) The 500 starts are spread over 2 s so that time to first byte measures a
# proxy under load, not the fake provider's queue after a burst of 500 requests at once.
# Scenario 4 runs in rounds too: its added time to first byte is the difference of two medians
# taken under load, and in a single run it swung from 0.3x to 7.5x bare between runs.
FULL = Sizes(3, 1, 2, 32, 500, 500, 200, 0.04, 2.0, 100_000, 64, 3, 500)
QUICK = Sizes(1, 1, 1, 32, 20, 20, 20, 0.005, 0.05, 2000, 16, 1, 100)


def chat_body(model: str = MODEL, prompt: str = "Say hello in one short sentence.", stream: bool = False) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 64}
    if stream:
        body["stream"] = True  # json.dumps writes '"stream": true', which the fast fake looks for
    return json.dumps(body).encode()


def long_prompt_body(size: int = BIG_BODY) -> bytes:
    """A chat request of exactly `size` bytes: one long prompt."""
    sentence = "The quick brown fox jumps over the lazy dog while keymux picks a key for it. "
    room = size - len(chat_body(prompt=""))
    return chat_body(prompt=(sentence * (room // len(sentence) + 1))[:room])


def model_template() -> tuple[bytes, bytes]:
    """A chat body cut where the model name goes."""
    head, tail = chat_body(model="\0").split(b"\\u0000")
    return head, tail


def numbered_models() -> Callable[[int], bytes]:
    """body(i) names model bench-model-<i>: every request a model never seen before."""
    head, tail = model_template()
    return lambda i: head + b"bench-model-%d" % i + tail


def keymux_config(fake_url: str, port: int, admin_port: int, log_level: str | None = None) -> str:
    """The bench's keymux config. Without log_level, the default applies, as users run it."""

    def keys(provider: str) -> str:
        return "".join(
            f"      - name: {provider}-{n}\n        key: sk-bench-{provider}-{n}-{'x' * 24}\n" for n in range(1, 5)
        )

    level = f"log_level: {log_level}\n" if log_level else ""

    return f"""\
listen: {HOST}:{port}
admin_listen: {HOST}:{admin_port}
{level}providers:
  openai:
    type: openai
    base_url: {fake_url}
    keys:
{keys("openai")}  backup:
    type: openai-compatible
    base_url: {fake_url}
    keys:
{keys("backup")}  anthropic:
    type: anthropic
    base_url: {fake_url}
    keys:
{keys("anthropic")}routes:
  - prefix: /anthropic
    providers: [anthropic]
  - prefix: /
    providers: [openai, backup]
metrics:
  max_models: {MAX_MODELS}
shutdown:
  drain_delay: 0.01
  drain_timeout: 2
"""


@dataclass
class Target:
    name: str
    server: Server  # the process whose CPU and memory count (direct: the fake provider)
    url: str  # chat completions through it


class Meter:
    """CPU seconds a server spends between start() and stop()."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.begun = 0.0
        self.seconds = 0.0

    def start(self) -> None:
        self.begun = self.server.cpu_seconds()

    def stop(self) -> None:
        self.seconds = self.server.cpu_seconds() - self.begun


class Bench:
    def __init__(self, fleet: Fleet, sizes: Sizes, use_wrk: bool, report: Report, profile_seconds: int) -> None:
        self.fleet = fleet
        self.sizes = sizes
        self.use_wrk = use_wrk
        self.report = report
        self.profile_seconds = profile_seconds
        self.threads = max(1, min(os.cpu_count() or 1, 4))
        self.small = chat_body()
        self.streaming = chat_body(stream=True)
        self.big = long_prompt_body()

    # -- servers ---------------------------------------------------------------------------

    def spawn_fake(self) -> Server:
        port = free_port()
        s = self.sizes
        args = ["-m", "sidecar.fake_provider", "--fast", "--port", str(port),
                "--events", str(s.events), "--event-delay", str(s.event_delay)]  # fmt: skip
        return self.fleet.spawn("fake", args, port, port, "/v1/models")

    def spawn_bare(self, fake: Server) -> Server:
        port = free_port()
        args = ["-m", "bench.passthrough", "--port", str(port), "--upstream", fake.url]
        return self.fleet.spawn("bare", args, port, port, "/v1/models")

    def spawn_keymux(self, fake: Server, name: str = KEYMUX, log_level: str | None = None) -> Server:
        port, admin = free_port(), free_port()
        text = keymux_config(fake.url, port, admin, log_level)
        self.report.raw.setdefault("configs", {})[name] = text
        config = self.fleet.write(f"{name}-{port}.yaml", text)
        return self.fleet.spawn(name, ["-m", "sidecar", "--config", str(config)], port, admin, "/readyz")

    def started(self, server: Server) -> Server:
        server.wait_ready()
        deadline = time.perf_counter() + 10
        while not port_open(server.port):  # keymux: the admin listener comes up first
            if time.perf_counter() > deadline:
                raise BenchError(f"{server.name}: port {server.port} does not answer:\n{server.log_tail()}")
            time.sleep(0.005)
        return server

    # -- the run -----------------------------------------------------------------------------

    async def run(self) -> None:
        fake = self.started(self.spawn_fake())
        began = time.perf_counter()
        ready = self.readiness(fake)
        self.report.raw["scenario 6"]["seconds"] = round(time.perf_counter() - began, 1)
        bare = self.started(self.spawn_bare(fake))
        keymux = self.started(self.spawn_keymux(fake))
        quiet = self.started(self.spawn_keymux(fake, QUIET, "warning"))
        targets = [
            Target("direct", fake, fake.url + CHAT_PATH),
            Target("bare", bare, bare.url + CHAT_PATH),
            Target(KEYMUX, keymux, keymux.url + CHAT_PATH),
        ]
        every = [*targets, Target(QUIET, quiet, quiet.url + CHAT_PATH)]  # only where the access log shows
        for target in every:
            await self.warm_up(target)
        idle = {t.name: t.server.rss_bytes() / MB for t in targets}
        if not self.use_wrk:
            self.report.notes.append(
                "scenarios 1-3 used the built-in generator: its own cost per request caps the figures "
                "(see 'direct') and blunts the ratios; with wrk installed they are sharper"
            )
        rounds = self.sizes.rounds
        small, big = self.small, self.big
        self.latency_rows(await self.each(1, every, lambda t, m: self.one_connection(t, small, m), rounds), 1, "")
        self.throughput_rows(await self.each(2, every, self.many_connections, rounds))
        self.latency_rows(
            await self.each(3, targets, lambda t, m: self.one_connection(t, big, m), rounds), 3, ", 200 KB body"
        )
        self.stream_rows(await self.each(4, targets, self.streams, rounds))
        peak = {t.name: t.server.peak_rss_bytes() / MB for t in targets}
        self.memory_rows(idle, peak)
        self.ready_rows(ready)
        if self.profile_seconds:
            await self.profile(targets[1], targets[2])  # bare, keymux
        began = time.perf_counter()
        await self.many_models(keymux)
        self.report.raw["scenario 7"]["seconds"] = round(time.perf_counter() - began, 1)

    async def each(
        self,
        scenario: int,
        targets: list[Target],
        measure: Callable[[Target, Meter], Awaitable[LoadResult]],
        rounds: int = 1,
    ) -> dict[str, tuple[LoadResult, float]]:
        """Run one scenario against every target, in interleaved rounds so that outside load
        hits all alike: (load result, server CPU seconds) by target name. For keymux, raw also
        counts the access lines it wrote meanwhile."""
        started = time.perf_counter()
        runs: dict[str, list[tuple[LoadResult, float]]] = {t.name: [] for t in targets}
        loggers = [t for t in targets if t.name in (KEYMUX, QUIET)]
        before = {t.name: await access_lines(t.server) for t in loggers}
        for _ in range(rounds):
            for target in targets:
                meter = Meter(target.server)
                result = await measure(target, meter)
                runs[target.name].append((result, meter.seconds))
        logged = {t.name: await access_lines(t.server) - before[t.name] for t in loggers}
        raw = self.report.raw.setdefault(f"scenario {scenario}", {})
        results = {}
        for name, done in runs.items():
            result, cpu = load.combine([r for r, _ in done]), sum(c for _, c in done)
            results[name] = (result, cpu)
            raw[name] = {**result.summary(), "server_cpu_s": round(cpu, 4)}
            if name in logged:
                raw[name]["access_lines"] = logged[name]
            if len(done) > 1:
                raw[name]["rounds"] = [{**r.summary(), "server_cpu_s": round(c, 4)} for r, c in done]
            if result.errors:
                self.report.notes.append(
                    f"scenario {scenario}, {name}: {result.errors} failed requests (first: {result.first_error})"
                )
            if result.requests == 0:
                raise BenchError(f"scenario {scenario}, {name}: no request succeeded ({result.first_error})")
        raw["seconds"] = round(time.perf_counter() - started, 1)
        return results

    async def warm_up(self, target: Target) -> None:
        """Unmeasured requests first: connection pools filled, lazy imports and caches done.
        (Streams need no warm-up of their own: one would last events x event_delay.)"""
        async with load.session_for(8) as session:
            result = await load.drive(session, target.url, lambda i: self.small, concurrency=8, total=self.sizes.warmup)
        if result.errors:
            raise BenchError(f"warm-up of {target.name} failed: {result.first_error}")

    # -- the loads -----------------------------------------------------------------------------

    async def one_connection(self, target: Target, body: bytes, meter: Meter, seconds: int | None = None) -> LoadResult:
        seconds = seconds or self.sizes.latency_seconds
        if self.use_wrk:
            meter.start()
            result = load.run_wrk(target.url, body, connections=1, threads=1, seconds=seconds, workdir=self.fleet.dir)
            meter.stop()
            return result
        async with load.session_for(1) as session:
            await load.open_connections(session, target.url, body, 1)
            meter.start()
            result = await load.drive(session, target.url, lambda i: body, concurrency=1, duration=seconds)
            meter.stop()
        return result

    async def many_connections(self, target: Target, meter: Meter, seconds: int | None = None) -> LoadResult:
        s = self.sizes
        seconds = seconds or s.throughput_seconds
        if self.use_wrk:
            meter.start()
            result = load.run_wrk(
                target.url, self.small, connections=s.connections, threads=self.threads, seconds=seconds,
                workdir=self.fleet.dir,
            )  # fmt: skip
            meter.stop()
            return result
        async with load.session_for(s.connections) as session:
            await load.open_connections(session, target.url, self.small, s.connections)
            meter.start()
            result = await load.drive(
                session, target.url, lambda i: self.small, concurrency=s.connections, duration=seconds
            )
            meter.stop()
        return result

    async def streams(self, target: Target, meter: Meter) -> LoadResult:
        s = self.sizes
        async with load.session_for(s.stream_concurrency, timeout=600) as session:
            await load.open_connections(session, target.url, self.small, s.stream_concurrency)
            meter.start()
            result = await load.drive(
                session,
                target.url,
                lambda i: self.streaming,
                concurrency=s.stream_concurrency,
                total=s.streams,
                stream=True,
                ramp=s.ramp,
            )
            meter.stop()
        expected = result.requests * (s.events + 2)  # the events, the finish chunk and [DONE]
        if result.events != expected:
            self.report.notes.append(f"scenario 4, {target.name}: {result.events} SSE events, expected {expected}")
        if result.chunks < 0.95 * result.events:
            share = 100 * result.chunks / max(result.events, 1)
            self.report.notes.append(
                f"scenario 4, {target.name}: events arrived in {share:.0f} chunks per 100 (the machine fell behind "
                "and events coalesced, which lowers CPU per event)"
            )
        return result

    async def many_models(self, keymux: Server) -> None:
        s = self.sizes
        admin = f"http://{HOST}:{keymux.ready_port}/metrics"
        series_before, models_before = await scrape(admin)
        rss_before = keymux.rss_bytes() / MB
        meter = Meter(keymux)
        url = keymux.url + CHAT_PATH
        if self.use_wrk:
            head, tail = model_template()
            meter.start()
            result = load.run_wrk_numbered(
                url, head, tail, total=s.models, connections=s.model_concurrency, threads=self.threads,
                workdir=self.fleet.dir,
            )  # fmt: skip
            meter.stop()
        else:
            async with load.session_for(s.model_concurrency) as session:
                await load.open_connections(session, url, self.small, s.model_concurrency)
                meter.start()
                result = await load.drive(
                    session, url, numbered_models(), concurrency=s.model_concurrency, total=s.models
                )
                meter.stop()
        await asyncio.sleep(1.0)
        rss_after = keymux.rss_bytes() / MB
        series_after, models_after = await scrape(admin)
        self.report.raw["scenario 7"] = {
            "keymux": {**result.summary(), "server_cpu_s": round(meter.seconds, 4)},
            "rss_before_mb": rss_before,
            "rss_after_mb": rss_after,
            "series_before": series_before,
            "series_after": series_after,
            "model_labels_before": models_before,
            "model_labels_after": models_after,
        }
        if result.errors:
            self.report.notes.append(f"scenario 7: {result.errors} failed requests (first: {result.first_error})")
        add = self.report.add
        n = f"{s.models:,}"
        add(Row(7, f"RSS before {n} model names (MB)", {"keymux": rss_before}, show_ratio=False))
        add(Row(7, f"RSS after {n} model names (MB)", {"keymux": rss_after}, show_ratio=False))
        growth = 100 * (rss_after - rss_before) / rss_before
        add(Row(7, "RSS growth over that run (%)", {"keymux": growth}, "within ±10 %", abs(growth) <= 10, False, 1))
        add(Row(7, "/metrics series before", {"keymux": series_before}, show_ratio=False, digits=0))
        add(Row(7, "/metrics series after", {"keymux": series_after}, show_ratio=False, digits=0))
        cap = MAX_MODELS + 3  # the cap, plus "other", "unknown" and the key-wide "*"
        bounded = models_after <= cap and result.requests > 0
        add(
            Row(
                7,
                "distinct model labels after",
                {"keymux": models_after},
                f"≤ max_models + 3 = {cap}",
                bounded,
                False,
                0,
            )
        )

    async def profile(self, bare: Target, keymux: Target) -> None:
        """Extra, unreported runs under py-spy: both proxies at 32 connections and with SSE
        streams, then keymux with the 200 KB body. The summaries go to raw["profiles"]."""
        seconds = self.profile_seconds
        runs: list[tuple[str, Target, Callable[[Meter], Awaitable[LoadResult]]]] = [
            ("bare, 32 connections", bare, lambda m: self.many_connections(bare, m, seconds)),
            ("keymux, 32 connections", keymux, lambda m: self.many_connections(keymux, m, seconds)),
            ("bare, SSE streams", bare, lambda m: self.streams(bare, m)),
            ("keymux, SSE streams", keymux, lambda m: self.streams(keymux, m)),
            ("keymux, 200 KB body", keymux, lambda m: self.one_connection(keymux, self.big, m, seconds)),
        ]
        profiles = self.report.raw.setdefault("profiles", {})
        for label, target, drive in runs:
            output = self.fleet.dir / f"profile-{len(profiles)}.collapsed"
            spy = profile.start(target.server.pid, output)
            try:
                await asyncio.sleep(0.5)  # py-spy attaches
                await drive(Meter(target.server))
            finally:
                err = profile.stop(spy)
            if output.exists():
                profiles[label] = profile.summarize(output)
            else:
                self.report.notes.append(f"py-spy wrote nothing for {label}: {err[-300:]}")

    # -- scenario 6 -----------------------------------------------------------------------------

    def readiness(self, fake: Server) -> dict[str, float]:
        """Seconds from spawn to ready, median of a few fresh starts of each server."""
        spawners: dict[str, Callable[[], Server]] = {
            "direct": self.spawn_fake,
            "bare": lambda: self.spawn_bare(fake),
            "keymux": lambda: self.spawn_keymux(fake),
        }
        medians = {}
        for name, spawn in spawners.items():
            times = []
            for _ in range(self.sizes.ready_runs):
                server = spawn()
                try:
                    times.append(server.wait_ready())
                finally:
                    self.fleet.stop(server)
            medians[name] = statistics.median(times)
            self.report.raw.setdefault("scenario 6", {})[name] = [round(t, 4) for t in times]
        return medians

    # -- rows ----------------------------------------------------------------------------------

    def latency_rows(self, results: dict[str, tuple[LoadResult, float]], scenario: int, what: str) -> None:
        p50 = {name: r.p50 for name, (r, _) in results.items()}
        p99 = {name: r.p99 for name, (r, _) in results.items()}
        report = self.report
        if scenario == 1:
            report.add(Row(1, "latency p50, 1 connection (ms)", _ms(p50), show_ratio=False))
        added = report.ratio_target(
            Row(scenario, f"added p50 vs direct, 1 connection{what} (ms)", _added(p50)), 1.3 if scenario == 1 else 1.5
        )
        added.target += " (p50)"
        if scenario == 1:
            report.add(Row(1, "added p99 vs direct, 1 connection (ms)", _added(p99)))

    def throughput_rows(self, results: dict[str, tuple[LoadResult, float]]) -> None:
        rps = {name: r.rps for name, (r, _) in results.items()}
        cpu = {name: 1e6 * cpu / r.requests for name, (r, cpu) in results.items()}  # µs per request
        c = self.sizes.connections
        self.report.ratio_target(Row(2, f"requests/s, {c} connections", rps, digits=0), 0.85, at_least=True)
        access = {name: rps[name] for name in (KEYMUX, QUIET)}
        row = Row(2, f"requests/s, {c} connections, access log on vs off", access, digits=0, base=QUIET)
        self.report.ratio_target(row, 0.95, at_least=True)
        self.report.add(Row(2, f"server CPU µs per request, {c} connections", cpu, digits=0))

    def stream_rows(self, results: dict[str, tuple[LoadResult, float]]) -> None:
        s = self.sizes
        per_k = {name: 1000 * cpu / r.events if r.events else None for name, (r, cpu) in results.items()}
        ttfb = {name: r.ttfb_p50 for name, (r, _) in results.items()}
        what = f"{s.stream_concurrency} streams × {s.events} events"
        self.report.ratio_target(Row(4, f"server CPU s per 1k SSE events, {what}", per_k, digits=4), 1.2)
        self.report.ratio_target(Row(4, f"added TTFB p50 vs direct, {what} (ms)", _added(ttfb)), 2)

    def memory_rows(self, idle: dict[str, float], peak: dict[str, float]) -> None:
        self.report.add(Row(5, "RSS idle, after warm-up (MB)", idle, digits=1))
        self.report.ratio_target(Row(5, "RSS peak under load, scenarios 1-4 (MB)", peak, digits=1), 1.5)

    def ready_rows(self, ready: dict[str, float]) -> None:
        ms = {name: 1000 * value for name, value in ready.items()}
        runs = self.sizes.ready_runs
        row = Row(
            6,
            f"spawn to ready (keymux: /readyz), median of {runs} (ms)",
            ms,
            "keymux ≤ 1000 ms",
            show_ratio=False,
            digits=0,
        )
        row.passed = ms["keymux"] <= 1000
        self.report.add(row)


def _ms(values: dict[str, float | None]) -> dict[str, float | None]:
    return {name: None if v is None else 1000 * v for name, v in values.items()}


def _added(values: dict[str, float | None]) -> dict[str, float | None]:
    """Milliseconds over the direct figure, for the two proxies."""
    direct = values.get("direct")
    if direct is None:
        return {}
    return {name: 1000 * (v - direct) for name, v in values.items() if name != "direct" and v is not None}


async def access_lines(server: Server) -> int:
    """Access lines in the server's log so far. keymux writes a request's line after its answer
    went out, and may batch lines for up to 0.1 s, so the count is read until it holds still."""
    count = server.log_count(ACCESS_LINE)
    for _ in range(20):
        await asyncio.sleep(0.15)
        again = server.log_count(ACCESS_LINE)
        if again == count:
            break
        count = again
    return count


_MODEL_LABEL = re.compile(r'[{,]model="((?:[^"\\]|\\.)*)"')


async def scrape(url: str) -> tuple[int, int]:
    """(/metrics series, distinct values of the model label)."""
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        if response.status != 200:
            raise BenchError(f"{url} answered {response.status}")
        text = await response.text()
    series = [line for line in text.splitlines() if line and not line.startswith("#")]
    models = {m.group(1) for line in series for m in _MODEL_LABEL.finditer(line)}
    return len(series), len(models)


# -- the command ---------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")


def meta(quick: bool, use_wrk: bool) -> dict[str, Any]:
    cpu = _cpu_model()
    wrk = f"{load.wrk_version()} for 1-3 and 7, built-in aiohttp for 4" if use_wrk else "built-in aiohttp"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "machine": f"{platform.system()} {platform.machine()}" + (f" ({cpu})" if cpu else ""),
        "python": platform.python_version(),
        "load": wrk,
        "quick": quick,
        "command": " ".join([Path(sys.executable).name, "-m", "bench", *sys.argv[1:]]),
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description="keymux's benchmark (issue 5)")
    parser.add_argument("--quick", action="store_true", help="tiny counts: a smoke run for CI, under 30 s")
    parser.add_argument("--json", metavar="FILE", help="also write every figure and raw result as JSON")
    parser.add_argument("--load", choices=("auto", "wrk", "builtin"), default="auto",
                        help="load generator for scenarios 1-3 and 7 (auto: wrk when installed)")  # fmt: skip
    parser.add_argument("--profile", type=int, metavar="SECONDS", default=0,
                        help="after scenario 5, sample bare and keymux with py-spy for SECONDS per load")  # fmt: skip
    parser.add_argument("--strict", action="store_true", help="exit 3 when a target fails")
    return parser


def _stop_on_sigterm(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt  # unwinds like Ctrl-C, so every server is stopped


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    use_wrk = args.load == "wrk" or (args.load == "auto" and load.wrk_path() is not None)
    if args.load == "wrk" and load.wrk_path() is None:
        print("bench: --load wrk, but wrk is not installed", file=sys.stderr)
        return 2
    if args.profile and profile.py_spy() is None:
        print("bench: --profile needs py-spy (pip install py-spy)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    raise_fd_limit()
    report = Report(meta(args.quick, use_wrk))
    started = time.perf_counter()
    try:
        with Fleet() as fleet:
            bench = Bench(fleet, QUICK if args.quick else FULL, use_wrk, report, args.profile)
            asyncio.run(bench.run())
    except KeyboardInterrupt:
        print("bench: interrupted; every server it started is stopped", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    report.meta["seconds"] = round(time.perf_counter() - started, 1)
    print(report.table())
    print(f"({report.meta['seconds']} s; direct = the fake provider itself, so its CPU and memory are the upstream's)")
    for label, summary in report.raw.get("profiles", {}).items():
        print(f"\n{label}: {summary}")
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    failed = any(row.passed is False for row in report.rows)
    return 3 if args.strict and failed else 0
