"""A provider's keys as the proxy sees them, for the pure-core tests: a health record and the
round-robin selector that consults it."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence

from sidecar.capacity import Capacity
from sidecar.classify import Verdict
from sidecar.health import Clock, HealthSettings, KeyStatus, LocalHealth
from sidecar.keys import Key
from sidecar.selection import WeightedRoundRobin


class Pool:
    def __init__(self, keys: Sequence[Key], settings: HealthSettings, clock: Clock) -> None:
        self.health = LocalHealth([key.name for key in keys], settings, clock)
        self.capacity = Capacity(keys, clock, settings.max_models)
        self.selector = WeightedRoundRobin(keys, self.health, self.capacity, settings.max_models)

    def choose(self, model: str, exclude: Collection[str] = (), tokens: int = 0) -> Key | None:
        return self.selector.choose(model, exclude, tokens)

    def record(self, key: str, model: str, verdict: Verdict) -> None:
        self.health.record(key, model, verdict)

    def statuses(self) -> Iterator[KeyStatus]:
        return self.health.statuses()

    def blocking(self, model: str) -> list[KeyStatus]:
        """Why each key allowed for `model` cannot serve it now, as the no-key answer reads it."""
        keys = [key for key in self.selector.keys if key.allows(model)]
        return [status for key in keys if (status := self.health.blocker(key.name, model)) is not None]

    def entry_count(self) -> int:
        return self.health.entry_count()

    def sweep(self) -> None:
        self.health.sweep()

    def adopt(self, old: Pool, unchanged: Collection[str]) -> None:
        self.health.adopt(old.health, unchanged)
        self.selector.adopt(old.selector)
