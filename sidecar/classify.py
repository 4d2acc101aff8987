"""Response classification: what an upstream answer says about the key that got it.

Pure functions over status, headers and a bounded body prefix; the wall clock is passed in.
"""

from __future__ import annotations

import email.utils
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from sidecar.outcome import Outcome
from sidecar.providers import COMMON_PATTERNS, OVERLOADED_STATUSES, PATTERN_KINDS, PatternSet


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    retry_after: float | None = None  # seconds the provider asked us to wait
    key_wide: bool = False  # the failure concerns the key for every model
    provider_wide: bool = False  # the provider as a whole failed: no other key of it will help


SUCCESS = Verdict(Outcome.SUCCESS)
CLIENT_ERROR = Verdict(Outcome.CLIENT_ERROR)
DISCONNECTED = Verdict(Outcome.CLIENT_DISCONNECTED)  # the app went away: says nothing of the key


class Patterns:
    """Compiled case-insensitive body patterns, the provider defaults plus the user's."""

    def __init__(self, extra: PatternSet | None = None) -> None:
        extra = extra or {}
        self._compiled = {kind: _compile((*COMMON_PATTERNS[kind], *extra.get(kind, ()))) for kind in PATTERN_KINDS}

    def matches(self, kind: str, body: bytes) -> bool:
        pattern = self._compiled[kind]
        return pattern is not None and pattern.search(body) is not None


def _compile(needles: Iterable[str]) -> re.Pattern[bytes] | None:
    alternatives = [re.escape(n.encode()) for n in needles if n]
    return re.compile(b"|".join(alternatives), re.IGNORECASE) if alternatives else None


def classify(status: int, headers: Mapping[str, str], body: bytes, patterns: Patterns, now_wall: float) -> Verdict:
    """Classify one upstream answer. `body` is a bounded prefix of an error body."""
    if status < 400:
        return SUCCESS
    if status == 401 or patterns.matches("credential", body):
        return Verdict(Outcome.CREDENTIAL_ERROR, key_wide=True)
    if status in OVERLOADED_STATUSES or patterns.matches("overloaded", body):
        return Verdict(Outcome.UPSTREAM_ERROR, provider_wide=True)
    if status == 429 or (status < 500 and patterns.matches("rate_limit", body)):
        if patterns.matches("quota", body):
            return Verdict(Outcome.RATE_LIMITED, key_wide=True)
        return Verdict(Outcome.RATE_LIMITED, retry_after=retry_after_seconds(headers, now_wall))
    if status >= 500:
        return Verdict(Outcome.UPSTREAM_ERROR)
    if status == 403 or patterns.matches("model_access", body):
        return Verdict(Outcome.PERMISSION_ERROR)
    return CLIENT_ERROR


def transport_outcome(exc: BaseException) -> Outcome:
    """An attempt that got no answer: it timed out, or the connection failed or broke."""
    return Outcome.TIMEOUT if isinstance(exc, TimeoutError) else Outcome.CONNECTION_ERROR


def classify_stream_start(first_chunk: bytes, patterns: Patterns) -> Verdict:
    """A 200 stream whose first event is an error (Anthropic's `event: error`)."""
    if not first_chunk.startswith(b"event: error"):
        return SUCCESS
    verdict = classify(400, {}, first_chunk, patterns, 0.0)
    # The provider accepted the request, so an error it streams is never the app's mistake.
    return Verdict(Outcome.UPSTREAM_ERROR) if verdict.outcome is Outcome.CLIENT_ERROR else verdict


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|h|m|s))+")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(text: str) -> float | None:
    """Parse OpenAI's reset durations ('12ms', '6m0s', '1h2m3.5s'); None when malformed."""
    text = text.strip()
    if not _DURATION.fullmatch(text):
        return None
    return sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(text))


def _positive(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) and value > 0 else None


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text.strip())
    except ValueError:
        return None


def _seconds_until(text: str, now_wall: float) -> float | None:
    """An HTTP date or RFC 3339 time, as seconds from now."""
    text = text.strip()
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
    if when.tzinfo is None:
        return None
    return when.timestamp() - now_wall


def _reset_family(
    headers: Mapping[str, str], prefix: str, kinds: tuple[str, ...], parse: Callable[[str], float | None]
) -> float | None:
    """The reset to wait for among `{prefix}{remaining,reset}-{kind}` style headers.

    Prefer the resets of the limits that are exhausted (remaining 0); else the nearest one.
    """
    exhausted: list[float] = []
    others: list[float] = []
    for kind in kinds:
        raw = headers.get(prefix.format(field="reset", kind=kind))
        if raw is None:
            continue
        seconds = _positive(parse(raw))
        if seconds is None:
            continue
        remaining = _number(headers.get(prefix.format(field="remaining", kind=kind)))
        (exhausted if remaining == 0 else others).append(seconds)
    if exhausted:
        return max(exhausted)
    return min(others) if others else None


_OPENAI_KINDS = ("requests", "tokens")
_ANTHROPIC_KINDS = ("requests", "tokens", "input-tokens", "output-tokens")


def retry_after_seconds(headers: Mapping[str, str], now_wall: float) -> float | None:
    """How long the provider asked us to wait, from any of the rate-limit headers it uses.

    Garbage, negative and non-finite values are ignored (the caller applies its default);
    capping absurd values is the health policy's job.
    """
    for name in ("retry-after-ms", "x-ms-retry-after-ms"):
        ms = _positive(_number(headers.get(name)))
        if ms is not None:
            return ms / 1000.0
    raw = headers.get("retry-after")
    if raw is not None:
        seconds = _positive(_number(raw))
        if seconds is None and not raw.strip().lstrip("-").replace(".", "", 1).isdigit():
            seconds = _positive(_seconds_until(raw, now_wall))
        if seconds is not None:
            return seconds
    # OpenAI resets are durations ("6m0s"); Anthropic's are RFC 3339 times.
    return _reset_family(headers, "x-ratelimit-{field}-{kind}", _OPENAI_KINDS, parse_duration) or _reset_family(
        headers, "anthropic-ratelimit-{kind}-{field}", _ANTHROPIC_KINDS, lambda raw: _seconds_until(raw, now_wall)
    )
