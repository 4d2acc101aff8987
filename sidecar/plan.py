"""The attempt plan of one app request: pure, fed by the proxy like h11's Connection.

The proxy asks `next()` for the next (provider, key) to try, makes the attempt, and hands the
attempt its final verdict once, when it is over (after the last byte of a stream, or its
failure). The plan decides everything else: which key comes next, when the attempt and time
budgets stop the request, what a failure means for the route (next key, next provider, give
up), and what the app gets when nothing could serve it. It does no I/O and reads time only
through the injected clock.

`Attempt.finish` is the one place an attempt's verdict is written: the health record, the
provider's end-to-end outcome and the observer (metrics) all learn it there, once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from sidecar.affinity import Owner
from sidecar.capacity import Capacity, Report, Ticket
from sidecar.classify import Verdict
from sidecar.config import RetryConfig
from sidecar.health import ALL_MODELS, Clock, HealthStore, KeyState, KeyStatus
from sidecar.keys import Key
from sidecar.outcome import Outcome


class Selector(Protocol):
    keys: tuple[Key, ...]

    def choose(self, model: str, exclude: frozenset[str] | set[str] = ..., tokens: int = ...) -> Key | None: ...


class Upstream(Protocol):
    """A provider as the plan sees it: a name, a key selector, a health and a capacity record."""

    @property
    def name(self) -> str: ...

    @property
    def selector(self) -> Selector: ...

    @property
    def health(self) -> HealthStore: ...

    @property
    def capacity(self) -> Capacity: ...


U = TypeVar("U", bound=Upstream)


class Observer(Protocol):
    """Who is told what the plan decided (the shell's metrics). Never consulted."""

    def attempt_finished(self, attempt: Attempt[Any]) -> None: ...

    def key_retry(self, provider: str, reason: Outcome) -> None: ...

    def fallback(self, from_provider: str, to_provider: str) -> None: ...


class AttemptFinishedTwice(RuntimeError):
    """A bug in the shell: an attempt's verdict is written once."""


class Attempt(Generic[U]):
    """One upstream attempt: a (provider, key) for a model, open until its verdict is final."""

    __slots__ = ("_plan", "key", "label", "model", "provider", "ticket", "verdict")

    def __init__(self, plan: Plan[U], provider: U, key: Key, model: str, ticket: Ticket) -> None:
        self._plan: Plan[U] | None = plan  # dropped once finished: no cycle outlives the request
        self.provider = provider
        self.key = key
        self.model = model
        self.ticket = ticket  # its place among the requests sent to (key, model)
        self.label = f"{provider.name}/{key.name}"  # as logs and messages name it
        self.verdict: Verdict | None = None  # the final verdict, once finished

    def learn(self, report: Report) -> None:
        """The answer's headers said how much room the key has left (before the verdict is final)."""
        self.provider.capacity.learn(self.key.name, self.model, report, self.ticket)

    def finish(self, verdict: Verdict) -> None:
        """The attempt is over: record its final verdict, once."""
        plan = self._plan
        if self.verdict is not None or plan is None:
            was = self.verdict.outcome if self.verdict is not None else "?"
            raise AttemptFinishedTwice(f"{self.label} finished as {was} and then {verdict.outcome}")
        self.verdict = verdict
        self._plan = None
        plan._finished(self)


@dataclass(frozen=True, slots=True)
class LocalAnswer:
    """An answer keymux gives itself, when no upstream answer can be forwarded."""

    status: int
    code: str
    message: str
    outcome: Outcome
    retry_after: float | None = None  # seconds

    @property
    def retry_after_header(self) -> str | None:
        return None if self.retry_after is None else retry_after_header(self.retry_after)


def retry_after_header(seconds: float) -> str:
    """A Retry-After value: whole seconds, at least 1 (0 would invite a retry at once)."""
    return str(max(1, math.ceil(seconds)))


_GATEWAY_STATUS = {Outcome.TIMEOUT: 504, Outcome.CONNECTION_ERROR: 502}


class Plan(Generic[U]):
    def __init__(
        self,
        upstreams: Sequence[U],
        model_for: Callable[[U], str],
        retry: RetryConfig,
        clock: Clock,
        observer: Observer,
        pin: tuple[str, Owner] | None = None,
        tokens: int = 0,
    ) -> None:
        self.pin = pin  # (resource, the key that created it): the only key this request may use
        if pin is not None:
            upstreams = [u for u in upstreams if u.name == pin[1].provider]
        self.upstreams = tuple(upstreams)
        self.model_for = model_for
        self.retry = retry
        self.clock = clock
        self.observer = observer
        self.tokens = tokens  # what the request is likely to use, for the keys' token limits
        self.started = clock()
        self.wait_deadline: float | None = None  # set when the request first waits for a key
        self.attempts: list[Attempt[U]] = []
        self.keys_tried: list[str] = []  # the attempts' labels, in order
        self.provider_outcomes: dict[str, Outcome] = {}  # each provider's end-to-end result
        self._tried: dict[str, set[str]] = {}
        self._done: set[str] = set()  # providers that failed as a whole

    @property
    def last(self) -> Attempt[U] | None:
        return self.attempts[-1] if self.attempts else None

    def next(self) -> Attempt[U] | None:
        """The next attempt, or None when the budgets or the keys are spent.

        Call it first, then after each failed attempt has finished with a retryable verdict.
        """
        failed = self.last
        if failed is not None and (failed.verdict is None or not failed.verdict.outcome.retryable):
            raise ValueError("next() follows a finished, retryable attempt")
        retry = self.retry
        if len(self.attempts) >= retry.max_attempts or self.clock() - self.started >= retry.budget:
            return None
        previous = None
        if failed is not None:
            previous = failed.provider
            if failed.verdict is not None and failed.verdict.provider_wide:
                self._done.add(previous.name)
        for upstream in self.upstreams:
            if upstream.name in self._done:
                continue
            model = self.model_for(upstream)
            tried = self._tried.setdefault(upstream.name, set())
            excluded = tried if self.pin is None else tried | self._not_pinned(upstream)
            key = upstream.selector.choose(model, excluded, self.tokens)
            if key is None:
                self.provider_outcomes.setdefault(upstream.name, Outcome.NO_KEY_AVAILABLE)
                if all(k.name in excluded or not k.allows(model) for k in upstream.selector.keys):
                    self._done.add(upstream.name)  # nothing left to try; else keys only rest, and may free up
                previous = upstream
                continue
            if previous is not None and previous is not upstream:
                self.observer.fallback(previous.name, upstream.name)
            elif failed is not None and failed.verdict is not None:
                self.observer.key_retry(upstream.name, failed.verdict.outcome)
            tried.add(key.name)
            attempt = Attempt(self, upstream, key, model, upstream.capacity.sent(key.name, model, self.tokens))
            self.attempts.append(attempt)
            self.keys_tried.append(attempt.label)
            return attempt
        return None

    def _not_pinned(self, upstream: U) -> set[str]:
        """The keys a pinned request must not use: every key but its resource's creator."""
        assert self.pin is not None
        return {key.name for key in upstream.selector.keys if key.name != self.pin[1].key}

    def _finished(self, attempt: Attempt[U]) -> None:
        verdict = attempt.verdict
        assert verdict is not None
        attempt.provider.health.record(attempt.key.name, attempt.model, verdict)
        self.provider_outcomes[attempt.provider.name] = verdict.outcome
        self.observer.attempt_finished(attempt)

    # -- what the app gets when no upstream answer can be forwarded ------------------------

    def exhausted(self) -> LocalAnswer:
        """Every attempt failed without an answer to forward (timeouts, connection errors)."""
        last = self.last
        outcome = last.verdict.outcome if last is not None and last.verdict is not None else Outcome.CONNECTION_ERROR
        tried = ", ".join(self.keys_tried)
        message = f"keymux: every attempt failed ({outcome.value}); tried {tried}"
        return LocalAnswer(_GATEWAY_STATUS.get(outcome, 502), outcome.value, message, outcome)

    def _candidates(self) -> list[tuple[str, str, list[KeyStatus]]]:
        """Each key the request could still use and what holds it now: (provider, key, blockers)."""
        found = []
        for upstream in self.upstreams:
            if upstream.name in self._done:
                continue
            model = self.model_for(upstream)
            tried = self._tried.get(upstream.name, ())
            for key in upstream.selector.keys:
                name = key.name
                if name in tried or not key.allows(model) or (self.pin is not None and name != self.pin[1].key):
                    continue
                held = [upstream.health.blocker(name, model), upstream.capacity.blocker(name, model, self.tokens)]
                found.append((upstream.name, name, [status for status in held if status is not None]))
        return found

    def recovery(self) -> float | None:
        """When the first key the request could still use is free again by itself: the end of a
        rate limit's rest or of a saturation. None when no such key is held only by those."""
        return _first_recovery(self._candidates())

    def wait_until(self) -> tuple[float, float] | None:
        """Whether to wait for a key, rather than answer now: (when one should be ready, the
        latest the request may wait until), or None. A request waits at most retry.max_wait in
        all, counted from its first wait, and never past its retry.budget."""
        ready = self.recovery()
        if ready is None:
            return None
        retry = self.retry
        deadline = self.wait_deadline
        if deadline is None:
            deadline = min(self.clock() + retry.max_wait, self.started + retry.budget)
            if retry.max_wait > 0:
                self.wait_deadline = deadline
        return (ready, deadline) if ready <= deadline else None

    def no_key(self) -> LocalAnswer:
        """No key can take the request now: 429 with Retry-After when one will be free again by
        itself (resting for a rate limit, or saturated), 503 when none will."""
        if self.pin is not None:
            return self._pinned_key_unavailable()
        now = self.clock()
        model = next((self.model_for(upstream) for upstream in self.upstreams), "")
        candidates = self._candidates()
        parts = [_describe(provider, status, now) for provider, _, held in candidates for status in held]
        if not candidates:
            detail = f"no configured key is allowed to serve model '{model}'" if model else "no keys are configured"
        else:
            detail = f"no key can serve model '{model}' right now: " + "; ".join(parts)
        ready = _first_recovery(candidates)
        if ready is not None:
            return LocalAnswer(429, "no_key_available", f"keymux: {detail}", Outcome.NO_KEY_AVAILABLE, ready - now)
        waits = [s.until - now for _, _, held in candidates for s in held if s.until is not None]
        return LocalAnswer(
            503, "no_key_available", f"keymux: {detail}", Outcome.NO_KEY_AVAILABLE, min(waits) if waits else None
        )

    def _pinned_key_unavailable(self) -> LocalAnswer:
        """The resource's creator cannot serve it: say which key and why, not another key's 404."""
        assert self.pin is not None
        resource, owner = self.pin
        made = f"keymux: {resource} was created with key {owner.provider}/{owner.key}"
        upstream = self.upstreams[0] if self.upstreams else None
        keys = {key.name: key for key in upstream.selector.keys} if upstream is not None else {}
        if upstream is None or owner.key not in keys:
            message = f"{made}, which is no longer configured"
            return LocalAnswer(404, "resource_key_removed", message, Outcome.NO_KEY_AVAILABLE)
        model = self.model_for(upstream)
        status = upstream.health.blocker(owner.key, model) or upstream.capacity.blocker(owner.key, model, self.tokens)
        if status is None:  # not resting: its allow-list leaves this model out
            message = f"{made}, which may not serve model '{model}'"
            return LocalAnswer(503, "resource_key_unavailable", message, Outcome.NO_KEY_AVAILABLE)
        limited = _recovers(status)
        wait = None if status.until is None else status.until - self.clock()
        message = f"{made}, which cannot serve it now: {_describe(owner.provider, status, self.clock())}"
        return LocalAnswer(429 if limited else 503, "resource_key_unavailable", message, Outcome.NO_KEY_AVAILABLE, wait)


def _first_recovery(candidates: list[tuple[str, str, list[KeyStatus]]]) -> float | None:
    """The earliest time a candidate held only by rests that end by themselves is free again."""
    ready = None
    for _, _, held in candidates:
        if held and all(_recovers(status) for status in held):
            at = max(status.until for status in held if status.until is not None)
            ready = at if ready is None else min(ready, at)
    return ready


def _recovers(status: KeyStatus) -> bool:
    """A rest that ends by itself at a known time and needs nothing of the key: a rate limit's."""
    if status.until is None:
        return False
    return status.state is KeyState.SATURATED or status.last_outcome is Outcome.RATE_LIMITED


def _describe(provider: str, status: KeyStatus, now: float) -> str:
    scope = "every model" if status.scope is ALL_MODELS else f"model '{status.scope}'"
    why = f" after {status.last_outcome.value}" if status.last_outcome else ""
    if status.limit is not None:
        why = f" ({status.limit} limit)"
    until = f" for {max(status.until - now, 0):.0f} s" if status.until is not None else " (probe in flight)"
    return f"{provider}/{status.key} {status.state.value} for {scope}{why}{until}"
