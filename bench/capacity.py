"""The capacity scenario (issue 11): keys of unequal size behind several keymux pods.

One fake provider in bucket mode limits three OpenAI keys to 20, 10 and 5 requests/s (35/s in
all; a token bucket per key and model, one second of burst, OpenAI's x-ratelimit-* headers on
every answer, 429s without Retry-After) and answers a fourth key as revoked. N keymux processes
(default 4) hold all four keys, each with its own health state, and an open-loop generator spreads
requests round-robin over them at 80 % and at 120 % of the keys' capacity. Every figure comes from
the client's answers and the fake provider's own counts (GET /_fake/stats).

    python -m bench.capacity              # two runs of 20 s: about a minute
    python -m bench.capacity --quick      # two runs of 5 s: about 20 s
    python -m bench.capacity --shared redis://127.0.0.1:6379/0
        # the scenario twice, side by side: pods on their own, then the same pods sharing key
        # health through that Redis (issue 12's targets); about two minutes
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

import aiohttp

from bench.load import APP_HEADERS, percentile, session_for
from bench.procs import HOST, BenchError, Fleet, Server, free_port, port_open, raise_fd_limit
from bench.run import CHAT_PATH, chat_body

# Key name -> requests per second the fake provider allows it (per model).
RATES = {"rps20": 20.0, "rps10": 10.0, "rps5": 5.0}
REVOKED = "revoked"
CAPACITY = sum(RATES.values())  # requests per second over every usable key
LATENCY = 0.05  # the fake provider's time to answer a success, seconds
LOADS = (0.8, 1.2)  # offered load as a share of CAPACITY
REQUEST_TIMEOUT = 10.0  # seconds, per request; the client never retries
BODY = chat_body()


@dataclass(frozen=True)
class Sizes:
    seconds: float  # arrivals of each run
    pause: float  # between the warm-up and each run: every bucket refills, every cooldown ends


FULL = Sizes(seconds=20.0, pause=3.0)
QUICK = Sizes(seconds=5.0, pause=1.5)


def secret(name: str) -> str:
    return f"sk-capacity-{name}-{'x' * 24}"


def keymux_config(fake_url: str, port: int, admin_port: int, shared: str | None = None) -> str:
    """One OpenAI provider with the four keys; keymux's defaults for everything else (the access
    log on), except a short drain so that the pods stop at once. `shared`: a `shared:` section."""
    keys = "".join(f"      - name: {name}\n        key: {secret(name)}\n" for name in (*RATES, REVOKED))
    return (
        (shared or "")
        + f"""\
listen: {HOST}:{port}
admin_listen: {HOST}:{admin_port}
providers:
  openai:
    type: openai
    base_url: {fake_url}
    keys:
{keys}shutdown:
  drain_delay: 0.01
  drain_timeout: 2
"""
    )


# -- the load ----------------------------------------------------------------------------------


def arrivals(rate: float, seconds: float, kind: str, rng: random.Random) -> list[float]:
    """Send times (seconds from the start) of rate × seconds requests. `poisson`: a Poisson
    process with exactly that many arrivals (sorted uniform times); `uniform`: evenly spaced."""
    count = round(rate * seconds)
    if kind == "uniform":
        return [i / rate for i in range(count)]
    return sorted(rng.uniform(0, seconds) for _ in range(count))


@dataclass
class Answer:
    status: int | None  # None: no answer (see error)
    latency: float  # seconds from sending to the end of the body
    lag: float  # seconds the send was late on its schedule (the generator's own delay)
    retry_after: bool = False
    error: str | None = None
    end: float = 0.0  # perf_counter at the end of the answer


async def one(session: aiohttp.ClientSession, url: str, due: float) -> Answer:
    sent = time.perf_counter()
    try:
        async with session.post(url, data=BODY, headers=APP_HEADERS) as response:
            await response.read()
            end = time.perf_counter()
            return Answer(response.status, end - sent, sent - due, "Retry-After" in response.headers, end=end)
    except TimeoutError:
        return Answer(None, time.perf_counter() - sent, sent - due, error="timeout")
    except (aiohttp.ClientError, OSError) as exc:
        return Answer(None, time.perf_counter() - sent, sent - due, error=type(exc).__name__)


async def open_loop(session: aiohttp.ClientSession, urls: Sequence[str], schedule: list[float]) -> list[Answer]:
    """Each request at its time whatever the earlier ones are doing, round-robin over `urls`."""
    start = time.perf_counter() + 0.05
    tasks = []
    for i, at in enumerate(schedule):
        due = start + at
        wait = due - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(one(session, urls[i % len(urls)], due)))
    return list(await asyncio.gather(*tasks))


async def fake_stats(session: aiohttp.ClientSession, fake: Server) -> dict[str, Counter[str]]:
    """What the fake provider answered so far, by key name: served, 429, 401, ..."""
    names = {secret(name): name for name in (*RATES, REVOKED)}
    async with session.get(fake.url + "/_fake/stats") as response:
        if response.status != 200:
            raise BenchError(f"the fake provider's /_fake/stats answered {response.status}")
        keys = (await response.json())["keys"]
    return {names.get(key, key or "(none)"): Counter(counts) for key, counts in keys.items()}


def since(after: dict[str, Counter[str]], before: dict[str, Counter[str]]) -> dict[str, dict[str, int]]:
    """The answers between two reads of the stats, by key in the config's order."""
    order = [*RATES, REVOKED, *sorted(set(after) - {*RATES, REVOKED})]
    return {name: dict(after.get(name, Counter()) - before.get(name, Counter())) for name in order}


