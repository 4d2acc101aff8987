"""Load generators: wrk when installed, else a built-in aiohttp one.

Both return a `LoadResult`. Non-2xx answers count as errors: a fast 404 is not a result.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import shutil
import signal
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.procs import BenchError

APP_HEADERS = {
    "Content-Type": "application/json",
    # The app's placeholder credential: keymux swaps in its own key; the fake accepts any.
    "Authorization": "Bearer sk-bench-app-placeholder",
}


@dataclass
class LoadResult:
    requests: int  # answered with 2xx
    errors: int
    elapsed: float  # seconds
    p50: float | None = None  # request latency, seconds
    p99: float | None = None
    ttfb_p50: float | None = None  # time to the first body byte (streams), seconds
    ttfb_p99: float | None = None
    events: int = 0  # SSE events received
    chunks: int = 0  # body reads that returned data, for streams (== events: none coalesced)
    first_error: str | None = None
    tool: str = "built-in"
    median_rps: float | None = None  # of the rounds, when several were combined

    @property
    def rps(self) -> float:
        if self.median_rps is not None:
            return self.median_rps
        return self.requests / self.elapsed if self.elapsed > 0 else 0.0

    def summary(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "elapsed_s": round(self.elapsed, 3),
            "rps": round(self.rps, 1),
            "p50_ms": _ms(self.p50),
            "p99_ms": _ms(self.p99),
            "ttfb_p50_ms": _ms(self.ttfb_p50),
            "ttfb_p99_ms": _ms(self.ttfb_p99),
            "events": self.events,
            "chunks": self.chunks,
            "first_error": self.first_error,
            "tool": self.tool,
        }


def combine(rounds: list[LoadResult]) -> LoadResult:
    """Interleaved rounds of one load as one result: totals summed, figures the median round's,
    so a burst of outside load during one round moves the figure little."""
    if len(rounds) == 1:
        return rounds[0]

    def median(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.median(known) if known else None

    first = rounds[0]
    result = LoadResult(
        requests=sum(r.requests for r in rounds),
        errors=sum(r.errors for r in rounds),
        elapsed=sum(r.elapsed for r in rounds),
        p50=median([r.p50 for r in rounds]),
        p99=median([r.p99 for r in rounds]),
        ttfb_p50=median([r.ttfb_p50 for r in rounds]),
        ttfb_p99=median([r.ttfb_p99 for r in rounds]),
        events=sum(r.events for r in rounds),
        chunks=sum(r.chunks for r in rounds),
        first_error=next((r.first_error for r in rounds if r.first_error), None),
        tool=first.tool,
    )
    result.median_rps = statistics.median(r.rps for r in rounds)
    return result


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 4)


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


# -- the built-in generator ------------------------------------------------------------------


def session_for(concurrency: int, timeout: float = 120.0) -> aiohttp.ClientSession:
    """A client session with `concurrency` persistent connections, kept alive between requests."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=120),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
        timeout=aiohttp.ClientTimeout(total=timeout),
    )


async def open_connections(session: aiohttp.ClientSession, url: str, body: bytes, count: int) -> None:
    """`count` requests at once, unmeasured, so the measured ones find their connections open
    (a burst of new connections overflows listen backlogs and measures SYN retries instead)."""
    await asyncio.gather(*(_one(session, url, body, False) for _ in range(count)))


async def drive(
    session: aiohttp.ClientSession,
    url: str,
    body: Callable[[int], bytes],
    *,
    concurrency: int,
    duration: float | None = None,
    total: int | None = None,
    stream: bool = False,
    ramp: float = 0.0,
) -> LoadResult:
    """`concurrency` workers POST body(i) until `total` requests or `duration` seconds,
    whichever ends first, each timing every request it makes. `ramp`: the workers' first
    requests are spread evenly over this many seconds instead of arriving as one burst."""
    if duration is None and total is None:
        raise ValueError("give a duration or a total")
    return await _Run(session, url, body, stream, concurrency, duration, total, ramp).go()


