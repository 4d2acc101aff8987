"""Key selection and per-(key, model) health: the heart of keymux.

Plain Python with an injected clock. The shell asks `choose()` for a key, makes the attempt and
reports the verdict with `record()`. Health is kept per (key, model); a credential failure or an
exhausted account quota is kept per key, for every model. Only keys with something to remember
have an entry, idle entries expire and the number of models tracked is capped, so memory stays
bounded whatever model strings the app sends.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field

from sidecar.classify import Verdict
from sidecar.outcome import Outcome

Clock = Callable[[], float]
Backoff = Callable[[int], float]  # cooldown seconds for the n-th cooldown in a row (n from 0)

KEY_WIDE = None  # the entries that concern a key for every model
_MAX_STRIKES = 30  # enough for any cap; keeps 2**n finite


class KeyState(enum.StrEnum):
    USABLE = "usable"
    HALF_OPEN = "half_open"  # cooldown over: the next request probes it
    COOLING = "cooling"  # this (key, model) is resting
    DISABLED = "disabled"  # the key is resting for every model

    @property
    def gauge(self) -> int:
        return {KeyState.COOLING: 1, KeyState.DISABLED: 2}.get(self, 0)


def exponential(base: float, cap: float) -> Backoff:
    """base, 2 x base, 4 x base … capped: the schedule used wherever no other is injected."""
    return lambda n: min(base * 2.0 ** min(n, _MAX_STRIKES), cap)


@dataclass(frozen=True)
class HealthPolicy:
    """Every number of the health rules. Each is a field of the `health:` config section."""

    failure_threshold: int = 3
    failure_backoff: Backoff = field(default_factory=lambda: exponential(30.0, 600.0))
    credential_backoff: Backoff = field(default_factory=lambda: exponential(600.0, 6 * 3600.0))
    model_backoff: Backoff = field(default_factory=lambda: exponential(300.0, 3600.0))
    rate_limit_backoff: Backoff = field(
        default_factory=lambda: exponential(30.0, 600.0)
    )  # a 429 that says nothing about when
    rate_limit_max: float = 3600.0  # cap on what a provider may ask for
    quota_cooldown: float = 1800.0  # insufficient_quota: the account is out of credit
    probe_timeout: float = 600.0  # a half-open probe never reported frees its slot after this
    idle_expiry: float = 3600.0  # forget an entry this long after its cooldown ended
    max_models: int = 1000  # distinct model names tracked per provider


@dataclass(frozen=True, slots=True)
class Key:
    """A configured key. `secret` never leaves the proxy's request headers."""

    name: str
    secret: str = field(repr=False)
    models: frozenset[str] | None = None  # allow-list; None allows every model
    headers: tuple[tuple[str, str], ...] = ()

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(slots=True)
class Entry:
    failures: int = 0  # consecutive failures of the transient kind
    strikes: int = 0  # cooldowns in a row, for doubling
    until: float = 0.0  # cooling until this clock time
    cooled: bool = False  # after a cooldown a single probe must succeed
    probing_since: float | None = None
    last_outcome: Outcome | None = None
    last_failure_at: float = 0.0

    def blocks(self, now: float, probe_timeout: float) -> bool:
        if self.until > now:
            return True
        probing = self.probing_since is not None and now - self.probing_since < probe_timeout
        return self.cooled and probing

    def state(self, now: float, key_wide: bool) -> KeyState:
        if self.until > now:
            return KeyState.DISABLED if key_wide else KeyState.COOLING
        return KeyState.HALF_OPEN if self.cooled else KeyState.USABLE


@dataclass(frozen=True, slots=True)
class KeyStatus:
    """One row of the health table, for /keys, the key_state gauge and the no-key answer."""

    key: str
    model: str | None  # None: the key as a whole
    state: KeyState
    until: float | None
    failures: int
    last_outcome: Outcome | None


