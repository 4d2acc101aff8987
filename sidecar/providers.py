"""The provider table: every per-provider quirk keymux knows, in one place.

How a key is injected, where the model is found, what an error looks like and which body
patterns mean an invalid key, a model-access problem or a rate limit. Users extend the
patterns per provider in YAML (`providers.NAME.patterns`); nothing here does I/O.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import brotli  # type: ignore[import-untyped]

from sidecar.keys import Key

# Whatever credential the app sent is removed before forwarding (it is a placeholder at best,
# and a real key of the app's at worst).
APP_CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key", "api-key", "x-goog-api-key"})
APP_CREDENTIAL_QUERY = frozenset({"key", "api-key", "api_key"})
HOP_BY_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)

PatternSet = dict[str, tuple[str, ...]]

# Case-insensitive substrings, matched against the bounded prefix of an error body.
COMMON_PATTERNS: PatternSet = {
    "credential": (
        "invalid_api_key",
        "invalid api key",
        "incorrect api key",
        "authentication_error",
        "authentication fails",
        "api key not valid",
        "api_key_invalid",
        "api key expired",
        "invalid x-api-key",
        "invalid subscription key",
        "invalid api token",
        "no auth credentials",
        "reported as leaked",
    ),
    "model_access": (
        "model_not_found",
        "does not exist or you do not have access",
        "do not have access to",
        "deploymentnotfound",
        "permission_error",
    ),
    "rate_limit": ("rate_limit", "rate limit", "resource_exhausted", "too many requests"),
    # Out of credit for the whole account: a long, key-wide cooldown, not a short per-model one.
    "quota": ("insufficient_quota", "billing_hard_limit", "credit balance is too low"),
    # The provider as a whole is overloaded: another key of it will not help.
    "overloaded": ("overloaded_error",),
}
PATTERN_KINDS = tuple(COMMON_PATTERNS)


_MODEL_KEY = b'"model"'
_MODEL_STRING = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.)*)"')


def model_from_json(path: str, body: bytes) -> str | None:
    """The top-level "model" of a JSON body, without parsing a long prompt when it can.

    In JSON an unescaped `"model"` is a key or the string value "model". When it occurs once
    and is followed by a string value, that is the request's model (a request body always
    has a top-level model, so a single occurrence is it); otherwise the body is parsed.
    """
    if not body:
        return None
    if body.count(_MODEL_KEY) == 1 and (match := _MODEL_STRING.search(body)) is not None:
        raw = match.group(1)
        try:
            return raw.decode() if b"\\" not in raw else json.loads(b'"' + raw + b'"')
        except ValueError:  # UnicodeDecodeError included
            return None
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    model = parsed.get("model") if isinstance(parsed, dict) else None
    return model if isinstance(model, str) else None


_BOUNDARY = re.compile(r'boundary="?([^";,\s]+)"?', re.IGNORECASE)
_MODEL_FIELD = re.compile(rb'\bname="?model"?(?:;|\r|$)', re.IGNORECASE)


def model_from_multipart(content_type: str, body: bytes) -> str | None:
    """The `model` field of a multipart/form-data body (transcriptions, translations, image edits).

    Walks the part headers only; a file part's bytes are skipped, never parsed or copied.
    """
    match = _BOUNDARY.search(content_type)
    if match is None:
        return None
    delimiter = b"--" + match.group(1).encode("latin-1")
    at = body.find(delimiter)
    while at != -1:
        head_start = at + len(delimiter)
        head_end = body.find(b"\r\n\r\n", head_start)
        if head_end == -1:
            return None
        following = body.find(b"\r\n" + delimiter, head_end)
        if _MODEL_FIELD.search(body, head_start, head_end):
            value = body[head_end + 4 : following if following != -1 else len(body)]
            try:
                return value.decode() if len(value) <= 1024 else None
            except UnicodeDecodeError:
                return None
        if following == -1:
            return None
        at = following + 2
    return None


def model_from_body(path: str, body: bytes, content_type: str = "") -> str | None:
    """The model a request body names: a JSON body's `model`, or a multipart form's field."""
    if content_type[:19].lower() == "multipart/form-data":
        return model_from_multipart(content_type, body)
    return model_from_json(path, body)


MODEL_PREFIX_BYTES = 1024 * 1024  # of an encoded request body, decoded only to find the model


def decoded_prefix(content_encoding: str, body: bytes, limit: int = MODEL_PREFIX_BYTES) -> bytes:
    """At most `limit` bytes of an encoded request body, decoded; b"" when it cannot be.

    The body itself is forwarded as it came, with its Content-Encoding: this is only read.
    """
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity"):
        return body[:limit]
    if encoding in ("gzip", "x-gzip", "deflate"):
        wbits = zlib.MAX_WBITS | 32  # gzip or zlib, told apart by the header
        for bits in (wbits, -zlib.MAX_WBITS):  # deflate is sometimes sent raw, without zlib's header
            try:
                return zlib.decompressobj(bits).decompress(body, limit)
            except zlib.error:
                continue
        return b""
    if encoding == "br":
        try:
            return bytes(brotli.Decompressor().process(body, output_buffer_limit=limit)[:limit])
        except brotli.error:
            return b""
    return b""


_GEMINI_MODEL = re.compile(r"/(?:tunedModels|models)/([^/:]+):")
_AZURE_DEPLOYMENT = re.compile(r"/deployments/([^/]+)")


ModelFinder = Callable[[str, bytes, str], str | None]  # (upstream path, body, content type) -> model


def _model_from_path(pattern: re.Pattern[str]) -> ModelFinder:
    def find(path: str, body: bytes, content_type: str = "") -> str | None:
        match = pattern.search(path)
        return match.group(1) if match else None

    return find


def _azure_model(path: str, body: bytes, content_type: str = "") -> str | None:
    """The deployment of the classic path; on the v1 path (`/openai/v1/...`) the body's model."""
    match = _AZURE_DEPLOYMENT.search(path)
    return match.group(1) if match else model_from_body(path, body, content_type)


