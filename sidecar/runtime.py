"""A loaded config made ready to serve: per provider its selector, health record, credential
step and compiled patterns; the redactor and the routes.

A request runs against the Runtime it started with; a reload builds a new one that adopts the
health of every key whose provider, name and value are unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import aiohttp
from yarl import URL

from sidecar.affinity import Affinity
from sidecar.capacity import REPORTS, Capacity, ReportParser
from sidecar.classify import Patterns
from sidecar.config import Config, ProviderConfig, Route
from sidecar.health import ALL_MODELS, Clock, KeyStatus, LocalHealth
from sidecar.keys import Key
from sidecar.providers import APP_CREDENTIAL_HEADERS, HOP_BY_HOP_HEADERS, PROVIDERS, Credential, ProviderSpec
from sidecar.redact import Redactor
from sidecar.selection import WeightedRoundRobin

_MAX_URLS = 1024
# Bodies are read to classify them and to find usage, so answers come unencoded.
_IDENTITY = ("Accept-Encoding", "identity")


@dataclass(frozen=True, slots=True)
class Provider:
    name: str  # config.name, read on every request
    config: ProviderConfig
    spec: ProviderSpec
    selector: WeightedRoundRobin
    health: LocalHealth
    capacity: Capacity
    report: ReportParser | None  # reads the rate-limit headers of the provider's answers
    patterns: Patterns
    credential: Credential
    # What every request with a given key carries besides its credential, built once: the
    # provider's and the key's configured headers, and identity encoding.
    key_headers: Mapping[str, tuple[tuple[str, str], ...]]

    def statuses(self) -> Iterator[KeyStatus]:
        """The rows of /keys and keymux_key_state: every key's health, a saturation in place of
        a usable row of the same (key, scope), then the other saturations."""
        saturated = {(status.key, status.scope): status for status in self.capacity.statuses()}
        for status in self.health.statuses():
            instead = saturated.pop((status.key, status.scope), None)
            yield instead if instead is not None and status.until is None else status
        yield from saturated.values()

    def headers_for(self, key: Key, method: str, url: str, body: bytes) -> tuple[tuple[str, str], ...]:
        """Everything a request made with `key` adds to the app's headers."""
        return self.key_headers[key.name] + self.credential.headers(key, method, url, body)


class Runtime:
    def __init__(self, config: Config, clock: Clock, previous: Runtime | None = None) -> None:
        self.config = config
        self.clock = clock
        # Which key made which resource outlives a reload: the resources still exist upstream.
        self.affinity: Affinity = previous.affinity if previous is not None else Affinity(clock)
        self.redact = Redactor(config.secrets())
        self.providers: dict[str, Provider] = {}
        for name, pc in config.providers.items():
            self.providers[name] = self._provider(pc, previous.providers.get(name) if previous else None)
        self.routes: tuple[tuple[Route, tuple[Provider, ...]], ...] = tuple(
            (route, tuple(self.providers[n] for n in route.providers)) for route in config.routes
        )
        timeouts = config.timeouts
        self.client_timeout = aiohttp.ClientTimeout(
            total=timeouts.total, sock_connect=timeouts.connect, sock_read=timeouts.response_headers
        )
        self.known_models = {m for pc in config.providers.values() for k in pc.keys for m in k.models or ()}
        self._urls: dict[str, URL] = {}  # upstream URLs already parsed, by text
        # The app's request headers never forwarded: hop-by-hop, its credentials, its encoding
        # wishes (bodies are read), an Expect keymux answered itself and the sidecar's own token.
        own = {"accept-encoding", "expect", config.security.inbound_header}
        self.drop_headers = HOP_BY_HOP_HEADERS | APP_CREDENTIAL_HEADERS | own

    def _provider(self, pc: ProviderConfig, old: Provider | None) -> Provider:
        spec = PROVIDERS[pc.type]
        settings = self.config.health
        health = LocalHealth([key.name for key in pc.keys], settings, self.clock)
        report = REPORTS.get(spec.rate_limits) if spec.rate_limits else None
        capacity = Capacity(pc.keys, self.clock, settings.max_models, reported=report is not None)
        selector = WeightedRoundRobin(pc.keys, health, capacity, settings.max_models)
        if old is not None:
            before = {(k.name, k.secret) for k in old.config.keys}
            unchanged = {k.name for k in pc.keys if (k.name, k.secret) in before}
            health.adopt(old.health, unchanged)
            capacity.adopt(old.capacity, unchanged)
            selector.adopt(old.selector)
        key_headers = {key.name: (*pc.headers, *key.headers, _IDENTITY) for key in pc.keys}
        credential = spec.credential(pc.keys, self.redact.learn)
        return Provider(
            pc.name, pc, spec, selector, health, capacity, report, Patterns(pc.patterns), credential, key_headers
        )

    def url(self, text: str) -> URL:
        """The upstream URL for `text` (a base_url and a checked path), parsed once."""
        url = self._urls.get(text)
        if url is None:
            if len(self._urls) >= _MAX_URLS:  # paths the app sends are few; a flood of new ones starts over
                self._urls.clear()
            url = self._urls[text] = URL(text, encoded=True)
        return url

    def route_for(self, path: str) -> tuple[Route, tuple[Provider, ...]] | None:
        for route, providers in self.routes:
            if route.matches(path):
                return route, providers
        return None

    def usable_keys(self) -> int:
        """Keys not disabled for every model: readiness needs at least one."""
        count = 0
        for provider in self.providers.values():
            disabled = {s.key for s in provider.health.statuses() if s.scope is ALL_MODELS and s.until is not None}
            count += len(provider.config.keys) - len(disabled)
        return count