# -- the figures ---------------------------------------------------------------------------------


def statuses(answers: list[Answer]) -> dict[str, int]:
    counts = Counter(str(a.status) if a.status is not None else a.error or "error" for a in answers)
    return dict(sorted(counts.items(), key=lambda item: (not item[0].isdigit(), item[0])))


def figures(answers: list[Answer], upstream: dict[str, dict[str, int]], rate: float, seconds: float) -> dict[str, Any]:
    sent = len(answers)
    served = [a for a in answers if a.status is not None and 200 <= a.status < 300]
    failed = [a for a in answers if a.status is None or not 200 <= a.status < 300]
    app_429 = [a for a in answers if a.status == 429]
    attempts = sum(sum(counts.values()) for counts in upstream.values())
    upstream_429 = sum(counts.get("429", 0) for counts in upstream.values())
    latencies = sorted(a.latency for a in served)
    lags = sorted(a.lag for a in answers)
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    # Served over the span they were served in: from the first send to the last 2xx, which is
    # later than the last arrival when requests wait for capacity (retry.max_wait).
    first = min((a.end - a.latency for a in answers), default=0.0)
    span = max(seconds, max((a.end for a in served), default=first) - first)
    goodput = len(served) / span
    return {
        "offered_rps": rate,
        "seconds": seconds,
        "span_s": span,
        "sent": sent,
        "served": len(served),
        "served_share": len(served) / sent if sent else None,
        "goodput_rps": goodput,
        "goodput_share": goodput / CAPACITY,
        # The most the buckets can serve in a run: their rate, plus the one second of burst they
        # start with (the pause before each run refills them), as a share of capacity.
        "goodput_ceiling_share": (CAPACITY * span + CAPACITY) / span / CAPACITY,
        "upstream_attempts": attempts,
        "upstream_429": upstream_429,
        "upstream_429_per_100_requests": 100 * upstream_429 / sent if sent else None,
        "upstream_429_per_100_attempts": 100 * upstream_429 / attempts if attempts else None,
        "revoked_attempts": sum(upstream.get(REVOKED, {}).values()),
        "app_statuses": statuses(answers),
        "app_429_with_retry_after_share": sum(a.retry_after for a in app_429) / len(app_429) if app_429 else None,
        "non_2xx_all_429_with_retry_after": all(a.status == 429 and a.retry_after for a in failed),
        "p50_s": p50,
        "p99_s": p99,
        "added_p50_s": None if p50 is None else p50 - LATENCY,
        "added_p99_s": None if p99 is None else p99 - LATENCY,
        "p99_over_provider_latency": None if p99 is None else p99 / LATENCY,
        "generator_lag_p99_s": percentile(lags, 99),
        "generator_lag_max_s": lags[-1] if lags else None,
        "upstream_by_key": upstream,
    }


@dataclass
class Target:
    run: str
    what: str
    passed: bool


def targets(runs: dict[str, dict[str, Any]]) -> list[Target]:
    """Issue 11's targets, on the 80 % and 120 % runs."""
    found = []
    if (low := runs.get("80%")) is not None:
        per_100 = low["upstream_429_per_100_requests"]
        found += [
            Target("80%", "every request served (2xx)", low["served"] == low["sent"]),
            Target("80%", "upstream 429s ≤ 1 per 100 requests", per_100 is not None and per_100 <= 1),
            Target(
                "80%",
                f"p99 ≤ 1.5 × provider latency ({1.5 * LATENCY * 1000:.0f} ms)",
                low["p99_s"] is not None and low["p99_s"] <= 1.5 * LATENCY,
            ),
        ]
    if (high := runs.get("120%")) is not None:
        per_100 = high["upstream_429_per_100_attempts"]
        found += [
            Target("120%", "goodput ≥ 95 % of capacity", high["goodput_share"] >= 0.95),
            Target("120%", "upstream 429s ≤ 2 per 100 attempts", per_100 is not None and per_100 <= 2),
            Target("120%", "every non-2xx answer is a 429 with Retry-After", high["non_2xx_all_429_with_retry_after"]),
        ]
    return found


