"""Response classification: what an upstream answer says about the key that got it.

Pure functions over status, headers and a bounded body prefix; the wall clock is passed in.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sidecar.outcome import Outcome
from sidecar.providers import COMMON_PATTERNS, OVERLOADED_STATUSES, PATTERN_KINDS, PatternSet


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    retry_after: float | None = None  # seconds the provider asked us to wait
    key_wide: bool = False  # the failure concerns the key for every model
    provider_wide: bool = False  # the provider as a whole failed: no other key of it will help
    # retry_after runs to the end of a quota's window (Gemini's per-day quota): the (key, model)
    # rests that long, capped by health.quota_window_max rather than rate_limit_cooldown_max.
    quota_window: bool = False


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
        return _rate_limited(headers, body, patterns, now_wall)
    if status >= 500:
        return Verdict(Outcome.UPSTREAM_ERROR)
    if status == 403 or patterns.matches("model_access", body):
        return Verdict(Outcome.PERMISSION_ERROR)
    return CLIENT_ERROR


def _rate_limited(headers: Mapping[str, str], body: bytes, patterns: Patterns, now_wall: float) -> Verdict:
    """A rate limit or a quota. How long to wait, first answer wins: a per-day quota's window end
    (a retry hint cannot refill it sooner); a rate-limit header; Google's `RetryInfo.retryDelay`."""
    google = google_quota(body)
    if google is not None:
        # Checked before the quota patterns: Google's quotas are per project *and model*, so the
        # key keeps serving other models whatever the message says ("You exceeded your current quota").
        if google.daily:
            return Verdict(Outcome.RATE_LIMITED, retry_after=seconds_to_quota_reset(now_wall), quota_window=True)
        hint = retry_after_seconds(headers, now_wall)  # a header, when one came, wins over the body's delay
        return Verdict(Outcome.RATE_LIMITED, retry_after=hint if hint is not None else google.retry_delay)
    if patterns.matches("quota", body):
        return Verdict(Outcome.RATE_LIMITED, key_wide=True)
    return Verdict(Outcome.RATE_LIMITED, retry_after=retry_after_seconds(headers, now_wall))


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


def seconds_until(text: str, now_wall: float) -> float | None:
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
            seconds = _positive(seconds_until(raw, now_wall))
        if seconds is not None:
            return seconds
    # OpenAI resets are durations ("6m0s"); Anthropic's are RFC 3339 times.
    return _reset_family(headers, "x-ratelimit-{field}-{kind}", _OPENAI_KINDS, parse_duration) or _reset_family(
        headers, "anthropic-ratelimit-{kind}-{field}", _ANTHROPIC_KINDS, lambda raw: seconds_until(raw, now_wall)
    )


# -- Google's structured errors (Gemini) --------------------------------------------------------

_GOOGLE_RPC = b"type.googleapis.com/google.rpc."
_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
_QUOTA_FAILURE = "type.googleapis.com/google.rpc.QuotaFailure"
_GOOGLE_BODY_MAX = 256 * 1024  # a larger error body is not parsed: the patterns alone decide
_PROTO_DURATION = re.compile(r"(\d{1,12}(?:\.\d{1,9})?)s")  # google.protobuf.Duration in JSON: "37s", "1.5s"


@dataclass(frozen=True, slots=True)
class GoogleQuota:
    """What a Google 429 (`RESOURCE_EXHAUSTED`) says in its `error.details`."""

    retry_delay: float | None  # RetryInfo.retryDelay, in seconds
    daily: bool  # a QuotaFailure violation's quotaId names a per-day window


def google_quota(body: bytes) -> GoogleQuota | None:
    """The RetryInfo and QuotaFailure of a Google error body; None when it has neither.

    Defensive: the body is a bounded prefix of whatever came back, so anything truncated,
    oversized, not JSON or of the wrong shape is None and never raises.
    """
    if len(body) > _GOOGLE_BODY_MAX or _GOOGLE_RPC not in body:
        return None
    try:
        parsed: Any = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    if isinstance(parsed, list) and parsed:  # streamGenerateContent answers in a JSON array
        parsed = parsed[0]
    error = parsed.get("error") if isinstance(parsed, dict) else None
    details = error.get("details") if isinstance(error, dict) else None
    if not isinstance(details, list):
        return None
    delay: float | None = None
    violations: list[dict[str, Any]] = []
    for detail in details:
        if not isinstance(detail, dict):
            continue
        if detail.get("@type") == _RETRY_INFO:
            delay = delay or _proto_duration(detail.get("retryDelay"))
        elif detail.get("@type") == _QUOTA_FAILURE and isinstance(detail.get("violations"), list):
            violations += [v for v in detail["violations"] if isinstance(v, dict)]
    if delay is None and not violations:
        return None
    daily = any(isinstance(v.get("quotaId"), str) and "PerDay" in v["quotaId"] for v in violations)
    return GoogleQuota(delay, daily)


def _proto_duration(raw: object) -> float | None:
    match = _PROTO_DURATION.fullmatch(raw.strip()) if isinstance(raw, str) else None
    return _positive(float(match.group(1))) if match else None


def _pacific() -> tzinfo:
    """Where Google's daily quotas reset; a fixed UTC-8 when the system has no tz database."""
    try:
        return ZoneInfo("America/Los_Angeles")
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return PACIFIC_STANDARD


PACIFIC_STANDARD = timezone(timedelta(hours=-8), "PST")
PACIFIC = _pacific()


def seconds_to_quota_reset(now_wall: float, zone: tzinfo = PACIFIC) -> float:
    """Seconds from `now_wall` to the next midnight in `zone`, when Gemini's daily quotas reset."""
    today: date = datetime.fromtimestamp(now_wall, zone).date()
    midnight = datetime.combine(today + timedelta(days=1), time(0), tzinfo=zone)
    return midnight.timestamp() - now_wall
