"""The per-request access line, built as text and written in batches.

Going through `logging` (a LogRecord, a formatter, a dict and json.dumps, a locked stream write)
cost about a quarter of the proxy's throughput. This writes the same JSON object, key for key,
from one string template, and hands the bytes to the file descriptor in batches: when the
buffer reaches `max_buffer`, or at most `flush_interval` seconds after the first unwritten line.

Lines are never silently lost: a failing or partial write keeps the rest for the next try, an
atexit hook and `close()` flush, and only a writer that stays broken until `max_pending` bytes
pile up makes the oldest lines go, counted in `dropped`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import json
import os
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from json.encoder import encode_basestring_ascii  # the C escaper json.dumps itself uses
from typing import Any

Write = Callable[[bytes], int]

_get_running_loop = asyncio.events._get_running_loop  # returns None instead of raising: cheap per call
_LINE = (
    '{"time": "%s.%03dZ", "level": "info", "logger": "keymux.access", "msg": "request", '
    '"route": %s, "method": %s, "provider": %s, "keys": [%s], "model": %s, "attempts": %d, '
    '"outcome": %s, "status": %d, "ttfb_ms": %s, "duration_ms": %.2f, "bytes": %d}\n'
)
_FIELDS = (
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
)
_BATCH = 64  # requests rendered together
# A writer backed up by megabytes gets them in slices, so a partial write never re-copies the rest.
_CHUNK = 1024 * 1024

_EXIT_PATIENCE = 1.0  # seconds

_live: weakref.WeakSet[AccessLog] = weakref.WeakSet()


@atexit.register
def _flush_all() -> None:
    # A non-blocking stderr whose reader lags refuses with EAGAIN; give it a moment before exiting.
    deadline = time.monotonic() + _EXIT_PATIENCE
    for log in list(_live):
        log.flush()
        while (log._lines or log._records) and time.monotonic() < deadline:
            time.sleep(0.01)
            log.flush()


class AccessLog:
    """One JSON line per finished request, on stderr unless another `write` is given."""

    __slots__ = (
        "__weakref__",
        "_closed",
        "_flush_interval",
        "_head_partial",
        "_lines",
        "_max_buffer",
        "_max_pending",
        "_pending",
        "_records",
        "_retry_at",
        "_second",
        "_stamp",
        "_timer",
        "_timer_loop",
        "_wall",
        "_write",
        "dropped",
        "enabled",
    )

    def __init__(
        self,
        write: Write | None = None,
        *,
        wall: Callable[[], float] = time.time,
        max_buffer: int = 64 * 1024,
        flush_interval: float = 0.1,
        max_pending: int = 8 * 1024 * 1024,
    ) -> None:
        self._write: Write = write if write is not None else functools.partial(os.write, 2)
        self._wall = wall
        self._max_buffer = max_buffer
        self._flush_interval = flush_interval
        self._max_pending = max_pending
        self.enabled = True
        self.dropped = 0
        self._records: list[tuple[Any, ...]] = []  # requests not yet rendered: (wall time, fields...)
        self._lines: deque[bytes] = deque()
        self._pending = 0  # bytes in _lines
        self._head_partial = False  # _lines[0] is the tail of a line whose start is already out
        self._retry_at = 0.0  # monotonic time of the next write attempt after a failure; 0 when healthy
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._second = -1
        self._stamp = ""
        _live.add(self)

    def request(
        self,
        route: str,
        method: str,
        provider: str,
        keys: Sequence[str],
        model: str,
        attempts: int,
        outcome: str,
        status: int,
        ttfb_ms: float | None,
        duration_ms: float,
        bytes_out: int,
    ) -> None:
        if not self.enabled:
            return
        # Only the values are kept here; lines are rendered in batches, off the request's path
        # through the caches (measured in keymux: 8 µs a line rendered per request, far less in a batch).
        records = self._records
        records.append(
            (self._wall(), route, method, provider, keys, model, attempts, outcome, status, ttfb_ms, duration_ms,
             bytes_out)
        )  # fmt: skip
        if self._retry_at:
            self._while_failing()
            return
        if len(records) >= _BATCH:
            self._render()
        if self._closed or self._pending >= self._max_buffer:
            self.flush()
        else:
            loop = _get_running_loop()
            if loop is None:
                self.flush()
            elif self._timer_loop is not loop:  # no timer yet, or one left on a loop that has since closed
                self._arm(loop)

    def _render(self) -> None:
        """Turn the requests kept so far into lines."""
        lines = self._lines
        for record in self._records:
            try:
                line = self._format(*record)
            except Exception:  # a value that is not what the signature says: let json.dumps spell it
                line = self._format_any(record)
            lines.append(line)
            self._pending += len(line)
        self._records.clear()

    def flush(self) -> None:
        """Write everything buffered; what the writer refuses stays buffered for a later try."""
        self._disarm()
        if self._records:
            self._render()
        if not self._lines:
            self._retry_at = 0.0
            return
        data = b"".join(self._lines)
        written = self._write_all(data)
        if written == len(data):
            self._lines.clear()
            self._pending = 0
            self._head_partial = False
            self._retry_at = 0.0
            return
        self._forget_written(written)
        self._trim()
        self._retry_at = time.monotonic() + self._flush_interval
        loop = _get_running_loop()
        if loop is not None:
            self._arm(loop)

    def close(self) -> None:
        """Flush and stop the timer; later lines are written as they come."""
        self._closed = True
        self.flush()
        self._disarm()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown may have torn down what flush needs
            self.flush()

    # -- formatting -------------------------------------------------------------------------

    def _format(
        self,
        now: float,
        route: str,
        method: str,
        provider: str,
        keys: Sequence[str],
        model: str,
        attempts: int,
        outcome: str,
        status: int,
        ttfb_ms: float | None,
        duration_ms: float,
        bytes_out: int,
    ) -> bytes:
        # NaN and infinities minus themselves are NaN, which is truthy; "%.2f" would print them as
        # bare nan/inf, which is not JSON, so they go the json.dumps way.
        if duration_ms - duration_ms or (ttfb_ms is not None and ttfb_ms - ttfb_ms):
            raise ValueError("not a finite duration")
        second = int(now)
        return (
            _LINE
            % (
                self._stamp if second == self._second else self._seconds(second),
                int((now - second) * 1000),  # truncated from the float, exactly as LogRecord.msecs is
                encode_basestring_ascii(route),
                encode_basestring_ascii(method),
                encode_basestring_ascii(provider),
                ", ".join(map(encode_basestring_ascii, keys)),
                encode_basestring_ascii(model),
                attempts,
                encode_basestring_ascii(outcome),
                status,
                "null" if ttfb_ms is None else f"{ttfb_ms:.2f}",
                duration_ms,
                bytes_out,
            )
        ).encode("ascii")

    def _format_any(self, record: tuple[Any, ...]) -> bytes:
        """The same line through json.dumps, for values of unexpected types (None, NaN, numbers as text)."""
        now, *fields = record
        second = int(now)
        stamp = f"{self._seconds(second)}.{int((now - second) * 1000):03d}Z"
        line: dict[str, object] = {"time": stamp, "level": "info", "logger": "keymux.access", "msg": "request"}
        line.update(zip(_FIELDS, fields, strict=True))
        for name in ("ttfb_ms", "duration_ms"):
            value = line[name]
            if isinstance(value, float | int):
                line[name] = round(value, 2)
        return (json.dumps(line, default=str) + "\n").encode("ascii")

    def _seconds(self, second: int) -> str:
        """The timestamp up to the seconds, formatted once per second rather than once per line."""
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return self._stamp

    # -- writing ----------------------------------------------------------------------------

    def _write_all(self, data: bytes) -> int:
        """How many bytes of `data` the writer took before it stopped or failed."""
        done = 0
        try:
            while done < len(data):
                n = self._write(data[done : done + _CHUNK])
                if not n or n < 0:
                    break
                done += n
        except Exception:  # EAGAIN, EPIPE, a closed file...: the caller keeps the rest
            pass
        return min(done, len(data))

    def _forget_written(self, written: int) -> None:
        lines = self._lines
        self._pending -= written
        while written:
            first = lines[0]
            if len(first) > written:
                lines[0] = first[written:]
                self._head_partial = True
                return
            lines.popleft()
            written -= len(first)
            self._head_partial = False

    def _trim(self) -> None:
        """Drop the oldest whole lines down to max_pending; a line already half out is kept to finish it."""
        if self._pending <= self._max_pending:
            return
        lines = self._lines
        head = lines.popleft() if self._head_partial else None
        while lines and self._pending > self._max_pending:
            self._pending -= len(lines.popleft())
            self.dropped += 1
        if head is not None:
            lines.appendleft(head)

    def _while_failing(self) -> None:
        """After a failed write: retry no more than once per flush_interval, and keep memory bounded."""
        if time.monotonic() >= self._retry_at:
            self.flush()
            return
        self._render()
        self._trim()
        loop = _get_running_loop()
        if loop is not None and self._timer_loop is not loop:
            self._arm(loop)

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_later(self._flush_interval, self.flush)
        self._timer_loop = loop

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_loop = None