# -- the run ------------------------------------------------------------------------------------


class Capacity:
    def __init__(
        self, fleet: Fleet, sizes: Sizes, pods: int, arrivals: str, seed: int, shared: str | None = None
    ) -> None:
        self.fleet = fleet
        self.shared = shared  # a `shared:` section for every pod, or None
        self.sizes = sizes
        self.pods = pods
        self.arrivals = arrivals
        self.rng = random.Random(seed)
        self.config = ""
        self.results: dict[str, Any] = {}

    def spawn_fake(self) -> Server:
        port = free_port()
        buckets = ",".join(f"{secret(name)}={rate:g}" for name, rate in RATES.items())
        args = ["-m", "sidecar.fake_provider", "--port", str(port), "--buckets", buckets,
                "--revoked", secret(REVOKED), "--latency", str(LATENCY)]  # fmt: skip
        return self.fleet.spawn("fake", args, port, port, "/_fake/stats")

    def spawn_keymux(self, fake: Server, n: int) -> Server:
        port, admin = free_port(), free_port()
        self.config = keymux_config(fake.url, port, admin, self.shared)
        path = self.fleet.write(f"keymux-{n}.yaml", self.config)
        return self.fleet.spawn(f"keymux-{n}", ["-m", "sidecar", "--config", str(path)], port, admin, "/readyz")

    async def run(self) -> None:
        fake = started(self.spawn_fake())
        spawned = [self.spawn_keymux(fake, n) for n in range(self.pods)]
        pods = [started(pod) for pod in spawned]
        urls = [pod.url + CHAT_PATH for pod in pods]
        async with session_for(1024, timeout=REQUEST_TIMEOUT) as session:
            self.results["warmup"] = await self.warm_up(session, fake, urls)
            for load in LOADS:
                await asyncio.sleep(self.sizes.pause)
                name = f"{load * 100:.0f}%"
                self.results[name] = await self.measure(session, fake, urls, load * CAPACITY)
                for pod in pods:
                    if pod.popen.poll() is not None:
                        raise BenchError(f"{pod.name} exited with {pod.popen.returncode}:\n{pod.log_tail()}")

    async def warm_up(self, session: aiohttp.ClientSession, fake: Server, urls: list[str]) -> dict[str, Any]:
        """One round of the keys through each pod, one request at a time, pod after pod (16
        requests with 4 pods, under the 35 of burst): connections opened, and the revoked key met,
        as by pods that have been running; on their own each pod meets it, sharing one pod does.
        Every answer must be a 2xx."""
        before = await fake_stats(session, fake)
        answers = [await one(session, url, time.perf_counter()) for url in urls for _ in range(len(RATES) + 1)]
        if any(a.status != 200 for a in answers):
            raise BenchError(f"warm-up: answers {statuses(answers)}, expected 200 only")
        return {"app_statuses": statuses(answers), "upstream_by_key": since(await fake_stats(session, fake), before)}

    async def measure(
        self, session: aiohttp.ClientSession, fake: Server, urls: list[str], rate: float
    ) -> dict[str, Any]:
        schedule = arrivals(rate, self.sizes.seconds, self.arrivals, self.rng)
        before = await fake_stats(session, fake)
        answers = await open_loop(session, urls, schedule)
        upstream = since(await fake_stats(session, fake), before)
        return figures(answers, upstream, rate, self.sizes.seconds)


def started(server: Server) -> Server:
    """Ready (keymux: admin /readyz 200), and its traffic port open too."""
    server.wait_ready()
    deadline = time.perf_counter() + 10
    while not port_open(server.port):
        if time.perf_counter() > deadline:
            raise BenchError(f"{server.name}: port {server.port} does not answer:\n{server.log_tail()}")
        time.sleep(0.005)
    return server


# -- the table ----------------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.1f}"


