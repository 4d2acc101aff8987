"""Prometheus metrics: one registry per app instance, exported by a collector at scrape time.

The names and labels here are a contract users alert on; the README lists every one.

keymux runs on one event loop, so its counters and histograms are plain numbers in slotted
objects: no lock per update as prometheus-client's thread-safe metric classes take. The hot path
costs a dict lookup and an addition; the exposition is built by prometheus-client's own metric
families when Prometheus scrapes.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from sidecar import __version__
from sidecar.capacity import Capacity
from sidecar.health import ALL_MODELS, KeyState, KeyStatus
from sidecar.outcome import Outcome

TTFB_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 45, 60, 90, 120)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 180, 300, 600)
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)
WAIT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
OTHER = "other"
NO_MODEL = "unknown"
KEY_WIDE_LABEL = "*"


class Count:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount


class _Histogram:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, the last one for +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.sum += value
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bound >= value: `le` holds


class Family:
    """A labelled counter, gauge or histogram and its children by label values."""

    def __init__(
        self, kind: str, name: str, documentation: str, labels: Iterable[str] = (), buckets: tuple[float, ...] = ()
    ) -> None:
        self.kind, self.name, self.documentation = kind, name, documentation
        self.labels = list(labels)
        self.buckets = tuple(float(b) for b in buckets)
        self.children: dict[tuple[str, ...], Count | _Histogram] = {}

    def __call__(self, *labels: str) -> Any:  # Count or _Histogram, by kind
        child = self.children.get(labels)
        if child is None:
            child = self.children[labels] = _Histogram(self.buckets) if self.kind == "histogram" else Count()
        return child

    def forget(self, keep: Callable[[tuple[str, ...]], bool]) -> None:
        for labels in [labels for labels in self.children if not keep(labels)]:
            del self.children[labels]

    def collect(self) -> Metric:
        if self.kind == "histogram":
            family: Metric = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
            les = [floatToGoString(b) for b in self.buckets] + ["+Inf"]
            for labels, child in self.children.items():
                assert isinstance(child, _Histogram)
                total, cumulative = 0, []
                for le, count in zip(les, child.counts, strict=True):
                    total += count
                    cumulative.append((le, total))
                family.add_metric(list(labels), cumulative, child.sum)  # type: ignore[attr-defined]
            return family
        cls = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        family = cls(self.name, self.documentation, labels=self.labels)
        for labels, child in self.children.items():
            family.add_metric(list(labels), child.value)  # type: ignore[attr-defined, union-attr]
        return family


class FamilyCollector(Collector):
    def __init__(self, families: list[Family]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            yield family.collect()


class ModelLabels:
    """Bounds the model label: configured models always pass, others until the cap."""

    def __init__(self, cap: int, known: Iterable[str] = ()) -> None:
        self.cap = cap
        self.known = set(known)
        self.seen: set[str] = set()

    def __call__(self, model: str | None) -> str:
        if not model:
            return NO_MODEL
        if model in self.known or model in self.seen:
            return model
        if len(self.seen) < self.cap:
            self.seen.add(model)
            return model
        return OTHER


# keymux_key_state's encoding of a key's state.
KEY_STATE_GAUGE = {
    KeyState.USABLE: 0,
    KeyState.HALF_OPEN: 0,
    KeyState.COOLING: 1,
    KeyState.DISABLED: 2,
    KeyState.SATURATED: 3,
}


class KeyRows(Protocol):
    def statuses(self) -> Iterator[KeyStatus]: ...


HealthRecords = Callable[[], Iterable[tuple[str, KeyRows]]]  # (provider name, its key states)
CapacityRecords = Callable[[], Iterable[tuple[str, Capacity]]]


def scope_label(status: KeyStatus) -> str:
    return KEY_WIDE_LABEL if status.scope is ALL_MODELS else status.scope


class KeyStateCollector(Collector):
    """keymux_key_state, read from the live health records at scrape time, so expired states vanish."""

    def __init__(self, records: HealthRecords, models: ModelLabels) -> None:
        self.records = records
        self.models = models

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "keymux_key_state",
            "Key health: 0 usable, 1 cooling for this model, 2 disabled for every model (model='*'), "
            "3 saturated (no room left under a rate limit)",
            labels=["provider", "key", "model"],
        )
        seen: dict[tuple[str, str, str], int] = {}
        for provider, rows in self.records():
            for status in rows.statuses():
                gauge = KEY_STATE_GAUGE[status.state]
                # Every key has its model="*" series; a model's series lives only while that
                # model rests, so it is gone once the cooldown ends (the half-open probe is usable).
                if gauge == 0 and status.scope is not ALL_MODELS:
                    continue
                labels = (provider, status.key, self._model(status))
                seen[labels] = max(seen.get(labels, 0), gauge)
        for labels, value in seen.items():
            family.add_metric(list(labels), value)
        yield family

    def _model(self, status: KeyStatus) -> str:
        return KEY_WIDE_LABEL if status.scope is ALL_MODELS else self.models(status.scope)


class CapacityCollector(Collector):
    """The learned limits and the room left, read from the capacity records at scrape time."""

    def __init__(self, records: CapacityRecords, models: ModelLabels) -> None:
        self.records = records
        self.models = models

    def collect(self) -> Iterator[Metric]:
        names = ["provider", "key", "model", "kind"]
        limit = GaugeMetricFamily("keymux_key_limit", "The rate limit the provider reported", labels=names)
        remaining = GaugeMetricFamily(
            "keymux_key_remaining", "The room left under it now, as keymux estimates it", labels=names
        )
        avoided = CounterMetricFamily(
            "keymux_saturations",
            "Requests kept off a key that had no room left under a limit (a 429 not spent)",
            labels=["provider", "key", "limit"],
        )
        limits: dict[tuple[str, ...], float] = {}
        rooms: dict[tuple[str, ...], float] = {}
        for provider, capacity in self.records():
            for gauge in capacity.gauges():
                series = (provider, gauge.key, self.models(gauge.model), gauge.kind)
                if gauge.limit is not None:
                    limits[series] = max(limits.get(series, 0.0), gauge.limit)
                rooms[series] = min(rooms.get(series, gauge.remaining), gauge.remaining)
            for (key, held), count in capacity.avoided.items():
                avoided.add_metric([provider, key, held], count)
        for labels, value in limits.items():
            limit.add_metric(list(labels), value)
        for labels, value in rooms.items():
            remaining.add_metric(list(labels), value)
        yield limit
        yield remaining
        yield avoided


class Metrics:
    def __init__(self, max_models: int = 100, known_models: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.models = ModelLabels(max_models, known_models)
        families: list[Family] = []

        def family(
            kind: str, name: str, doc: str, labels: Iterable[str] = (), buckets: tuple[float, ...] = ()
        ) -> Family:
            families.append(Family(kind, name, doc, labels, buckets))
            return families[-1]

        self.requests = family(
            "counter", "keymux_requests", "App requests, end to end", ["route", "provider", "model", "outcome"]
        )
        self.attempts = family(
            "counter", "keymux_upstream_attempts", "Upstream attempts", ["provider", "key", "model", "outcome"]
        )
        self.key_retries = family(
            "counter",
            "keymux_key_retries",
            "Switches to another key of the same provider",
            ["provider", "model", "reason"],
        )
        self.fallbacks = family(
            "counter",
            "keymux_provider_fallbacks",
            "Moves to the next provider of a route",
            ["route", "from_provider", "to_provider"],
        )
        self.provider_requests = family(
            "counter",
            "keymux_provider_requests",
            "Per provider per request; a failure only when the provider failed the request end to end",
            ["provider", "model", "outcome"],
        )
        self.ttfb = family(
            "histogram",
            "keymux_upstream_ttfb_seconds",
            "Time to upstream response headers",
            ["provider", "model"],
            TTFB_BUCKETS,
        )
        self.duration = family(
            "histogram",
            "keymux_request_duration_seconds",
            "Whole app request, streaming included",
            ["route", "model", "outcome"],
            DURATION_BUCKETS,
        )
        self.overhead = family(
            "histogram", "keymux_overhead_seconds", "Time spent inside keymux itself", ["route"], OVERHEAD_BUCKETS
        )
        self.tokens = family(
            "counter", "keymux_tokens", "Tokens reported in upstream usage", ["provider", "key", "model", "kind"]
        )
        self.inflight: Count = family("gauge", "keymux_inflight_requests", "App requests in flight")()
        self.reloads = family("counter", "keymux_config_reloads", "Config reloads", ["result"])
        self.capacity_wait = family(
            "histogram",
            "keymux_capacity_wait_seconds",
            "Time requests waited for a saturated or rate-limited key (retry.max_wait); "
            "result: served, or gave_up when none freed up in time",
            ["result"],
            WAIT_BUCKETS,
        )
        family("gauge", "keymux_build_info", "keymux build", ["version"])(__version__).inc()
        self.registry.register(FamilyCollector(families))

    def watch_health(self, records: HealthRecords) -> None:
        self.registry.register(KeyStateCollector(records, self.models))

    def watch_capacity(self, records: CapacityRecords) -> None:
        self.registry.register(CapacityCollector(records, self.models))

    def attempt(self, provider: str, key: str, model: str, outcome: Outcome) -> None:
        self.attempts(provider, key, model, outcome.value).inc()

    def forget_keys(self, live: set[tuple[str, str]]) -> None:
        """Drop the series of keys a reload removed, so dashboards do not show ghosts."""
        self.attempts.forget(lambda labels: (labels[0], labels[1]) in live)
        self.tokens.forget(lambda labels: (labels[0], labels[1]) in live)