class _Run:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        body: Callable[[int], bytes],
        stream: bool,
        concurrency: int,
        duration: float | None,
        total: int | None,
        ramp: float,
    ) -> None:
        self.session, self.url, self.body, self.stream = session, url, body, stream
        self.concurrency, self.duration, self.total, self.ramp = concurrency, duration, total, ramp
        self.latencies: list[float] = []
        self.ttfbs: list[float] = []
        self.events = 0
        self.chunks = 0
        self.errors = 0
        self.first_error: str | None = None
        self.numbers = itertools.count()
        self.deadline = math.inf

    async def go(self) -> LoadResult:
        started = time.perf_counter()
        if self.duration is not None:
            self.deadline = started + self.duration
        step = self.ramp / self.concurrency
        await asyncio.gather(*(self._worker(n * step) for n in range(self.concurrency)))
        elapsed = time.perf_counter() - started
        self.latencies.sort()
        self.ttfbs.sort()
        return LoadResult(
            requests=len(self.latencies),
            errors=self.errors,
            elapsed=elapsed,
            p50=percentile(self.latencies, 50),
            p99=percentile(self.latencies, 99),
            ttfb_p50=percentile(self.ttfbs, 50) if self.stream else None,
            ttfb_p99=percentile(self.ttfbs, 99) if self.stream else None,
            events=self.events,
            chunks=self.chunks,
            first_error=self.first_error,
        )

    async def _worker(self, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        perf_counter = time.perf_counter
        while True:
            i = next(self.numbers)
            if (self.total is not None and i >= self.total) or perf_counter() >= self.deadline:
                return
            if self.errors > 100 and self.errors > len(self.latencies):
                return  # mostly failing: stop early, the caller reports the first error
            started = perf_counter()
            try:
                first_byte, events, chunks = await _one(self.session, self.url, self.body(i), self.stream)
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                self._error(str(exc) if isinstance(exc, NotOk) else f"{type(exc).__name__}: {exc}")
                continue
            self.latencies.append(perf_counter() - started)
            if self.stream:
                self.ttfbs.append(first_byte - started)
                self.events += events
                self.chunks += chunks

    def _error(self, text: str) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = text


class NotOk(ValueError):
    """An answer that is not 2xx."""


async def _one(session: aiohttp.ClientSession, url: str, body: bytes, stream: bool) -> tuple[float, int, int]:
    """One request: (perf_counter at the first body byte, SSE events, chunks received)."""
    async with session.post(url, data=body, headers=APP_HEADERS) as response:
        if response.status >= 300:
            detail = (await response.read())[:200].decode(errors="replace")
            raise NotOk(f"HTTP {response.status}: {detail}")
        if not stream:
            await response.read()
            return time.perf_counter(), 0, 0
        first: float | None = None
        events = chunks = 0
        last = b""
        async for chunk in response.content.iter_any():
            if first is None:
                first = time.perf_counter()
            # An event ends with a blank line; the "\n\n" may straddle two chunks.
            events += chunk.count(b"\n\n") + (last == b"\n" and chunk[:1] == b"\n")
            last = chunk[-1:]
            chunks += 1
        return (first if first is not None else time.perf_counter()), events, chunks


# -- wrk ----------------------------------------------------------------------------------------

_WRK_COMMON = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench-app-placeholder"

local function slurp(path)
  local file = assert(io.open(path, "rb"))
  local text = file:read("*a")
  file:close()
  return text
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d, "p50_us": %.3f, "p99_us": %.3f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""

_WRK_FIXED_BODY = """
wrk.body = slurp(@BODY@)
"""

# Every request names a model never sent before: bench-model-<thread>-<n>. Each thread stops
# after its share of answers and says so; the caller then ends wrk with SIGINT.
_WRK_NUMBERED = """
local head, tail = slurp(@HEAD@), slurp(@TAIL@)
local threads = 0

function setup(thread)
  thread:set("id", threads)
  threads = threads + 1
end

local sent, answered = 0, 0

function request()
  sent = sent + 1
  return wrk.format(nil, nil, nil, head .. "bench-model-" .. id .. "-" .. sent .. tail)
end

function response(status, headers, body)
  answered = answered + 1
  if answered == @QUOTA@ then
    io.write("BENCH_THREAD_DONE\\n")
    io.flush()
    wrk.thread:stop()
  end
end
"""
_WRK_ERRORS = ("connect", "read", "write", "status", "timeout")


def wrk_path() -> str | None:
    return shutil.which("wrk")


def wrk_version() -> str:
    path = wrk_path()
    if path is None:
        return ""
    done = subprocess.run([path, "-v"], capture_output=True, text=True, check=False)
    first = (done.stdout or done.stderr).splitlines()
    return first[0].split("[")[0].strip() if first else "wrk"


def run_wrk(url: str, body: bytes, *, connections: int, threads: int, seconds: int, workdir: Path) -> LoadResult:
    """wrk POSTing one body for `seconds`, its figures read from the done() hook's JSON line."""
    lua = {"@BODY@": _write(workdir, f"body-{len(body)}.json", body)}
    script = _script(workdir, f"post-{len(body)}.lua", _WRK_FIXED_BODY, lua)
    command = _wrk_command(url, script, connections, threads, seconds)
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=False)
    return _wrk_result(done.returncode, done.stdout, done.stderr)


