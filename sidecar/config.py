"""Configuration: YAML plus environment, validated once at load into frozen dataclasses.

Pure: the environment and the file reader are passed in. Every error names the field path
(`providers.openai.keys[1].key`) and what to do about it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import yaml

from sidecar.classify import parse_duration
from sidecar.health import HealthSettings
from sidecar.keys import Key
from sidecar.providers import PATTERN_KINDS, PROVIDER_TYPES, PatternSet

ReadFile = Callable[[str], str]


class ConfigError(ValueError):
    """A config problem, with the field path it concerns."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class ProviderConfig:
    name: str
    type: str
    base_url: str
    keys: tuple[Key, ...]
    patterns: PatternSet = field(default_factory=dict)
    headers: tuple[tuple[str, str], ...] = ()
    key_files: tuple[str, ...] = ()
    affinity: bool = True  # send requests naming a resource to the key that created it


@dataclass(frozen=True)
class Route:
    prefix: str  # "" for the catch-all route "/"
    providers: tuple[str, ...]

    def matches(self, path: str) -> bool:
        prefix = self.prefix
        return path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/")


@dataclass(frozen=True)
class RetryConfig:
    max_attempts: int = 5  # upstream attempts per request, over all keys and providers
    budget: float = 60.0  # no new attempt starts this long after the request arrived
    max_wait: float = 2.0  # how long a request may wait for a saturated or rate-limited key (0: never)


@dataclass(frozen=True)
class TimeoutConfig:
    connect: float = 10.0
    response_headers: float = 300.0  # a non-streaming completion answers only when it is done
    idle: float = 120.0  # the longest gap between two chunks of a response body
    total: float = 900.0


@dataclass(frozen=True)
class LimitsConfig:
    max_body_bytes: int = 512 * 1024 * 1024  # what providers accept for a file upload
    memory_body_bytes: int = 1024 * 1024  # larger request bodies are spooled to spool_dir
    error_body_bytes: int = 64 * 1024  # the prefix of an error body read to classify it
    spool_dir: str | None = None  # None: the system's temporary directory


@dataclass(frozen=True)
class SharedConfig:
    """The optional `shared:` section: a Redis the fleet's pods share key health through."""

    redis_url: str = field(repr=False)  # redis://, rediss:// (TLS) or unix://; may hold a password
    password: str | None = field(default=None, repr=False)  # from password_env or password_file
    namespace: str = "keymux"  # the prefix of every Redis key and channel
    timeout: float = 0.25  # every Redis call; past it the pod serves from what it knows
    connect_timeout: float = 1.0
    resync_interval: float = 5.0  # a full read of the fleet's state, for messages a pod missed
    queue_size: int = 10_000  # what a pod learned, waiting to be written; overflow is counted and dropped
    probe_lease: float = 30.0  # one pod probes a key whose rest ended; the others wait this long at most
    cluster: bool = False  # redis_url names a node of a Redis Cluster

    def secrets(self) -> set[str]:
        found = {self.password} if self.password else set()
        password = urlsplit(self.redis_url).password
        if password:
            found.add(password)
        return found


@dataclass(frozen=True)
class MetricsConfig:
    max_models: int = 100  # distinct model label values before the rest count as "other"


@dataclass(frozen=True)
class ShutdownConfig:
    drain_delay: float = 5.0  # after SIGTERM, keep accepting new requests this long
    drain_timeout: float = 30.0  # then wait this long for requests in flight


@dataclass(frozen=True)
class SecurityConfig:
    inbound_token: str | None = field(default=None, repr=False)  # the app must present it when set
    inbound_header: str = "x-keymux-token"  # where; "Bearer " is accepted before the token


