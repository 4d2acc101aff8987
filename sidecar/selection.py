"""Key selection: which of a provider's keys serves the next request for a model.

A smooth weighted round-robin per model (nginx's algorithm) over the keys the health record
admits and the capacity record has room on, skipping the keys the request already tried. Each
key's weight is its capacity (`Capacity.weights`: the limit its provider reported, else its
configured weight), so shares follow capacity and interleave evenly; with equal weights it is a
plain round-robin. Selection owns only the per-model rotation state: what a key is fit for is
the health record's answer, how much room it has the capacity record's.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Collection, Sequence

from sidecar.capacity import Capacity
from sidecar.health import HealthStore
from sidecar.keys import Key


class WeightedRoundRobin:
    def __init__(self, keys: Sequence[Key], health: HealthStore, capacity: Capacity, max_models: int) -> None:
        self.keys = tuple(keys)
        self.health = health
        self.capacity = capacity
        self.max_models = max_models
        # model -> each key's current weight (nginx's `current_weight`), least recently used first
        self._current: OrderedDict[str, dict[str, float]] = OrderedDict()

    def choose(self, model: str, exclude: Collection[str] = (), tokens: int = 0) -> Key | None:
        """The key to serve a request for `model` of about `tokens` tokens, or None."""
        if self.health.quiet and self.capacity.quiet:  # the usual case: every key is fit
            fit = [key for key in self.keys if key.allows(model)]
            candidates = [key for key in fit if key.name not in exclude] if exclude else fit
            if not candidates:
                return None
            tried = [key for key in fit if key.name in exclude] if exclude else []
            return candidates[0] if len(candidates) == 1 and not tried else self._pick(model, candidates, tried)
        usable = self.health.usable
        ready_at = self.capacity.ready_at
        candidates = []
        tried = []
        for key in self.keys:
            name = key.name
            if not key.allows(model):
                continue
            if name in exclude:
                tried.append(key)
                continue
            if not usable(name, model):
                continue
            held = ready_at(name, model, tokens)
            if held is not None:
                self.capacity.skipped(name, held[1])
                continue
            candidates.append(key)
        if not candidates:
            return None
        chosen = candidates[0] if len(candidates) == 1 and not tried else self._pick(model, candidates, tried)
        self.health.admit(chosen.name, model)  # claims a half-open key's probe
        return chosen

    def _pick(self, model: str, candidates: list[Key], tried: list[Key]) -> Key:
        """nginx: every candidate gains its weight, the highest is chosen and loses the total.

        The keys this request already tried gain their weight too, though they cannot be
        chosen: the key that serves a retry is charged a whole turn, so retries do not tilt
        the shares."""
        current = self._state(model)
        weigh = self.capacity.weights
        total = 0.0
        if tried:
            for key, weight in zip(tried, weigh(model, tried), strict=True):
                current[key.name] = current.get(key.name, 0.0) + weight
                total += weight
        best, best_weight = candidates[0], -math.inf
        for key, weight in zip(candidates, weigh(model, candidates), strict=True):
            value = current.get(key.name, 0.0) + weight
            current[key.name] = value
            total += weight
            if value > best_weight:
                best, best_weight = key, value
        current[best.name] = best_weight - total
        return best

    def _state(self, model: str) -> dict[str, float]:
        states = self._current
        current = states.get(model)
        if current is not None:
            states.move_to_end(model)
            return current
        if len(states) >= self.max_models:
            states.popitem(last=False)
        current = states[model] = {}
        return current

    def adopt(self, old: WeightedRoundRobin) -> None:
        """Keep each model's place in the rotation across a reload."""
        names = {key.name for key in self.keys}
        self._current = OrderedDict(
            (model, {name: value for name, value in current.items() if name in names})
            for model, current in old._current.items()
        )