def _share(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


def _number(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _statuses(counts: dict[str, int]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in counts.items()) + "}" if counts else "none"


ROWS: list[tuple[str, Any]] = [
    ("offered load (requests/s)", lambda f: _number(f["offered_rps"])),
    ("requests sent", lambda f: str(f["sent"])),
    ("served (2xx), share of requests", lambda f: _share(f["served_share"])),
    ("goodput (2xx/s, over the span served)", lambda f: _number(f["goodput_rps"])),
    (f"goodput, share of capacity ({CAPACITY:g}/s)", lambda f: _share(f["goodput_share"])),
    ("  ceiling: capacity + one burst", lambda f: _share(f["goodput_ceiling_share"])),
    ("upstream attempts (every key)", lambda f: str(f["upstream_attempts"])),
    ("upstream 429s", lambda f: str(f["upstream_429"])),
    ("upstream 429s per 100 requests", lambda f: _number(f["upstream_429_per_100_requests"])),
    ("upstream 429s per 100 attempts", lambda f: _number(f["upstream_429_per_100_attempts"])),
    ("attempts on the revoked key", lambda f: str(f["revoked_attempts"])),
    ("app answers by status", lambda f: _statuses(f["app_statuses"])),
    ("app 429s carrying Retry-After", lambda f: _share(f["app_429_with_retry_after_share"])),
    ("latency p50, 2xx (ms)", lambda f: _ms(f["p50_s"])),
    ("latency p99, 2xx (ms)", lambda f: _ms(f["p99_s"])),
    (f"added p50 (ms, minus the provider's {LATENCY * 1000:.0f})", lambda f: _ms(f["added_p50_s"])),
    (f"added p99 (ms, minus the provider's {LATENCY * 1000:.0f})", lambda f: _ms(f["added_p99_s"])),
    ("p99 / provider latency", lambda f: _number(f["p99_over_provider_latency"], 2)),
    ("generator lag p99 / max (ms)", lambda f: f"{_ms(f['generator_lag_p99_s'])} / {_ms(f['generator_lag_max_s'])}"),
]


def _by_key(upstream: dict[str, dict[str, int]]) -> str:
    return "; ".join(f"{key} {_statuses(counts)}" for key, counts in upstream.items())


def table(meta: dict[str, Any], runs: dict[str, dict[str, Any]], warmup: dict[str, Any], found: list[Target]) -> str:
    names = list(runs)
    header = ("figure", *(f"{name} of capacity" for name in names))
    body = [(label, *(cell(runs[name]) for name in names)) for label, cell in ROWS]
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]

    def render(line: tuple[str, ...]) -> str:
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    rates = " + ".join(f"{rate:g}" for rate in RATES.values())
    lines = [
        f"keymux capacity scenario · {meta['date']} · nproc {meta['nproc']} · Python {meta['python']}"
        f"{' · QUICK' if meta['quick'] else ''}",
        f"{meta['pods']} keymux pods · keys of {rates} = {CAPACITY:g} requests/s + 1 revoked · provider latency "
        f"{LATENCY * 1000:.0f} ms · {meta['arrivals']} arrivals (seed {meta['seed']}), {meta['seconds']:g} s per run",
        render(header),
        rule,
        *(render(line) for line in body),
        rule,
    ]
    for name in names:
        lines.append(f"upstream answers by key, {name}: {_by_key(runs[name]['upstream_by_key'])}")
    lines.append(
        f"warm-up, not measured ({sum(warmup['app_statuses'].values())} requests, one at a time per pod): "
        f"{_by_key(warmup['upstream_by_key'])}"
    )
    lines.append("targets (issue 11):")
    lines += [f"  {'PASS' if t.passed else 'FAIL'}  {t.run:>4}  {t.what}" for t in found]
    lines.append(f"targets: {sum(t.passed for t in found)} of {len(found)} pass")
    return "\n".join(lines)


# -- the command ----------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.capacity", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"runs of {QUICK.seconds:g} s: a smoke run, about 20 s")
    parser.add_argument("--pods", type=int, default=4, help="keymux processes (default 4)")
    parser.add_argument(
        "--seconds", type=float, help=f"arrivals per run (default {FULL.seconds:g}, quick {QUICK.seconds:g})"
    )
    parser.add_argument("--arrivals", choices=("poisson", "uniform"), default="poisson",
                        help="poisson: random times, rate × seconds of them; uniform: evenly spaced")  # fmt: skip
    parser.add_argument("--seed", type=int, default=11, help="of the Poisson arrival times (default 11)")
    parser.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    parser.add_argument("--strict", action="store_true", help="exit 3 when a target fails")
    parser.add_argument(
        "--shared", metavar="REDIS_URL", help="also run the same pods sharing key health through this Redis"
    )
    return parser


def _stop_on_sigterm(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt  # unwinds like Ctrl-C, so every server is stopped


def scenario(args: argparse.Namespace, sizes: Sizes, shared: str | None) -> tuple[Capacity, dict[str, Any]]:
    """One run of the scenario: fresh servers, the warm-up, then each load."""
    with Fleet() as fleet:
        capacity = Capacity(fleet, sizes, args.pods, args.arrivals, args.seed, shared)
        asyncio.run(capacity.run())
    return capacity, {name: capacity.results[name] for name in (f"{load * 100:.0f}%" for load in LOADS)}


def fleet_targets(alone: dict[str, Any], shared: Capacity, together: dict[str, Any]) -> list[Target]:
    """Issue 12's targets: the pods sharing key health, against the same pods on their own."""
    revoked = sum(shared.results["warmup"]["upstream_by_key"].get(REVOKED, {}).values()) + sum(
        run["revoked_attempts"] for run in together.values()
    )
    low = together["80%"]
    per_100 = low["upstream_429_per_100_requests"]
    p50_on, p50_off = low["added_p50_s"], alone["80%"]["added_p50_s"]
    ratio = p50_on / p50_off if p50_on is not None and p50_off else None
    return [
        Target("all", f"revoked-key attempts across the fleet = 1 per cooldown ({revoked})", revoked == 1),
        Target(
            "80%",
            f"upstream 429s ≤ 1 per 100 requests, shared ({_number(per_100)})",
            per_100 is not None and per_100 <= 1,
        ),
        Target("80%", f"added p50 shared ≤ 1.05 × alone ({_number(ratio, 2)})", ratio is not None and ratio <= 1.05),
    ]


def _forget(url: str, namespace: str) -> None:
    import redis  # only for --shared

    store = redis.Redis.from_url(url)
    try:
        names = list(store.scan_iter(match=f"{namespace}:*"))
        if names:
            store.delete(*names)
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.pods < 1:
        print("bench.capacity: --pods must be at least 1", file=sys.stderr)
        return 2
    sizes = QUICK if args.quick else FULL
    if args.seconds is not None:
        sizes = Sizes(seconds=args.seconds, pause=sizes.pause)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    raise_fd_limit()
    began = time.perf_counter()
    namespace = f"bench-capacity-{os.getpid()}-{int(time.time())}"
    try:
        capacity, runs = scenario(args, sizes, None)
        if args.shared:
            section = f"shared:\n  redis_url: {args.shared}\n  namespace: {namespace}\n"
            together, shared_runs = scenario(args, sizes, section)
    except KeyboardInterrupt:
        print("bench.capacity: interrupted; every server it started is stopped", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"bench.capacity: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.shared:
            _forget(args.shared, namespace)
    found = targets(runs)
    meta = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "machine": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "quick": args.quick,
        "pods": args.pods,
        "arrivals": args.arrivals,
        "seed": args.seed,
        "seconds": sizes.seconds,
        "pause": sizes.pause,
        "rates": RATES,
        "provider_latency_s": LATENCY,
        "request_timeout_s": REQUEST_TIMEOUT,
        "wall_seconds": round(time.perf_counter() - began, 1),
        "command": " ".join([Path(sys.executable).name, "-m", "bench.capacity", *sys.argv[1:]]),
    }
    print(table(meta, runs, capacity.results["warmup"], found))
    report: dict[str, Any] = {
        "meta": meta,
        "runs": runs,
        "warmup": capacity.results["warmup"],
        "targets": [asdict(t) for t in found],
        "keymux_config": capacity.config,
    }
    passed = all(t.passed for t in found)
    if args.shared:
        fleet = fleet_targets(runs, together, shared_runs)
        print()
        print("the same pods sharing key health through Redis (shared:):")
        print(
            table(
                {**meta, "pods": f"{args.pods} shared"}, shared_runs, together.results["warmup"], targets(shared_runs)
            )
        )
        print("targets (issue 12, shared against alone):")
        print("\n".join(f"  {'PASS' if t.passed else 'FAIL'}  {t.run:>4}  {t.what}" for t in fleet))
        report["shared"] = {
            "runs": shared_runs,
            "warmup": together.results["warmup"],
            "targets": [asdict(t) for t in [*targets(shared_runs), *fleet]],
        }
        passed = passed and all(t.passed for t in fleet)
    print(f"({round(time.perf_counter() - began, 1)} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 3 if args.strict and not passed else 0


if __name__ == "__main__":
    raise SystemExit(main())
