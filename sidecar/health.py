"""Per-(key, model) health: what keymux has learned about each key, and nothing else.

The health record answers one question for selection (may this key serve this model now?) and
learns from each finished attempt's verdict. It knows nothing of rotation order (`select.py`)
or of Prometheus (`metrics.py`). `HealthStore` is the seam: `LocalHealth` keeps the record in
process memory; a store shared by a fleet can stand behind the same interface, as long as its
answers come from local state (selection never waits on I/O).

Plain Python with an injected clock. Only keys with something to remember have an entry, idle
entries expire and the number of models tracked is capped, so memory stays bounded whatever
model strings the app sends.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from sidecar.classify import Verdict
from sidecar.outcome import Outcome

Clock = Callable[[], float]

_MAX_STRIKES = 30  # enough for any cap; keeps 2**n finite


class AllModels(enum.Enum):
    """The scope of what concerns a key for every model: a revoked key, an account out of credit."""

    ALL = "*"


ALL_MODELS: Final = AllModels.ALL
Scope = str | AllModels  # a model name, or every model


def backoff(base: float, cap: float, strikes: int) -> float:
    """The cooldown after `strikes` cooldowns in a row: base, 2 x base, 4 x base … at most cap.

    The one schedule of every cooldown that doubles (failures, credentials, model access,
    rate limits that say nothing about when)."""
    return min(base * 2.0 ** min(strikes, _MAX_STRIKES), cap)


@dataclass(frozen=True)
class HealthSettings:
    """Every number of the health rules: the `health:` config section, field for field."""

    failure_threshold: int = 3
    failure_cooldown: float = 30.0
    failure_cooldown_max: float = 600.0
    credential_cooldown: float = 600.0
    credential_cooldown_max: float = 6 * 3600.0
    model_cooldown: float = 300.0
    model_cooldown_max: float = 3600.0
    rate_limit_cooldown: float = 30.0  # a 429 that says nothing about when: doubles from here
    rate_limit_cooldown_max: float = 3600.0  # caps that, and what a provider may ask for
    quota_cooldown: float = 1800.0  # insufficient_quota: the account is out of credit
    quota_window_max: float = 25 * 3600.0  # caps a per-day quota's rest (a Pacific day lasts 25 h when DST ends)
    probe_timeout: float = 600.0  # a half-open probe never reported frees its slot after this
    idle_expiry: float = 3600.0  # forget an entry this long after its cooldown ended
    max_models: int = 1000  # distinct model names tracked per provider


class KeyState(enum.StrEnum):
    USABLE = "usable"
    HALF_OPEN = "half_open"  # cooldown over: the next request probes it
    COOLING = "cooling"  # this (key, model) is resting
    DISABLED = "disabled"  # the key is resting for every model
    SATURATED = "saturated"  # no room left under a rate limit until `until` (the capacity record's)


@dataclass(slots=True)
class Entry:
    failures: int = 0  # consecutive failures of the transient kind
    strikes: int = 0  # cooldowns in a row, for doubling
    until: float = 0.0  # cooling until this clock time
    cooled: bool = False  # after a cooldown a single probe must succeed
    probing_since: float | None = None
    last_outcome: Outcome | None = None
    last_failure_at: float = 0.0
    held_until: float = 0.0  # `until` as another pod's probe lease set it (see LocalHealth.hold)
    rest_until: float = 0.0  # `until` before that hold: when the key's own rest ends

    def blocks(self, now: float, probe_timeout: float) -> bool:
        if self.until > now:
            return True
        probing = self.probing_since is not None and now - self.probing_since < probe_timeout
        return self.cooled and probing

    def state(self, now: float, scope: Scope) -> KeyState:
        if self.until > now:
            return KeyState.DISABLED if scope is ALL_MODELS else KeyState.COOLING
        return KeyState.HALF_OPEN if self.cooled else KeyState.USABLE


@dataclass(frozen=True, slots=True)
class KeyStatus:
    """One row of the health table, for /keys, the key_state gauge and the no-key answer."""

    key: str
    scope: Scope
    state: KeyState
    until: float | None  # clock time the rest ends; None when not resting
    failures: int
    last_outcome: Outcome | None
    limit: str | None = None  # for a saturated key: the limit that holds it (requests, tokens, rpm, tpm)


@dataclass(frozen=True, slots=True)
class Change:
    """What a pod learned about a key that the rest of its fleet should know: a rest that
    began or grew longer (`seconds` from now), or a rest a proven success ended (`cleared`)."""

    key: str
    scope: Scope
    cleared: bool
    outcome: Outcome | None = None
    seconds: float = 0.0
    strikes: int = 0


Watcher = Callable[[Change], None]


class HealthStore(Protocol):
    """What selection and the attempt ask of a health record. Every call is synchronous."""

    @property
    def quiet(self) -> bool:
        """Nothing remembered of any key: every key is usable. Selection's fast path."""
        ...

    def usable(self, key: str, model: str) -> bool:
        """May `key` serve `model` now? Asking claims nothing."""
        ...

    def admit(self, key: str, model: str) -> bool:
        """May `key` serve `model` now? Admitting a half-open key claims its one probe."""
        ...

    def record(self, key: str, model: str, verdict: Verdict) -> None:
        """Learn from one finished attempt's final verdict."""
        ...

    def blocker(self, key: str, model: str) -> KeyStatus | None:
        """Why `key` cannot serve `model` now, or None when it can."""
        ...

    def statuses(self) -> Iterator[KeyStatus]:
        """A key-wide row for every key, then every (key, model) with something remembered."""
        ...

    def sweep(self) -> None:
        """Forget what has been idle for long."""
        ...