def run_wrk_numbered(
    url: str, head: bytes, tail: bytes, *, total: int, connections: int, threads: int, workdir: Path
) -> LoadResult:
    """wrk sending at least `total` requests, each body head + a new model name + tail."""
    threads = max(1, min(threads, connections))
    quota = math.ceil(total / threads)
    lua = {
        "@HEAD@": _write(workdir, "head.json", head),
        "@TAIL@": _write(workdir, "tail.json", tail),
        "@QUOTA@": str(quota),
    }
    script = _script(workdir, "numbered.lua", _WRK_NUMBERED, lua)
    limit = max(120, total // 200)  # seconds: only reached if wrk cannot finish
    wrk = subprocess.Popen(
        _wrk_command(url, script, connections, threads, limit),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wrk.stdout is not None
        lines, finished = [], 0
        for line in wrk.stdout:
            lines.append(line)
            finished += line.startswith("BENCH_THREAD_DONE")
            if finished == threads and wrk.poll() is None:
                wrk.send_signal(signal.SIGINT)  # wrk prints its summary and exits
        _, err = wrk.communicate(timeout=30)
    finally:
        if wrk.poll() is None:
            wrk.kill()
            wrk.wait()
    return _wrk_result(wrk.returncode, "".join(lines), err)


def _write(workdir: Path, name: str, data: bytes) -> str:
    path = workdir / name
    path.write_bytes(data)
    return json.dumps(str(path))  # a valid Lua string literal


def _script(workdir: Path, name: str, body: str, values: dict[str, str]) -> Path:
    text = _WRK_COMMON + body
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    path = workdir / name
    path.write_text(text)
    return path


def _wrk_command(url: str, script: Path, connections: int, threads: int, seconds: int) -> list[str]:
    path = wrk_path()
    if path is None:
        raise BenchError("wrk is not installed")
    threads = max(1, min(threads, connections))
    return [path, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "-s", str(script), url]


def _wrk_result(returncode: int, stdout: str, stderr: str) -> LoadResult:
    line = next((x for x in stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
    if returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({returncode}): {stderr.strip() or stdout.strip()}")
    figures = json.loads(line.removeprefix("BENCH_JSON "))
    errors = sum(figures[k] for k in _WRK_ERRORS)
    first_error = None
    if errors:
        first_error = "wrk errors: " + ", ".join(f"{k} {figures[k]}" for k in _WRK_ERRORS if figures[k])
    return LoadResult(
        requests=max(figures["requests"] - figures["status"], 0),
        errors=errors,
        elapsed=figures["duration_us"] / 1e6,
        p50=figures["p50_us"] / 1e6,
        p99=figures["p99_us"] / 1e6,
        first_error=first_error,
        tool="wrk",
    )