class KeyPool:
    """The keys of one provider, their health, and the round-robin cursor per model."""

    def __init__(self, provider: str, keys: Sequence[Key], policy: HealthPolicy, clock: Clock) -> None:
        self.provider = provider
        self.keys = tuple(keys)
        self.policy = policy
        self._clock = clock
        self._index = {key.name: i for i, key in enumerate(self.keys)}
        self._cursors: OrderedDict[str, int] = OrderedDict()  # model -> index chosen last
        self._entries: dict[str | None, dict[str, Entry]] = {}

    # -- selection -------------------------------------------------------------------------

    def choose(self, model: str, exclude: Collection[str] = ()) -> Key | None:
        """The next usable key for `model` after the one chosen last, or None."""
        now = self._clock()
        last = self._cursor(model)
        count = len(self.keys)
        wide = self._entries.get(KEY_WIDE)
        scoped = self._entries.get(model)
        timeout = self.policy.probe_timeout
        for step in range(1, count + 1):
            index = (last + step) % count
            key = self.keys[index]
            if key.name in exclude or not key.allows(model):
                continue
            wide_entry = wide.get(key.name) if wide else None
            scoped_entry = scoped.get(key.name) if scoped else None
            if wide_entry is not None and wide_entry.blocks(now, timeout):
                continue
            if scoped_entry is not None and scoped_entry.blocks(now, timeout):
                continue
            self._cursors[model] = index
            for entry in (wide_entry, scoped_entry):
                if entry is not None and entry.cooled:
                    entry.probing_since = now
            return key
        return None

    def _cursor(self, model: str) -> int:
        cursors = self._cursors
        last = cursors.get(model)
        if last is not None:
            cursors.move_to_end(model)
            return last
        if len(cursors) >= self.policy.max_models:
            self._forget_a_model()
        cursors[model] = -1
        return -1

    def _forget_a_model(self) -> None:
        """Make room: the least recently used model with no key resting for it, else the oldest."""
        now = self._clock()
        victim = next(iter(self._cursors))
        for model in self._cursors:
            entries = self._entries.get(model)
            if not entries or all(entry.until <= now for entry in entries.values()):
                victim = model
                break
        del self._cursors[victim]
        self._entries.pop(victim, None)

    # -- learning --------------------------------------------------------------------------

    def record(self, key_name: str, model: str, verdict: Verdict) -> None:
        """Learn from one attempt's verdict."""
        now = self._clock()
        outcome = verdict.outcome
        if outcome is Outcome.SUCCESS:
            self._succeeded(key_name, model, now)
        elif verdict.provider_wide or not outcome.retryable:
            self._release(key_name, model)
        elif verdict.key_wide:
            entry = self._entry(KEY_WIDE, key_name)
            seconds = (
                self.policy.credential_backoff(entry.strikes)
                if outcome is Outcome.CREDENTIAL_ERROR
                else self.policy.quota_cooldown
            )
            self._cool(entry, seconds, now, outcome)
        else:
            self._cursor(model)  # an entry exists only for a tracked model, so state stays bounded
            self._record_scoped(self._entry(model, key_name), verdict, now)

    def _record_scoped(self, entry: Entry, verdict: Verdict, now: float) -> None:
        outcome = verdict.outcome
        policy = self.policy
        if outcome is Outcome.RATE_LIMITED:
            asked = verdict.retry_after
            seconds = min(asked, policy.rate_limit_max) if asked else policy.rate_limit_backoff(entry.strikes)
            self._cool(entry, seconds, now, outcome)
        elif outcome is Outcome.PERMISSION_ERROR:
            self._cool(entry, policy.model_backoff(entry.strikes), now, outcome)
        else:  # upstream error, timeout, connection error: count, cool at the threshold
            entry.failures += 1
            if entry.cooled or entry.failures >= policy.failure_threshold:
                self._cool(entry, policy.failure_backoff(entry.strikes), now, outcome)
            else:
                entry.last_outcome, entry.last_failure_at = outcome, now

    @staticmethod
    def _cool(entry: Entry, seconds: float, now: float, outcome: Outcome) -> None:
        if entry.until > now:  # already resting (a concurrent failure): extend, no extra strike
            entry.until = max(entry.until, now + seconds)
        else:
            entry.until = now + seconds
            entry.strikes = min(entry.strikes + 1, _MAX_STRIKES)
        entry.cooled = True
        entry.probing_since = None
        entry.last_outcome, entry.last_failure_at = outcome, now

    def _succeeded(self, key_name: str, model: str, now: float) -> None:
        for scope in (model, KEY_WIDE):
            entries = self._entries.get(scope)
            entry = entries.get(key_name) if entries else None
            if entry is None:
                continue
            if entry.until > now:  # a success that started before a newer failure: keep resting
                entry.failures = 0
                continue
            del entries[key_name]  # type: ignore[union-attr]
            if not entries:
                del self._entries[scope]

    def _release(self, key_name: str, model: str) -> None:
        """The attempt said nothing about the key: free a half-open probe slot it held."""
        for scope in (model, KEY_WIDE):
            entries = self._entries.get(scope)
            entry = entries.get(key_name) if entries else None
            if entry is not None:
                entry.probing_since = None

    def _entry(self, scope: str | None, key_name: str) -> Entry:
        entries = self._entries.setdefault(scope, {})
        entry = entries.get(key_name)
        if entry is None:
            entry = entries[key_name] = Entry()
        return entry

    # -- reporting and upkeep --------------------------------------------------------------

    def statuses(self) -> Iterator[KeyStatus]:
        """Every (key, model) with something remembered, plus one key-wide row per key."""
        now = self._clock()
        wide = self._entries.get(KEY_WIDE, {})
        for key in self.keys:
            entry = wide.get(key.name)
            yield _status(key.name, KEY_WIDE, entry, now)
        for scope, entries in self._entries.items():
            if scope is KEY_WIDE:
                continue
            for name, entry in entries.items():
                yield _status(name, scope, entry, now)

    def blocking(self, model: str) -> list[KeyStatus]:
        """Why each key allowed for `model` cannot serve it now (for the no-key answer)."""
        now = self._clock()
        timeout = self.policy.probe_timeout
        rows = []
        for key in self.keys:
            if not key.allows(model):
                continue
            for scope in (KEY_WIDE, model):
                entry = self._entries.get(scope, {}).get(key.name)
                if entry is not None and entry.blocks(now, timeout):
                    rows.append(_status(key.name, scope, entry, now))
                    break
        return rows

    def sweep(self) -> None:
        """Forget entries idle since long after their cooldown ended."""
        now = self._clock()
        horizon = now - self.policy.idle_expiry
        for scope in list(self._entries):
            entries = self._entries[scope]
            for name in [n for n, e in entries.items() if _idle(e, horizon, now)]:
                del entries[name]
            if not entries:
                del self._entries[scope]

    def adopt(self, old: KeyPool, unchanged: Collection[str]) -> None:
        """Carry health over from a previous pool for the keys whose name and value are unchanged."""
        keep = set(unchanged) & set(self._index)
        for scope, entries in old._entries.items():
            kept = {name: entry for name, entry in entries.items() if name in keep}
            if kept:
                self._entries[scope] = kept
        self._cursors = OrderedDict(old._cursors)
        count = len(self.keys)
        for model, last in self._cursors.items():
            self._cursors[model] = min(last, count - 1)

    def entry_count(self) -> int:
        return sum(len(entries) for entries in self._entries.values())


def _idle(entry: Entry, horizon: float, now: float) -> bool:
    if entry.until > now or entry.probing_since is not None:
        return False
    return max(entry.until, entry.last_failure_at) < horizon


def _status(key: str, scope: str | None, entry: Entry | None, now: float) -> KeyStatus:
    if entry is None:
        return KeyStatus(key, scope, KeyState.USABLE, None, 0, None)
    until = entry.until if entry.until > now else None
    return KeyStatus(key, scope, entry.state(now, scope is KEY_WIDE), until, entry.failures, entry.last_outcome)