class LocalHealth:
    """The health of one provider's keys, in process memory."""

    def __init__(self, keys: Sequence[str], settings: HealthSettings, clock: Clock) -> None:
        self.keys = tuple(keys)
        self.settings = settings
        self._clock = clock
        self._wide: dict[str, Entry] = {}
        self._models: OrderedDict[str, dict[str, Entry]] = OrderedDict()  # least recently used first
        self.watcher: Watcher | None = None  # told what this pod learned (the fleet link), if any

    # -- asked by selection ----------------------------------------------------------------

    @property
    def quiet(self) -> bool:
        """Nothing remembered of any key: every key is usable. Selection's fast path."""
        return not self._wide and not self._models

    def usable(self, key: str, model: str) -> bool:
        wide = self._wide.get(key)
        entries = self._models.get(model)
        if wide is None and not entries:
            return True  # the usual case: nothing remembered
        now = self._clock()
        timeout = self.settings.probe_timeout
        if wide is not None and wide.blocks(now, timeout):
            return False
        scoped = entries.get(key) if entries else None
        return scoped is None or not scoped.blocks(now, timeout)

    def admit(self, key: str, model: str) -> bool:
        if not self.usable(key, model):
            return False
        entries = self._models.get(model)
        for entry in (self._wide.get(key), entries.get(key) if entries else None):
            if entry is not None and entry.cooled:
                entry.probing_since = self._clock()
        return True

    def blocker(self, key: str, model: str) -> KeyStatus | None:
        now = self._clock()
        timeout = self.settings.probe_timeout
        entries = self._models.get(model)
        for scope, entry in ((ALL_MODELS, self._wide.get(key)), (model, entries.get(key) if entries else None)):
            if entry is not None and entry.blocks(now, timeout):
                return _status(key, scope, entry, now)
        return None

    # -- learning --------------------------------------------------------------------------

    def record(self, key: str, model: str, verdict: Verdict) -> None:
        now = self._clock()
        outcome = verdict.outcome
        settings = self.settings
        if outcome is Outcome.SUCCESS:
            self._succeeded(key, model, now)
        elif verdict.provider_wide or not outcome.retryable:
            self._release(key, model)
        elif verdict.key_wide:
            entry = self._wide.setdefault(key, Entry())
            before = entry.until
            if outcome is Outcome.CREDENTIAL_ERROR:
                seconds = backoff(settings.credential_cooldown, settings.credential_cooldown_max, entry.strikes)
            else:
                seconds = settings.quota_cooldown
            _cool(entry, seconds, now, outcome)
            self._announce(key, ALL_MODELS, entry, before, now)
        else:
            entry = self._scoped_entry(key, model, now)
            before = entry.until
            self._record_scoped(entry, verdict, now)
            self._announce(key, model, entry, before, now)

    def _announce(self, key: str, scope: Scope, entry: Entry, before: float, now: float) -> None:
        if self.watcher is not None and entry.until > now and entry.until != before:
            self.watcher(Change(key, scope, False, entry.last_outcome, entry.until - now, entry.strikes))

    # -- what the rest of the fleet learned --------------------------------------------------

    def rest(self, key: str, scope: Scope, outcome: Outcome | None, seconds: float, strikes: int = 0) -> bool:
        """Another pod saw `key` fail: rest it too. The later deadline wins; a rest is never
        shortened (only a proven success ends one early). True when it changed anything."""
        now = self._clock()
        entry = self._wide.setdefault(key, Entry()) if scope is ALL_MODELS else self._scoped_entry(key, scope, now)
        until = now + seconds
        # A verdict came while the key was held for another pod's probe: what keeps it resting now
        # is that verdict's rest, which winning the next lease must not end.
        entry.held_until = 0.0
        if entry.until >= until:
            return False
        entry.until = until
        entry.strikes = max(entry.strikes, strikes)
        entry.cooled = True
        entry.probing_since = None
        entry.last_outcome, entry.last_failure_at = outcome, now
        return True

    def hold(self, key: str, scope: Scope, until: float) -> None:
        """Another pod holds the probe of this key: keep it resting here until `until` (or a verdict)."""
        entry = self._entry(key, scope)
        if entry is not None and entry.cooled and until > entry.until:
            if not entry.held_until:
                entry.rest_until = entry.until
            entry.until = entry.held_until = until

    def release(self, key: str, scope: Scope) -> None:
        """This pod holds the probe now: end a hold (never a rest of the key's own) so it probes."""
        entry = self._entry(key, scope)
        if entry is not None and entry.held_until and entry.until == entry.held_until:
            entry.until = max(entry.rest_until, min(entry.until, self._clock()))  # the rest itself stays
            entry.held_until = 0.0

    def held(self, key: str, scope: Scope) -> float:
        """The end of a hold set by `hold` (0 when none): the fleet tells a hold from a rest."""
        entry = self._entry(key, scope)
        return entry.held_until if entry is not None else 0.0

    def _entry(self, key: str, scope: Scope) -> Entry | None:
        table = self._wide if scope is ALL_MODELS else self._models.get(scope)
        return table.get(key) if table is not None else None

    def clear(self, key: str, scope: Scope) -> bool:
        """Another pod's probe of `key` succeeded: its rest is over here too."""
        table = self._wide if scope is ALL_MODELS else self._models.get(scope)
        if table is None or table.pop(key, None) is None:
            return False
        if scope is not ALL_MODELS and not table:
            del self._models[scope]
        return True

    def resting(self, key: str, scope: Scope) -> tuple[float, bool, bool] | None:
        """(when its rest ends, whether a probe must follow, whether one is in flight), for the
        fleet's probe lease; None when nothing is remembered."""
        entry = self._entry(key, scope)
        if entry is None:
            return None
        return entry.until, entry.cooled, entry.probing_since is not None

    def _record_scoped(self, entry: Entry, verdict: Verdict, now: float) -> None:
        outcome = verdict.outcome
        s = self.settings
        if outcome is Outcome.RATE_LIMITED:
            asked = verdict.retry_after
            if asked:
                # A daily quota rests until its window ends, not a probe every rate_limit_cooldown.
                seconds = min(asked, s.quota_window_max if verdict.quota_window else s.rate_limit_cooldown_max)
            else:
                seconds = backoff(s.rate_limit_cooldown, s.rate_limit_cooldown_max, entry.strikes)
            _cool(entry, seconds, now, outcome)
        elif outcome is Outcome.PERMISSION_ERROR:
            _cool(entry, backoff(s.model_cooldown, s.model_cooldown_max, entry.strikes), now, outcome)
        else:  # upstream error, timeout, connection error: count, cool at the threshold
            entry.failures += 1
            if entry.cooled or entry.failures >= s.failure_threshold:
                _cool(entry, backoff(s.failure_cooldown, s.failure_cooldown_max, entry.strikes), now, outcome)
            else:
                entry.last_outcome, entry.last_failure_at = outcome, now

    def _succeeded(self, key: str, model: str, now: float) -> None:
        entries = self._models.get(model)
        for table in (self._wide,) if entries is None else (entries, self._wide):
            entry = table.get(key)
            if entry is None:
                continue
            if entry.until > now:  # a success that started before a newer failure: keep resting
                entry.failures = 0
                continue
            del table[key]
            if entry.cooled and self.watcher is not None:  # a probe passed: the fleet may stop resting it
                self.watcher(Change(key, ALL_MODELS if table is self._wide else model, True))
        if entries is not None and not entries:
            del self._models[model]

    def _release(self, key: str, model: str) -> None:
        """The attempt said nothing about the key: free a half-open probe slot it held."""
        entries = self._models.get(model)
        for entry in (self._wide.get(key), entries.get(key) if entries else None):
            if entry is not None:
                entry.probing_since = None

    def _scoped_entry(self, key: str, model: str, now: float) -> Entry:
        models = self._models
        entries = models.get(model)
        if entries is None:
            if len(models) >= self.settings.max_models:
                self._forget_a_model(now)
            entries = models[model] = {}
        else:
            models.move_to_end(model)
        entry = entries.get(key)
        if entry is None:
            entry = entries[key] = Entry()
        return entry

    def _forget_a_model(self, now: float) -> None:
        """Make room: the least recently used model with no key resting for it, else the oldest."""
        victim = next(iter(self._models))
        for model, entries in self._models.items():
            if all(entry.until <= now for entry in entries.values()):
                victim = model
                break
        del self._models[victim]

    # -- reporting and upkeep --------------------------------------------------------------

    def statuses(self) -> Iterator[KeyStatus]:
        now = self._clock()
        for key in self.keys:
            yield _status(key, ALL_MODELS, self._wide.get(key), now)
        for model, entries in self._models.items():
            for key, entry in entries.items():
                yield _status(key, model, entry, now)

    def sweep(self) -> None:
        now = self._clock()
        horizon = now - self.settings.idle_expiry
        for table in (self._wide, *self._models.values()):
            for key in [k for k, e in table.items() if _idle(e, horizon, now)]:
                del table[key]
        for model in [m for m, entries in self._models.items() if not entries]:
            del self._models[model]

    def adopt(self, old: LocalHealth, unchanged: Collection[str]) -> None:
        """Carry health over from a previous record for the keys whose name and value are unchanged."""
        keep = set(unchanged) & set(self.keys)
        self._wide = {key: entry for key, entry in old._wide.items() if key in keep}
        for model, entries in old._models.items():
            kept = {key: entry for key, entry in entries.items() if key in keep}
            if kept:
                self._models[model] = kept

    def entry_count(self) -> int:
        return len(self._wide) + sum(len(entries) for entries in self._models.values())


def _cool(entry: Entry, seconds: float, now: float, outcome: Outcome) -> None:
    if entry.until > now:  # already resting (a concurrent failure): extend, no extra strike
        entry.until = max(entry.until, now + seconds)
    else:
        entry.until = now + seconds
        entry.strikes = min(entry.strikes + 1, _MAX_STRIKES)
    entry.cooled = True
    entry.probing_since = None
    entry.last_outcome, entry.last_failure_at = outcome, now


def _idle(entry: Entry, horizon: float, now: float) -> bool:
    if entry.until > now or entry.probing_since is not None:
        return False
    return max(entry.until, entry.last_failure_at) < horizon


def _status(key: str, scope: Scope, entry: Entry | None, now: float) -> KeyStatus:
    if entry is None:
        return KeyStatus(key, scope, KeyState.USABLE, None, 0, None)
    until = entry.until if entry.until > now else None
    return KeyStatus(key, scope, entry.state(now, scope), until, entry.failures, entry.last_outcome)
