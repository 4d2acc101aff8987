"""Prometheus metrics: one registry per app instance, label children cached off the hot path.

The names and labels here are a contract users alert on; the README lists every one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from sidecar import __version__
from sidecar.health import KeyPool, KeyStatus
from sidecar.outcome import Outcome

disable_created_metrics()  # the *_created series double the series count for no alerting value

TTFB_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 45, 60, 90, 120)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 180, 300, 600)
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)
OTHER = "other"
NO_MODEL = "unknown"
KEY_WIDE_LABEL = "*"


class _Family:
    """A labelled metric with its children cached by label values."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *labels: str) -> Any:
        child = self.children.get(labels)
        if child is None:
            child = self.children[labels] = self.metric.labels(*labels)
        return child

    def forget(self, keep: Callable[[tuple[str, ...]], bool]) -> None:
        for labels in [labels for labels in self.children if not keep(labels)]:
            del self.children[labels]
            self.metric.remove(*labels)


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


class KeyStateCollector(Collector):
    """keymux_key_state, read from the live pools at scrape time, so expired states vanish."""

    def __init__(self, pools: Callable[[], Iterable[KeyPool]], models: ModelLabels) -> None:
        self.pools = pools
        self.models = models

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "keymux_key_state",
            "Key health: 0 usable, 1 cooling for this model, 2 disabled for every model (model='*')",
            labels=["provider", "key", "model"],
        )
        seen: dict[tuple[str, str, str], int] = {}
        for pool in self.pools():
            for status in pool.statuses():
                gauge = status.state.gauge
                # Every key has its model="*" series; a model's series lives only while that
                # model rests, so it is gone once the cooldown ends (the half-open probe is usable).
                if gauge == 0 and status.model is not None:
                    continue
                labels = (pool.provider, status.key, self._model(status))
                seen[labels] = max(seen.get(labels, 0), gauge)
        for labels, value in seen.items():
            family.add_metric(list(labels), value)
        yield family

    def _model(self, status: KeyStatus) -> str:
        return KEY_WIDE_LABEL if status.model is None else self.models(status.model)


class Metrics:
    def __init__(self, max_models: int = 100, known_models: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.models = ModelLabels(max_models, known_models)
        r = self.registry
        self.requests = _Family(
            Counter(
                "keymux_requests", "App requests, end to end", ["route", "provider", "model", "outcome"], registry=r
            )
        )
        self.attempts = _Family(
            Counter(
                "keymux_upstream_attempts", "Upstream attempts", ["provider", "key", "model", "outcome"], registry=r
            )
        )
        self.key_retries = _Family(
            Counter(
                "keymux_key_retries",
                "Switches to another key of the same provider",
                ["provider", "model", "reason"],
                registry=r,
            )
        )
        self.fallbacks = _Family(
            Counter(
                "keymux_provider_fallbacks",
                "Moves to the next provider of a route",
                ["route", "from_provider", "to_provider"],
                registry=r,
            )
        )
        self.provider_requests = _Family(
            Counter(
                "keymux_provider_requests",
                "Per provider per request; a failure only when the provider failed the request end to end",
                ["provider", "model", "outcome"],
                registry=r,
            )
        )
        self.ttfb = _Family(
            Histogram(
                "keymux_upstream_ttfb_seconds",
                "Time to upstream response headers",
                ["provider", "model"],
                buckets=TTFB_BUCKETS,
                registry=r,
            )
        )
        self.duration = _Family(
            Histogram(
                "keymux_request_duration_seconds",
                "Whole app request, streaming included",
                ["route", "model", "outcome"],
                buckets=DURATION_BUCKETS,
                registry=r,
            )
        )
        self.overhead = _Family(
            Histogram(
                "keymux_overhead_seconds",
                "Time spent inside keymux itself",
                ["route"],
                buckets=OVERHEAD_BUCKETS,
                registry=r,
            )
        )
        self.tokens = _Family(
            Counter(
                "keymux_tokens", "Tokens reported in upstream usage", ["provider", "key", "model", "kind"], registry=r
            )
        )
        self.inflight = Gauge("keymux_inflight_requests", "App requests in flight", registry=r)
        self.reloads = _Family(Counter("keymux_config_reloads", "Config reloads", ["result"], registry=r))
        info = Gauge("keymux_build_info", "keymux build", ["version"], registry=r)
        info.labels(__version__).set(1)

    def watch_pools(self, pools: Callable[[], Iterable[KeyPool]]) -> None:
        self.registry.register(KeyStateCollector(pools, self.models))

    def attempt(self, provider: str, key: str, model: str, outcome: Outcome) -> None:
        self.attempts(provider, key, model, outcome.value).inc()

    def forget_keys(self, live: set[tuple[str, str]]) -> None:
        """Drop the series of keys a reload removed, so dashboards do not show ghosts."""
        self.attempts.forget(lambda labels: (labels[0], labels[1]) in live)
        self.tokens.forget(lambda labels: (labels[0], labels[1]) in live)