def _openai_error(status: int, code: str, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": code, "param": None, "code": code}}


_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def _anthropic_error(status: int, code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}


_GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    504: "DEADLINE_EXCEEDED",
}


def _gemini_error(status: int, code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": status, "message": message, "status": _GOOGLE_STATUS.get(status, "UNAVAILABLE")}}


class Credential(Protocol):
    """How one provider's keys authenticate a request: a step run for every attempt.

    It sees the request as it will be sent (a signature such as AWS SigV4 needs the method,
    URL, body and time; a token exchange needs the key), and returns the headers to add.
    Every secret value it produces is passed to the `learn` callback it was built with, so the
    redactor masks it wherever it might be echoed.
    """

    def headers(self, key: Key, method: str, url: str, body: bytes) -> tuple[tuple[str, str], ...]: ...


Learn = Callable[[str], None]
CredentialFactory = Callable[[Sequence[Key], Learn], Credential]


class HeaderCredential:
    """The key itself in one header, with an optional prefix: every provider type today."""

    def __init__(self, header: str, prefix: str, keys: Sequence[Key], learn: Learn) -> None:
        self._headers = {key.name: ((header, prefix + key.secret),) for key in keys}
        for key in keys:
            learn(key.secret)

    def headers(self, key: Key, method: str, url: str, body: bytes) -> tuple[tuple[str, str], ...]:
        return self._headers[key.name]


def header_credential(header: str, prefix: str = "") -> CredentialFactory:
    return lambda keys, learn: HeaderCredential(header, prefix, keys, learn)


@dataclass(frozen=True)
class ProviderSpec:
    """What keymux knows about one provider type."""

    type: str
    credential: CredentialFactory
    credential_header: str  # where the key goes, for the README's provider table and the docs
    model_location: str  # "body", "path" (Gemini models/{model}:…) or "deployment" (Azure)
    find_model: ModelFinder
    error_body: Callable[[int, str, str], dict[str, Any]]
    # What the last event of a complete stream holds: an app that closes the connection after
    # it has the whole answer (the openai SDK closes at `data: [DONE]`).
    terminal_events: tuple[bytes, ...]
    default_headers: tuple[tuple[str, str], ...] = ()
    stream_errors: bool = False  # errors may arrive as the first event of a 200 SSE stream
    rate_limits: str | None = None  # the family of rate-limit headers on its answers (capacity.REPORTS)

    def error_json(self, status: int, code: str, message: str) -> bytes:
        return json.dumps(self.error_body(status, code, message)).encode()

    def ends_stream(self, tail: bytes) -> bool:
        """Whether `tail`, the last bytes forwarded, holds this provider's terminal event."""
        return any(marker in tail for marker in self.terminal_events)


_OPENAI_TERMINAL = (b"data: [DONE]", b"event: response.completed", b"event: response.incomplete")
_ANTHROPIC_TERMINAL = (b"event: message_stop",)
_GEMINI_TERMINAL = (b'"finishReason"',)


def _spec(
    type_: str,
    header: str,
    prefix: str,
    location: str,
    error: Callable[[int, str, str], dict[str, Any]],
    terminal: tuple[bytes, ...],
    **extra: Any,
) -> ProviderSpec:
    finder = {
        "body": model_from_body,
        "path": _model_from_path(_GEMINI_MODEL),
        "deployment": _azure_model,
    }[location]
    return ProviderSpec(type_, header_credential(header, prefix), header, location, finder, error, terminal, **extra)


PROVIDERS: dict[str, ProviderSpec] = {
    "openai": _spec(
        "openai", "authorization", "Bearer ", "body", _openai_error, _OPENAI_TERMINAL, rate_limits="openai"
    ),
    "openai-compatible": _spec(
        "openai-compatible", "authorization", "Bearer ", "body", _openai_error, _OPENAI_TERMINAL, rate_limits="openai"
    ),
    "anthropic": _spec(
        "anthropic",
        "x-api-key",
        "",
        "body",
        _anthropic_error,
        _ANTHROPIC_TERMINAL,
        default_headers=(("anthropic-version", "2023-06-01"),),
        stream_errors=True,
        rate_limits="anthropic",
    ),
    "gemini": _spec("gemini", "x-goog-api-key", "", "path", _gemini_error, _GEMINI_TERMINAL),
    "azure": _spec("azure", "api-key", "", "deployment", _openai_error, _OPENAI_TERMINAL, rate_limits="openai"),
}
PROVIDER_TYPES = tuple(PROVIDERS)
# Anthropic's 529 is the provider being overloaded, whichever key asked.
OVERLOADED_STATUSES = frozenset({529})
