"""The one list of request outcomes, shared by classification, health, metrics, logs and docs."""

from __future__ import annotations

import enum


class Outcome(enum.StrEnum):
    SUCCESS = "success"
    CLIENT_ERROR = "client_error"  # the app's own mistake: answered unchanged, no penalty
    CREDENTIAL_ERROR = "credential_error"  # the key is invalid: disabled for every model
    PERMISSION_ERROR = "permission_error"  # the key may not use this model
    RATE_LIMITED = "rate_limited"
    UPSTREAM_ERROR = "upstream_error"  # 5xx
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"
    NO_KEY_AVAILABLE = "no_key_available"
    CLIENT_DISCONNECTED = "client_disconnected"

    @property
    def retryable(self) -> bool:
        """Whether another key may succeed where this attempt failed."""
        return self in _RETRYABLE


_RETRYABLE = frozenset(
    {
        Outcome.CREDENTIAL_ERROR,
        Outcome.PERMISSION_ERROR,
        Outcome.RATE_LIMITED,
        Outcome.UPSTREAM_ERROR,
        Outcome.TIMEOUT,
        Outcome.CONNECTION_ERROR,
    }
)