@dataclass(frozen=True)
class Config:
    providers: Mapping[str, ProviderConfig]
    routes: tuple[Route, ...]
    listen: tuple[str, int] = ("127.0.0.1", 4000)
    admin_listen: tuple[str, int] = ("0.0.0.0", 9464)
    log_level: str = "info"
    health: HealthSettings = field(default_factory=HealthSettings)
    retry: RetryConfig = RetryConfig()
    timeouts: TimeoutConfig = TimeoutConfig()
    limits: LimitsConfig = LimitsConfig()
    metrics: MetricsConfig = MetricsConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    security: SecurityConfig = SecurityConfig()
    shared: SharedConfig | None = None  # None: this pod keeps its own state, the embedded default
    warnings: tuple[str, ...] = ()

    def secrets(self) -> set[str]:
        secrets = {key.secret for provider in self.providers.values() for key in provider.keys}
        if self.security.inbound_token:
            secrets.add(self.security.inbound_token)
        if self.shared is not None:
            secrets |= self.shared.secrets()
        return secrets

    def key_files(self) -> set[str]:
        return {path for provider in self.providers.values() for path in provider.key_files}


# -- loading -----------------------------------------------------------------------------------

LOG_LEVELS = ("debug", "info", "warning", "error")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_OPTIONAL = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-\}")  # a key written as ${VAR:-}
_TOP_FIELDS = (
    "listen",
    "admin_listen",
    "log_level",
    "providers",
    "routes",
    "health",
    "retry",
    "timeouts",
    "limits",
    "metrics",
    "shutdown",
    "shared",
    "security",
)
_PROVIDER_FIELDS = ("type", "base_url", "keys", "keys_from_env", "patterns", "headers", "affinity")
_KEY_FIELDS = ("name", "key", "key_file", "models", "headers", "weight", "rpm", "tpm")


