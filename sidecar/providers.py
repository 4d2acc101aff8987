"""The provider table: every per-provider quirk keymux knows, in one place.

How a key is injected, where the model is found, what an error looks like and which body
patterns mean an invalid key, a model-access problem or a rate limit. Users extend the
patterns per provider in YAML (`providers.NAME.patterns`); nothing here does I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


_GEMINI_MODEL = re.compile(r"/(?:tunedModels|models)/([^/:]+):")
_AZURE_DEPLOYMENT = re.compile(r"/deployments/([^/]+)")


def _model_from_path(pattern: re.Pattern[str]) -> Callable[[str, bytes], str | None]:
    def find(path: str, body: bytes) -> str | None:
        match = pattern.search(path)
        return match.group(1) if match else None

    return find


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


@dataclass(frozen=True)
class ProviderSpec:
    """What keymux knows about one provider type."""

    type: str
    auth_header: str
    auth_prefix: str
    model_location: str  # "body", "path" (Gemini models/{model}:…) or "deployment" (Azure)
    find_model: Callable[[str, bytes], str | None]  # (upstream path, request body) -> model
    error_body: Callable[[int, str, str], dict[str, Any]]
    default_headers: tuple[tuple[str, str], ...] = ()
    stream_errors: bool = False  # errors may arrive as the first event of a 200 SSE stream

    def auth_value(self, secret: str) -> str:
        return self.auth_prefix + secret

    def error_json(self, status: int, code: str, message: str) -> bytes:
        return json.dumps(self.error_body(status, code, message)).encode()


def _spec(
    type_: str, header: str, prefix: str, location: str, error: Callable[[int, str, str], dict[str, Any]], **extra: Any
) -> ProviderSpec:
    finder = {
        "body": model_from_json,
        "path": _model_from_path(_GEMINI_MODEL),
        "deployment": _model_from_path(_AZURE_DEPLOYMENT),
    }[location]
    return ProviderSpec(type_, header, prefix, location, finder, error, **extra)


PROVIDERS: dict[str, ProviderSpec] = {
    "openai": _spec("openai", "authorization", "Bearer ", "body", _openai_error),
    "openai-compatible": _spec("openai-compatible", "authorization", "Bearer ", "body", _openai_error),
    "anthropic": _spec(
        "anthropic",
        "x-api-key",
        "",
        "body",
        _anthropic_error,
        default_headers=(("anthropic-version", "2023-06-01"),),
        stream_errors=True,
    ),
    "gemini": _spec("gemini", "x-goog-api-key", "", "path", _gemini_error),
    "azure": _spec("azure", "api-key", "", "deployment", _openai_error),
}
PROVIDER_TYPES = tuple(PROVIDERS)
# Anthropic's 529 is the provider being overloaded, whichever key asked.
OVERLOADED_STATUSES = frozenset({529})
