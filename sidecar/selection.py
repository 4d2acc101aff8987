"""Key selection: which of a provider's keys serves the next request for a model.

Round-robin per model over the keys the health record admits, skipping the keys a request has
already tried. Selection owns only the rotation cursors; what a key is fit for is the health
record's answer (`HealthStore.admit`), so a different store or a weighted policy plugs in
without touching the other.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Sequence

from sidecar.health import HealthStore
from sidecar.keys import Key


class RoundRobin:
    def __init__(self, keys: Sequence[Key], health: HealthStore, max_models: int) -> None:
        self.keys = tuple(keys)
        self.health = health
        self.max_models = max_models
        self._cursors: OrderedDict[str, int] = OrderedDict()  # model -> index chosen last, LRU first

    def choose(self, model: str, exclude: Collection[str] = ()) -> Key | None:
        """The next key for `model` after the one chosen last that the health record admits."""
        keys = self.keys
        count = len(keys)
        last = self._cursor(model)
        admit = self.health.admit
        for step in range(1, count + 1):
            index = (last + step) % count
            key = keys[index]
            if key.name in exclude or not key.allows(model) or not admit(key.name, model):
                continue
            self._cursors[model] = index
            return key
        return None

    def _cursor(self, model: str) -> int:
        cursors = self._cursors
        last = cursors.get(model)
        if last is not None:
            cursors.move_to_end(model)
            return last
        if len(cursors) >= self.max_models:
            cursors.popitem(last=False)
        cursors[model] = -1
        return -1

    def adopt(self, old: RoundRobin) -> None:
        """Keep each model's place in the rotation across a reload."""
        top = len(self.keys) - 1
        self._cursors = OrderedDict((model, min(last, top)) for model, last in old._cursors.items())