def load_config(text: str, env: Mapping[str, str], read_file: ReadFile) -> Config:
    """Parse and validate a config. Raises ConfigError naming the field path."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError("", f"not valid YAML{where}") from None
    raw = {} if raw is None else raw
    _mapping(raw, "", _TOP_FIELDS)
    loader = _Loader(env, read_file)
    providers = loader.providers(raw.get("providers"))
    return Config(
        providers=providers,
        routes=_routes(raw.get("routes"), providers),
        listen=_address(raw.get("listen", "127.0.0.1:4000"), "listen"),
        admin_listen=_address(raw.get("admin_listen", "0.0.0.0:9464"), "admin_listen"),
        log_level=_choice(raw.get("log_level", "info"), "log_level", LOG_LEVELS),
        health=_section(raw, "health", HealthSettings),
        retry=_section(raw, "retry", RetryConfig),
        timeouts=_section(raw, "timeouts", TimeoutConfig),
        limits=_section(raw, "limits", LimitsConfig),
        metrics=_section(raw, "metrics", MetricsConfig),
        shutdown=_section(raw, "shutdown", ShutdownConfig),
        security=loader.security(raw.get("security")),
        shared=loader.shared(raw.get("shared")),
        warnings=tuple(loader.warnings),
    )


class _Loader:
    def __init__(self, env: Mapping[str, str], read_file: ReadFile) -> None:
        self.env = env
        self.read_file = read_file
        self.warnings: list[str] = []

    def interpolate(self, value: Any, path: str) -> str:
        """Expand ${VAR} and ${VAR:-default} in a string scalar."""
        if not isinstance(value, str):
            raise ConfigError(path, f"must be a string, got {_kind(value)}")

        def expand(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            found = self.env.get(name)
            if found:
                return found
            if default is not None:
                return default
            raise ConfigError(path, f"environment variable {name} is not set")

        return _VAR.sub(expand, value)

    def providers(self, raw: Any) -> dict[str, ProviderConfig]:
        if not raw:
            raise ConfigError("providers", "at least one provider is required")
        _mapping(raw, "providers")
        providers = {}
        for name, body in raw.items():
            path = f"providers.{name}"
            if not isinstance(name, str) or not _NAME.match(name):
                raise ConfigError(path, "provider names use letters, digits, '.', '_' and '-'")
            providers[name] = self.provider(name, body, path)
        return providers

    def provider(self, name: str, raw: Any, path: str) -> ProviderConfig:
        _mapping(raw, path, _PROVIDER_FIELDS)
        type_ = _choice(raw.get("type", name), f"{path}.type", PROVIDER_TYPES)
        if "base_url" not in raw:
            raise ConfigError(f"{path}.base_url", "is required")
        base_url = _base_url(self.interpolate(raw["base_url"], f"{path}.base_url"), f"{path}.base_url")
        keys, key_files = self.keys(name, raw, path)
        return ProviderConfig(
            name=name,
            type=type_,
            base_url=base_url,
            keys=keys,
            patterns=_patterns(raw.get("patterns"), f"{path}.patterns"),
            headers=self.headers(raw.get("headers"), f"{path}.headers"),
            key_files=key_files,
            affinity=_flag(raw.get("affinity", True), f"{path}.affinity"),
        )

    def keys(self, provider: str, raw: Mapping[str, Any], path: str) -> tuple[tuple[Key, ...], tuple[str, ...]]:
        keys: list[Key] = []
        files: list[str] = []
        entries = raw.get("keys") or []
        if not isinstance(entries, list):
            raise ConfigError(f"{path}.keys", f"must be a list, got {_kind(entries)}")
        for i, entry in enumerate(entries):
            key, file = self.key(provider, entry, f"{path}.keys[{i}]", i)
            if key is not None:
                keys.append(key)
            if file is not None:
                files.append(file)
        keys.extend(self.env_keys(provider, raw.get("keys_from_env"), f"{path}.keys_from_env", len(keys)))
        _check_key_names(keys, path)
        if not keys:
            self.warnings.append(f"{path}: no keys are configured, so this provider serves no request")
        return tuple(keys), tuple(files)

    def key(self, provider: str, raw: Any, path: str, index: int) -> tuple[Key | None, str | None]:
        _mapping(raw, path, _KEY_FIELDS)
        name = raw.get("name", f"{provider}-{index + 1}")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"{path}.name", "key names use letters, digits, '.', '_' and '-' (64 at most)")
        if ("key" in raw) == ("key_file" in raw):
            raise ConfigError(path, "give exactly one of 'key' and 'key_file'")
        file = None
        if "key" in raw:
            template = raw["key"]
            secret = self.interpolate(template, f"{path}.key").strip()
            if not secret and isinstance(template, str) and _OPTIONAL.fullmatch(template.strip()):
                self.warnings.append(f"{path}: skipped, its ${{VAR:-}} is empty")
                return None, None
        else:
            file = self.interpolate(raw["key_file"], f"{path}.key_file")
            secret = self.secret_file(file, f"{path}.key_file")
        if not secret:
            raise ConfigError(f"{path}.key", "is empty")
        _check_secret(secret, f"{path}.key")
        models = raw.get("models")
        if models is not None:
            if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
                raise ConfigError(f"{path}.models", "must be a non-empty list of model names")
            models = frozenset(models)
        headers = self.headers(raw.get("headers"), f"{path}.headers")
        weight = raw.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight < math.inf:
            raise ConfigError(f"{path}.weight", "must be a positive number")
        rpm, tpm = (int(_number(raw[f], f"{path}.{f}", integer=True)) if f in raw else None for f in ("rpm", "tpm"))
        key = Key(name, secret, models, headers, float(weight), rpm, tpm)
        return key, file

    def secret_file(self, file: str, path: str) -> str:
        try:
            return self.read_file(file).strip()
        except OSError as exc:
            raise ConfigError(path, f"cannot read {file}: {exc.strerror or exc}") from None

    def env_keys(self, provider: str, var: Any, path: str, start: int) -> list[Key]:
        if var is None:
            return []
        if not isinstance(var, str) or not var:
            raise ConfigError(path, "must name an environment variable")
        value = self.env.get(var, "")
        if not value.strip():
            self.warnings.append(f"{path}: environment variable {var} is not set or empty")
            return []
        keys = []
        for i, secret in enumerate(s.strip() for s in value.split(",")):
            if not secret:
                raise ConfigError(path, f"{var} has an empty entry at position {i + 1}")
            _check_secret(secret, f"{path} ({var} entry {i + 1})")
            keys.append(Key(f"{provider}-{start + i + 1}", secret))
        return keys

    def security(self, raw: Any) -> SecurityConfig:
        if raw is None:
            return SecurityConfig()
        _mapping(raw, "security", ("inbound_token", "inbound_header"))
        token = None
        if "inbound_token" in raw:
            token = self.interpolate(raw["inbound_token"], "security.inbound_token").strip()
            if len(token) < 16:
                raise ConfigError("security.inbound_token", "must be at least 16 characters")
            _check_secret(token, "security.inbound_token")
        header = raw.get("inbound_header", SecurityConfig.inbound_header)
        if not isinstance(header, str) or not re.fullmatch(r"[A-Za-z0-9-]+", header):
            raise ConfigError("security.inbound_header", "is not a valid header name")
        return SecurityConfig(token, header.lower())

    def shared(self, raw: Any) -> SharedConfig | None:
        if raw is None:
            return None
        numbers = ("timeout", "connect_timeout", "resync_interval", "queue_size", "probe_lease")
        _mapping(raw, "shared", ("redis_url", "namespace", "password_env", "password_file", "cluster", *numbers))
        cluster = raw.get("cluster", False)
        if not isinstance(cluster, bool):
            raise ConfigError("shared.cluster", "must be true or false")
        if "redis_url" not in raw:
            raise ConfigError("shared.redis_url", "is required (redis://, rediss:// or unix://)")
        url = self.interpolate(raw["redis_url"], "shared.redis_url").strip()
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
            raise ConfigError("shared.redis_url", "must be a redis://, rediss:// or unix:// URL")
        password = None
        if "password_env" in raw and "password_file" in raw:
            raise ConfigError("shared", "give at most one of 'password_env' and 'password_file'")
        if "password_env" in raw:
            var = raw["password_env"]
            if not isinstance(var, str) or not self.env.get(var, "").strip():
                raise ConfigError("shared.password_env", f"environment variable {var} is not set")
            password = self.env[var].strip()
        elif "password_file" in raw:
            path = self.interpolate(raw["password_file"], "shared.password_file")
            password = self.secret_file(path, "shared.password_file")
        namespace = raw.get("namespace", "keymux")
        if not isinstance(namespace, str) or not _NAME.match(namespace):
            raise ConfigError("shared.namespace", "uses letters, digits, '.', '_' and '-' (64 at most)")
        defaults = SharedConfig(redis_url=url)
        values: dict[str, Any] = {
            name: _number(raw[name], f"shared.{name}", integer=isinstance(getattr(defaults, name), int))
            for name in numbers
            if name in raw
        }
        return replace(defaults, password=password, namespace=namespace, cluster=cluster, **values)

    def headers(self, raw: Any, path: str) -> tuple[tuple[str, str], ...]:
        if raw is None:
            return ()
        _mapping(raw, path)
        headers = []
        for name, value in raw.items():
            text = self.interpolate(value, f"{path}.{name}")
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9-]+", name):
                raise ConfigError(f"{path}.{name}", "is not a valid header name")
            if "\r" in text or "\n" in text:
                raise ConfigError(f"{path}.{name}", "header values cannot hold line breaks")
            headers.append((name.lower(), text))
        return tuple(headers)


def _check_secret(secret: str, path: str) -> None:
    if any(ch in secret for ch in "\r\n\t ") or not secret.isprintable():
        raise ConfigError(path, "contains whitespace or control characters")


def _check_key_names(keys: list[Key], path: str) -> None:
    seen: set[str] = set()
    for key in keys:
        if key.name in seen:
            raise ConfigError(f"{path}.keys", f"duplicate key name '{key.name}'")
        seen.add(key.name)
        if key.name == key.secret or (len(key.secret) >= 8 and key.secret in key.name):
            raise ConfigError(f"{path}.keys", "a key name must not contain its secret")


def _routes(raw: Any, providers: Mapping[str, ProviderConfig]) -> tuple[Route, ...]:
    if raw is None:
        if len(providers) == 1:
            return (Route("", tuple(providers)),)
        return tuple(Route(f"/{name}", (name,)) for name in providers)
    if not isinstance(raw, list) or not raw:
        raise ConfigError("routes", "must be a non-empty list")
    routes = []
    seen = set()
    for i, entry in enumerate(raw):
        path = f"routes[{i}]"
        _mapping(entry, path, ("prefix", "providers"))
        prefix = entry.get("prefix")
        if not isinstance(prefix, str) or not prefix.startswith("/") or ".." in prefix:
            raise ConfigError(f"{path}.prefix", "must be a path starting with '/'")
        prefix = prefix.rstrip("/")
        if prefix in seen:
            raise ConfigError(f"{path}.prefix", f"duplicate route prefix '{prefix or '/'}'")
        seen.add(prefix)
        names = entry.get("providers")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"{path}.providers", "must be a non-empty list of provider names")
        for j, name in enumerate(names):
            if name not in providers:
                known = ", ".join(sorted(providers))
                raise ConfigError(f"{path}.providers[{j}]", f"unknown provider '{name}' (known: {known})")
        routes.append(Route(prefix, tuple(names)))
    # Longest prefix first, so /openai/v2 wins over /openai.
    return tuple(sorted(routes, key=lambda r: len(r.prefix), reverse=True))


def _section(raw: Mapping[str, Any], name: str, cls: type[Any]) -> Any:
    body = raw.get(name)
    if body is None:
        return cls()
    defaults = cls()
    fields = tuple(defaults.__dataclass_fields__)
    _mapping(body, name, fields)
    values: dict[str, Any] = {}
    for key, value in body.items():
        default = getattr(defaults, key)
        path = f"{name}.{key}"
        if path in _DIRECTORIES:
            values[key] = _directory(value, path)
            continue
        values[key] = _number(value, path, integer=isinstance(default, int), zero_ok=path in _ZERO_OK)
    return cls(**values)


_ZERO_OK = frozenset({"shutdown.drain_delay", "retry.max_wait"})  # a native sidecar needs no delay
_DIRECTORIES = frozenset({"limits.spool_dir"})


def _directory(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ConfigError(path, "must be an absolute directory path (an emptyDir volume in Kubernetes)")
    return value


def _number(value: Any, path: str, integer: bool, zero_ok: bool = False) -> float | int:
    if isinstance(value, bool):
        raise ConfigError(path, "must be a number")
    if integer:
        if not isinstance(value, int) or value < 1:
            raise ConfigError(path, "must be a whole number of at least 1")
        return value
    if isinstance(value, str):
        seconds = parse_duration(value)
        if seconds is None:
            raise ConfigError(path, f"'{value}' is not a duration (seconds, or like 500ms, 30s, 10m, 1h)")
        value = seconds
    if not isinstance(value, int | float) or value != value or value == float("inf") or value < 0:
        raise ConfigError(path, "must be a positive number of seconds")
    if value == 0 and not zero_ok:
        raise ConfigError(path, "must be a positive number of seconds")
    return float(value)


def _mapping(raw: Any, path: str, allowed: tuple[str, ...] | None = None) -> None:
    if not isinstance(raw, dict):
        raise ConfigError(path or "(top level)", f"must be a mapping, got {_kind(raw)}")
    if allowed is None:
        return
    for key in raw:
        if key not in allowed:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(where, f"unknown field (expected one of: {', '.join(allowed)})")


def _flag(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(path, "must be true or false")
    return value


def _choice(value: Any, path: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(path, f"'{value}' is not one of: {', '.join(choices)}")
    return str(value)


def _address(value: Any, path: str) -> tuple[str, int]:
    text = str(value)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise ConfigError(path, f"'{text}' is not HOST:PORT")
    return host.strip("[]"), int(port)


def _base_url(value: str, path: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(path, f"'{value}' is not an http(s) URL")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(path, "must not hold a query, fragment or credentials")
    return value.rstrip("/")


def _patterns(raw: Any, path: str) -> PatternSet:
    if raw is None:
        return {}
    _mapping(raw, path, PATTERN_KINDS)
    patterns = {}
    for kind, values in raw.items():
        if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
            raise ConfigError(f"{path}.{kind}", "must be a list of non-empty strings")
        patterns[kind] = tuple(values)
    return patterns


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing"}.get(
        type(value), type(value).__name__
    )
