"""The buffered access log: the same JSON line as the logging path, and no line lost on the way out."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
import signal
import socket
import subprocess
import sys
import textwrap
import weakref
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from sidecar.accesslog import AccessLog
from sidecar.logs import JsonFormatter
from tests.conftest import FakeServer, openai_config

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])

NOON = 1735732800.125  # 2025-01-01T12:00:00.125Z, exact in binary
FIELD_ORDER = [
    "time",
    "level",
    "logger",
    "msg",
    "route",
    "method",
    "provider",
    "keys",
    "model",
    "attempts",
    "outcome",
    "status",
    "ttfb_ms",
    "duration_ms",
    "bytes",
]


class Sink:
    """A writer that records what it was given; it may refuse or take only part, as os.write may."""

    def __init__(self, refusals: list[BaseException | int | None] | None = None) -> None:
        self.data = bytearray()
        self.calls = 0
        # One entry per call: an exception to raise, a cap on bytes to take, or None for all.
        self.script = list(refusals or [])

    def __call__(self, data: bytes) -> int:
        self.calls += 1
        step = self.script.pop(0) if self.script else None
        if isinstance(step, BaseException):
            raise step
        taken = data if step is None else data[:step]
        self.data += taken
        return len(taken)

    def lines(self) -> list[dict[str, object]]:
        text = self.data.decode("ascii")
        assert text == "" or text.endswith("\n")
        return [json.loads(line) for line in text.splitlines()]


def make(write: Callable[[bytes], int], **kwargs: float) -> AccessLog:
    return AccessLog(write, wall=lambda: NOON, **kwargs)  # type: ignore[arg-type]


def log_request(log: AccessLog, n: int = 0, **overrides: object) -> None:
    fields: dict[str, object] = {
        "route": "/",
        "method": "POST",
        "provider": "openai",
        "keys": ["openai/a", "openai/b"],
        "model": "gpt-4o-mini",
        "attempts": 2,
        "outcome": "success",
        "status": 200,
        "ttfb_ms": 412.5,
        "duration_ms": 1830.2,
        "bytes_out": n,
    }
    fields.update(overrides)
    log.request(**fields)  # type: ignore[arg-type]


def test_a_request_line_has_every_field_in_the_documented_order() -> None:
    sink = Sink()
    log = make(sink)
    log_request(log, 5120, ttfb_ms=412.4999, duration_ms=1830.2049)
    log_request(log, 0, ttfb_ms=None, outcome="timeout", status=504, attempts=1, keys=["openai/a"])
    log.flush()
    first, second = sink.data.decode().splitlines()
    assert json.loads(first) == {
        "time": "2025-01-01T12:00:00.125Z",
        "level": "info",
        "logger": "keymux.access",
        "msg": "request",
        "route": "/",
        "method": "POST",
        "provider": "openai",
        "keys": ["openai/a", "openai/b"],
        "model": "gpt-4o-mini",
        "attempts": 2,
        "outcome": "success",
        "status": 200,
        "ttfb_ms": 412.5,
        "duration_ms": 1830.2,
        "bytes": 5120,
    }
    assert list(json.loads(first)) == FIELD_ORDER
    assert list(json.loads(second)) == FIELD_ORDER
    assert json.loads(second)["ttfb_ms"] is None
    assert '"ttfb_ms": null' in second
    assert json.loads(second)["keys"] == ["openai/a"]


def test_the_line_equals_what_the_logging_path_printed() -> None:
    fields = {
        "route": "/v1",
        "method": "GET",
        "provider": "anthropic",
        "keys": [],
        "model": "claude",
        "attempts": 0,
        "outcome": "no_key_available",
        "status": 503,
        "ttfb_ms": None,
        "duration_ms": round(0.0123456 * 1000, 2),
        "bytes": 77,
    }
    record = logging.LogRecord("keymux.access", logging.INFO, __file__, 1, "request", None, None)
    record.created, record.msecs = NOON, 125.0
    record.fields = fields
    old = JsonFormatter().format(record)
    sink = Sink()
    log = make(sink)
    arguments = {name: value for name, value in fields.items() if name != "bytes"}
    log.request(**{**arguments, "bytes_out": 77, "duration_ms": 12.3456})  # type: ignore[arg-type]
    log.flush()
    assert json.loads(sink.data) == json.loads(old)
    assert list(json.loads(sink.data)) == list(json.loads(old))


def test_the_timestamp_follows_the_wall_clock_across_seconds() -> None:
    sink = Sink()
    times = iter([NOON, NOON + 0.5, NOON + 1.0, NOON + 86400 - 0.125])
    log = AccessLog(sink, wall=lambda: next(times))
    for _ in range(4):
        log_request(log)
    log.flush()
    assert [line["time"] for line in sink.lines()] == [
        "2025-01-01T12:00:00.125Z",
        "2025-01-01T12:00:00.625Z",
        "2025-01-01T12:00:01.125Z",
        "2025-01-02T12:00:00.000Z",
    ]


HOSTILE = [
    'say "hi"',
    "back\\slash\\",
    "new\nline\r\n",
    "nul\x00bell\x07esc\x1b",
    "ünïcødé ✓ 模型 😀",
    "lone surrogate \ud800",
    "m" * 300,
    '"}, "status": 999, "x": {"',
]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_strings_round_trip_on_exactly_one_line(text: str) -> None:
    sink = Sink()
    log = make(sink)
    log_request(log, route=text, method=text, provider=text, keys=[text, "ok"], model=text, outcome=text)
    log.flush()
    assert sink.data.count(b"\n") == 1 and sink.data.endswith(b"\n")
    (line,) = sink.lines()
    assert [line[f] for f in ("route", "method", "provider", "model", "outcome")] == [text] * 5
    assert line["keys"] == [text, "ok"]
    assert line["status"] == 200


def test_values_of_unexpected_types_are_still_written_as_json_dumps_would() -> None:
    sink = Sink()
    log = make(sink)
    log_request(log, model=None, status=None, keys=("a",), duration_ms=float("nan"), ttfb_ms=float("inf"))
    log.flush()
    (line,) = sink.lines()
    assert list(line) == FIELD_ORDER
    assert line["model"] is None and line["status"] is None and line["keys"] == ["a"]
    assert line["ttfb_ms"] == float("inf") and line["duration_ms"] != line["duration_ms"]


def test_lines_wait_in_the_buffer_until_flush() -> None:
    sink = Sink()
    log = make(sink, max_buffer=1 << 20)
    asyncio.run(_log_in_loop(log, 3))  # inside a loop, so the lines are buffered, not written through
    assert sink.data == b""
    log.flush()
    assert [line["bytes"] for line in sink.lines()] == [0, 1, 2]
    assert sink.calls == 1


async def _log_in_loop(log: AccessLog, count: int) -> None:
    for n in range(count):
        log_request(log, n)


async def test_crossing_max_buffer_writes_the_buffer_at_once() -> None:
    sink = Sink()
    log = make(sink, max_buffer=1000, flush_interval=3600)
    one = 0
    while not sink.data:
        log_request(log, one)
        one += 1
    assert len(sink.data) >= 1000 and sink.calls == 1
    assert [line["bytes"] for line in sink.lines()] == list(range(one))
    log.close()


async def test_the_timer_writes_buffered_lines_inside_a_running_loop() -> None:
    sink = Sink()
    log = make(sink, flush_interval=0.05)
    log_request(log, 1)
    log_request(log, 2)
    assert sink.data == b""
    await _until(lambda: sink.data.count(b"\n") == 2)
    assert [line["bytes"] for line in sink.lines()] == [1, 2]
    assert sink.calls == 1
    log_request(log, 3)  # the buffer is empty again: a new timer
    await _until(lambda: sink.data.count(b"\n") == 3)
    log.close()


async def _until(condition: Callable[[], bool], deadline: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while not condition():
        assert loop.time() < end, "condition not met before the deadline"
        await asyncio.sleep(0.01)


def test_without_a_running_loop_each_line_is_written_at_once() -> None:
    sink = Sink()
    log = make(sink)
    log_request(log, 1)
    assert [line["bytes"] for line in sink.lines()] == [1]


def test_a_disabled_log_writes_nothing() -> None:
    sink = Sink()
    log = make(sink)
    log.enabled = False
    log_request(log)
    log.flush()
    assert sink.data == b"" and sink.calls == 0


async def test_a_writer_that_refuses_once_loses_nothing() -> None:
    sink = Sink([BlockingIOError(11, "EAGAIN")])
    log = make(sink, flush_interval=0.02)
    for n in range(5):
        log_request(log, n)
    log.flush()  # refused: everything stays buffered and the timer retries
    assert sink.data == b""
    log_request(log, 5)
    await _until(lambda: sink.data.count(b"\n") == 6)
    for n in range(6, 9):
        log_request(log, n)
    log.close()
    assert [line["bytes"] for line in sink.lines()] == list(range(9))


def test_partial_writes_are_completed_in_order() -> None:
    sink = Sink([7, 1, 100, BrokenPipeError(), 50, 3])
    log = make(sink)
    log.close()  # write through from here on, partial writes and all
    for n in range(12):
        log_request(log, n)
    log.flush()
    assert [line["bytes"] for line in sink.lines()] == list(range(12))


def test_a_writer_that_always_fails_never_breaks_a_request() -> None:
    def broken(data: bytes) -> int:
        raise OSError(32, "Broken pipe")

    log = make(broken, max_pending=10_000)
    for n in range(1000):
        log_request(log, n)
    log.flush()
    log.close()
    line = len(_one_line(n=999))  # the newest lines, the ones kept, all have three-digit numbers
    pending = log._pending
    assert 10_000 - line < pending <= 10_000 and pending % line == 0
    assert log.dropped == 1000 - pending // line


def test_when_the_writer_recovers_the_newest_lines_come_out_and_the_drop_is_counted() -> None:
    failing = True
    sink = Sink()

    def write(data: bytes) -> int:
        if failing:
            raise BlockingIOError(11, "EAGAIN")
        return sink(data)

    line = len(_one_line(n=100))
    log = make(write, max_pending=10 * line)
    for n in range(100, 130):
        log_request(log, n)
    failing = False
    log.flush()
    assert [entry["bytes"] for entry in sink.lines()] == list(range(120, 130))
    assert log.dropped == 20


def test_a_line_half_written_is_finished_not_dropped() -> None:
    line = len(_one_line(n=100))
    sink = Sink([10, OSError()])  # the first 10 bytes of line 100 go out, then the writer fails
    log = make(sink, max_pending=3 * line, flush_interval=3600)
    for n in range(100, 120):
        log_request(log, n)
    log.flush()
    # Room for three lines: the rest of the started one and the two newest.
    assert [entry["bytes"] for entry in sink.lines()] == [100, 118, 119]
    assert log.dropped == 17


def _one_line(n: int) -> bytes:
    sink = Sink()
    log_request(make(sink), n)
    return bytes(sink.data)


def test_a_dropped_instance_is_collected_and_flushes_what_it_held() -> None:
    sink = Sink()
    log = make(sink, max_buffer=1 << 20)
    asyncio.run(_log_in_loop(log, 3))
    ref = weakref.ref(log)
    del log
    gc.collect()
    assert ref() is None
    assert [line["bytes"] for line in sink.lines()] == [0, 1, 2]


def test_stderr_is_the_default_writer() -> None:
    result = _python("log = AccessLog()\nlog_request(log, 7)\n")
    first, marker = result.stderr.splitlines()
    assert json.loads(first)["bytes"] == 7 and marker == "atexit-marker"


EXITS = {
    "normal exit without close": "asyncio.run(main())\n",
    "SystemExit inside the loop": "asyncio.run(main(then_exit=True))\n",
    "sys.exit after the loop": "asyncio.run(main())\nsys.exit(3)\n",
}


@pytest.mark.parametrize("ending", EXITS)
def test_every_line_reaches_stderr_however_the_process_ends(ending: str) -> None:
    script = (
        textwrap.dedent(
            """
            async def main(then_exit=False):
                log = AccessLog()
                for n in range(1000):
                    log_request(log, n)
                    if n % 100 == 0:
                        await asyncio.sleep(0)
                if then_exit:
                    raise SystemExit(3)
            """
        )
        + EXITS[ending]
    )
    result = _python(script)
    assert result.returncode == (0 if ending == "normal exit without close" else 3)
    *lines, last = result.stderr.splitlines()
    assert [json.loads(line)["bytes"] for line in lines] == list(range(1000))
    # The marker is written by an atexit hook that runs after keymux's: the lines came from the
    # atexit flush, not from a finalizer that may or may not run during interpreter teardown.
    assert last == "atexit-marker"


def _python(body: str) -> subprocess.CompletedProcess[str]:
    prelude = textwrap.dedent(
        """
        import asyncio, atexit, os, sys
        atexit.register(os.write, 2, b"atexit-marker\\n")  # registered first, so it runs last
        from sidecar.accesslog import AccessLog

        def log_request(log, n):
            log.request("/", "POST", "openai", ["openai/a"], "gpt-4o-mini", 1, "success", 200, None, 1.5, n)
        """
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + body], capture_output=True, text=True, timeout=60, check=False
    )


def test_the_access_log_never_uses_the_logging_module(caplog: pytest.LogCaptureFixture) -> None:
    log = make(io.BytesIO().write)
    with caplog.at_level(logging.DEBUG):
        log_request(log)
        log.flush()
    assert caplog.records == []


async def test_a_real_keymux_stopped_by_sigterm_right_after_its_requests_writes_every_access_line(
    fake: FakeServer, tmp_path: Path
) -> None:
    """Lines still in the buffer when SIGTERM arrives are written by the drain, not lost."""
    port, admin = free_port(), free_port()
    config = tmp_path / "keymux.yaml"
    config.write_text(
        f"listen: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:{admin}\n"
        "shutdown:\n  drain_delay: 0\n  drain_timeout: 5\n"
        + openai_config(fake.url, {"a": "sk-accesslog-a-000000000000"})
    )
    stderr = tmp_path / "stderr"
    with stderr.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "--config", str(config)],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=out,
        )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(200):  # bounded: the listener comes up within a few seconds
                try:
                    async with session.get(f"http://127.0.0.1:{admin}/readyz") as ready:
                        if ready.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.05)
            body = {"model": "gpt-4o-mini", "messages": []}
            for i in range(300):
                async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as response:
                    assert response.status == 200, i
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    lines = [json.loads(line) for line in stderr.read_text().splitlines()]
    access = [line for line in lines if line["logger"] == "keymux.access"]
    assert len(access) == 300
    assert {(line["outcome"], line["status"]) for line in access} == {("success", 200)}
    assert lines[-1]["msg"] == "stopped"  # the drain ran to its end
