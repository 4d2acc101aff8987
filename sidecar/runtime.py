"""A loaded config made ready to serve: pools, compiled patterns, redactor and routes.

A request runs against the Runtime it started with; a reload builds a new one that adopts the
health of every key whose provider, name and value are unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp

from sidecar.classify import Patterns
from sidecar.config import Config, ProviderConfig, Route
from sidecar.health import Backoff, Clock, KeyPool, exponential
from sidecar.providers import PROVIDERS, ProviderSpec
from sidecar.redact import Redactor

BackoffFactory = Callable[[float, float], Backoff]
_IDENTITY = ("Accept-Encoding", "identity")


@dataclass(frozen=True)
class Provider:
    config: ProviderConfig
    spec: ProviderSpec
    pool: KeyPool
    patterns: Patterns
    # What every request with a given key carries, built once: the provider's and the key's
    # configured headers, the key itself, and identity encoding (bodies are read to classify).
    key_headers: Mapping[str, tuple[tuple[str, str], ...]]

    @property
    def name(self) -> str:
        return self.config.name


class Runtime:
    def __init__(
        self,
        config: Config,
        clock: Clock,
        backoff: BackoffFactory = exponential,
        previous: Runtime | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        policy = config.health.policy(backoff)
        self.providers: dict[str, Provider] = {}
        for name, pc in config.providers.items():
            spec = PROVIDERS[pc.type]
            pool = KeyPool(name, pc.keys, policy, clock)
            if previous is not None and name in previous.providers:
                old = previous.providers[name]
                before = {(k.name, k.secret) for k in old.config.keys}
                unchanged = {k.name for k in pc.keys if (k.name, k.secret) in before}
                pool.adopt(old.pool, unchanged)
            key_headers = {
                key.name: (*pc.headers, *key.headers, (spec.auth_header, spec.auth_value(key.secret)), _IDENTITY)
                for key in pc.keys
            }
            self.providers[name] = Provider(pc, spec, pool, Patterns(pc.patterns), key_headers)
        self.routes: tuple[tuple[Route, tuple[Provider, ...]], ...] = tuple(
            (route, tuple(self.providers[n] for n in route.providers)) for route in config.routes
        )
        self.redact = Redactor(config.secrets())
        timeouts = config.timeouts
        self.client_timeout = aiohttp.ClientTimeout(
            total=timeouts.total, sock_connect=timeouts.connect, sock_read=timeouts.response_headers
        )
        self.known_models = {m for pc in config.providers.values() for k in pc.keys for m in k.models or ()}

    def route_for(self, path: str) -> tuple[Route, tuple[Provider, ...]] | None:
        for route, providers in self.routes:
            if route.matches(path):
                return route, providers
        return None

    def usable_keys(self) -> int:
        """Keys not disabled for every model: readiness needs at least one."""
        count = 0
        for provider in self.providers.values():
            disabled = {s.key for s in provider.pool.statuses() if s.model is None and s.until is not None}
            count += len(provider.config.keys) - len(disabled)
        return count


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
