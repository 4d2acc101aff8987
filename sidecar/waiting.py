"""The line of requests waiting for a key to free up (retry.max_wait).

When every key a request could use is saturated or resting for a rate limit, and the first of
them is free again before the request's wait deadline, the request joins this line instead of
failing. One timer, set for the earliest moment a waiter's key should be ready, walks the line
in arrival order and hands each waiter the attempt its plan can make now. So there is no
polling, and no herd: a moment that frees room for three requests serves the first three in
line, and the others keep waiting, each for the next moment its own plan names.

While anyone waits, a newly arrived request lines up behind them rather than taking the room
the first in line was waiting for.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sidecar.classify import DISCONNECTED
from sidecar.plan import Attempt, Plan


class _Waiter:
    __slots__ = ("deadline", "future", "gives_up", "plan", "ready")

    def __init__(
        self, plan: Plan[Any], future: asyncio.Future[Attempt[Any] | None], window: tuple[float, float], now: float
    ) -> None:
        self.plan = plan
        self.future = future
        self.ready, self.deadline = window  # plan clock times: its next try is due, it gives up
        # The same deadline on the loop's clock: a plan clock that stood still must not hold it forever.
        self.gives_up = asyncio.get_running_loop().time() + max(self.deadline - now, 0.0)


class WaitingLine:
    def __init__(self) -> None:
        self._line: dict[_Waiter, None] = {}  # in arrival order
        self._timer: asyncio.TimerHandle | None = None
        self._due: float | None = None  # loop time the timer fires

    def __len__(self) -> int:
        return len(self._line)

    async def wait(self, plan: Plan[Any], window: tuple[float, float]) -> Attempt[Any] | None:
        """Wait in line for the plan's next attempt: it, or None when the plan can wait no
        longer (its deadline passed, or nothing it waits for will be free by then).

        `window`: (when to try, the latest to wait until), in the plan's clock; a request that
        arrives while others wait joins with (now, now) to try once, behind them."""
        clock = plan.clock
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Attempt[Any] | None] = loop.create_future()
        waiter = _Waiter(plan, future, window, clock())
        self._line[waiter] = None
        self._schedule(loop, waiter.ready - clock())
        try:
            return await future
        except asyncio.CancelledError:
            # The app went away: an attempt handed over just now was never made.
            if future.done() and not future.cancelled() and (attempt := future.result()) is not None:
                attempt.finish(DISCONNECTED)
            raise
        finally:
            self._line.pop(waiter, None)

    def _schedule(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        due = loop.time() + max(delay, 0.001)  # never a busy loop, even on a rounding error
        if self._due is not None and self._due <= due:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._due = due
        self._timer = loop.call_at(due, self._walk, loop)

    def _walk(self, loop: asyncio.AbstractEventLoop) -> None:
        """Go down the line in order: hand out what can be made now, reschedule the rest."""
        self._timer = self._due = None
        earliest: float | None = None
        for waiter in list(self._line):
            future, plan = waiter.future, waiter.plan
            if future.done():
                continue
            now = plan.clock()
            if waiter.ready <= now or loop.time() >= waiter.gives_up:
                try:
                    attempt = plan.next()
                except Exception as exc:  # a bug of keymux's own: that request answers 500, not the line
                    future.set_exception(exc)
                    self._line.pop(waiter, None)
                    continue
                if attempt is not None:
                    future.set_result(attempt)
                    self._line.pop(waiter, None)
                    continue
                found = plan.wait_until()
                if found is None or now >= waiter.deadline or loop.time() >= waiter.gives_up:
                    future.set_result(None)
                    self._line.pop(waiter, None)
                    continue
                waiter.ready, waiter.deadline = found
            delay = min(min(waiter.ready, waiter.deadline) - now, waiter.gives_up - loop.time())
            earliest = delay if earliest is None else min(earliest, delay)
        if earliest is not None:
            self._schedule(loop, earliest)
