"""What an upstream answer says about the key, from status, headers and a body prefix."""

from __future__ import annotations

import json
from calendar import timegm

import pytest

from sidecar.classify import (
    PACIFIC_STANDARD,
    Patterns,
    Verdict,
    classify,
    google_quota,
    parse_duration,
    retry_after_seconds,
    seconds_to_quota_reset,
    transport_outcome,
)
from sidecar.outcome import Outcome

NOW = 1_700_000_000.0
DEFAULT = Patterns()


def verdict(status, body, headers=None, patterns=DEFAULT):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return classify(status, headers or {}, raw, patterns, NOW)


# Bodies from ../shared/reference/providers.md
GEMINI_INVALID = {
    "error": {
        "code": 400,
        "message": "API key not valid. Please pass a valid API key.",
        "status": "INVALID_ARGUMENT",
        "details": [{"reason": "API_KEY_INVALID"}],
    }
}
OPENAI_INVALID = {
    "error": {
        "message": "Incorrect API key provided: sk-…abcd.",
        "type": "invalid_request_error",
        "code": "invalid_api_key",
    }
}
ANTHROPIC_INVALID = {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}
GEMINI_LEAKED = {
    "error": {
        "code": 403,
        "message": "Your API key was reported as leaked. Please use another API key.",
        "status": "PERMISSION_DENIED",
    }
}
DEEPSEEK_INVALID = {
    "error": {
        "message": "Authentication Fails, Your api key: ****abcd is invalid",
        "type": "authentication_error",
        "code": "invalid_request_error",
    }
}
OPENAI_NO_MODEL = {
    "error": {
        "message": "The model `gpt-5` does not exist or you do not have access to it.",
        "type": "invalid_request_error",
        "code": "model_not_found",
    }
}
AZURE_NO_DEPLOYMENT = {
    "error": {"code": "DeploymentNotFound", "message": "The API deployment for this resource does not exist."}
}
QUOTA = {
    "error": {"message": "You exceeded your current quota", "type": "insufficient_quota", "code": "insufficient_quota"}
}


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, GEMINI_INVALID),
        (401, OPENAI_INVALID),
        (401, ANTHROPIC_INVALID),
        (403, GEMINI_LEAKED),
        (401, DEEPSEEK_INVALID),
        (401, {"message": "Unauthorized"}),
    ],
)
def test_credential_failures_are_key_wide(status, body):
    result = verdict(status, body)
    assert result.outcome is Outcome.CREDENTIAL_ERROR
    assert result.key_wide


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (404, OPENAI_NO_MODEL),
        (404, AZURE_NO_DEPLOYMENT),
        (403, {"type": "error", "error": {"type": "permission_error", "message": "no"}}),
    ],
)
def test_model_access_problems_are_scoped_to_the_model(status, body):
    result = verdict(status, body)
    assert result.outcome is Outcome.PERMISSION_ERROR
    assert not result.key_wide


def test_a_plain_400_is_the_apps_mistake():
    body = {"error": {"message": "Invalid value for 'temperature'", "type": "invalid_request_error", "code": None}}
    assert verdict(400, body).outcome is Outcome.CLIENT_ERROR
    assert not verdict(400, body).outcome.retryable


def test_a_404_for_a_wrong_path_is_the_apps_mistake():
    assert verdict(404, {"error": {"message": "Unknown request URL: GET /v1/nope"}}).outcome is Outcome.CLIENT_ERROR


def test_429_reads_retry_after():
    result = verdict(429, {"error": {"message": "Rate limit reached"}}, {"retry-after": "7"})
    assert (result.outcome, result.retry_after, result.key_wide) == (Outcome.RATE_LIMITED, 7.0, False)


def test_insufficient_quota_is_a_key_wide_rest():
    result = verdict(429, QUOTA)
    assert (result.outcome, result.key_wide) == (Outcome.RATE_LIMITED, True)


def test_anthropic_overloaded_is_the_providers_problem_not_the_keys():
    result = verdict(529, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    assert (result.outcome, result.provider_wide) == (Outcome.UPSTREAM_ERROR, True)


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_server_errors_are_transient(status):
    assert verdict(status, b"<html>bad gateway</html>").outcome is Outcome.UPSTREAM_ERROR


def test_success_is_success():
    assert verdict(200, b"").outcome is Outcome.SUCCESS


def test_user_patterns_extend_the_defaults():
    patterns = Patterns({"credential": ["account suspended"]})
    assert verdict(400, {"error": "Account Suspended"}, patterns=patterns).outcome is Outcome.CREDENTIAL_ERROR
    assert verdict(400, {"error": "Account Suspended"}).outcome is Outcome.CLIENT_ERROR


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"x-ms-retry-after-ms": "250"}, 0.25),
        ({"retry-after": "12"}, 12.0),
        ({"retry-after": "Tue, 14 Nov 2023 22:14:20 GMT"}, 1700000060.0 - NOW),
        (
            {
                "x-ratelimit-reset-requests": "6m0s",
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-tokens": "12ms",
                "x-ratelimit-remaining-tokens": "5000",
            },
            360.0,
        ),
        ({"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "20s"}, 1.0),
        (
            {"anthropic-ratelimit-tokens-reset": "2023-11-14T22:14:00Z", "anthropic-ratelimit-tokens-remaining": "0"},
            1700000040.0 - NOW,
        ),
    ],
)
def test_retry_hints(headers, seconds):
    assert retry_after_seconds(headers, NOW) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["soon", "-5", "nan", "inf", "", "0", "1e999"])
def test_garbage_retry_after_is_ignored(value):
    assert retry_after_seconds({"retry-after": value}, NOW) is None


def test_absurd_retry_after_is_passed_on_for_the_policy_to_cap():
    assert retry_after_seconds({"retry-after": str(365 * 86400)}, NOW) == 365 * 86400


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("12ms", 0.012), ("6m0s", 360.0), ("1h2m3.5s", 3723.5), ("30s", 30.0), ("bogus", None), ("5", None)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_an_attempt_with_no_answer_is_a_timeout_or_a_connection_error() -> None:
    assert transport_outcome(TimeoutError()) is Outcome.TIMEOUT
    assert transport_outcome(ConnectionResetError()) is Outcome.CONNECTION_ERROR
    assert transport_outcome(OSError("refused")) is Outcome.CONNECTION_ERROR


# -- Gemini's quotas: RetryInfo and QuotaFailure in the 429 body ---------------------------------


def utc(*fields: int) -> float:
    return float(timegm((*fields, 0, 0, 0)))


GEMINI_QUOTA_MESSAGE = (
    "You exceeded your current quota, please check your plan and billing details. For more "
    "information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits."
)


def gemini_429(*details: object) -> dict:
    error = {"code": 429, "message": GEMINI_QUOTA_MESSAGE, "status": "RESOURCE_EXHAUSTED", "details": list(details)}
    return {"error": error}


def quota_failure(quota_id: str, model: str = "gemini-2.0-flash") -> dict:
    violation = {
        "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
        "quotaId": quota_id,
        "quotaDimensions": {"location": "global", "model": model},
        "quotaValue": "200",
    }
    return {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [violation]}


def retry_info(delay: object) -> dict:
    return {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}


HELP = {"@type": "type.googleapis.com/google.rpc.Help", "links": [{"description": "docs", "url": "https://ai.google.dev"}]}
PER_DAY = quota_failure("GenerateRequestsPerDayPerProjectPerModel-FreeTier")
PER_MINUTE = quota_failure("GenerateRequestsPerMinutePerProjectPerModel-FreeTier")
GEMINI_DAILY = gemini_429(PER_DAY, HELP, retry_info("37s"))
GEMINI_MINUTE = gemini_429(PER_MINUTE, HELP, retry_info("37s"))
WINTER = utc(2024, 1, 15, 10, 0, 0)  # 02:00 PST: Pacific midnight is 22 h away


def gemini_verdict(body, now_wall=WINTER, headers=None, patterns=DEFAULT, status=429):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return classify(status, headers or {}, raw, patterns, now_wall)


@pytest.mark.parametrize(
    ("now_wall", "seconds"),
    [
        (WINTER, 22 * 3600.0),
        (utc(2024, 7, 4, 19, 30, 0), 11.5 * 3600),  # 12:30 PDT: midnight is 07:00 UTC
        (utc(2024, 3, 10, 8, 30, 0), 22.5 * 3600),  # 00:30 PST on the day clocks spring forward: a 23 h day
        (utc(2024, 11, 3, 7, 30, 0), 24.5 * 3600),  # 00:30 PDT on the day clocks fall back: a 25 h day
        (utc(2024, 1, 16, 8, 0, 0), 24 * 3600.0),  # exactly midnight: the next one
    ],
)
def test_a_per_day_quota_rests_the_model_until_pacific_midnight(now_wall, seconds):
    result = gemini_verdict(GEMINI_DAILY, now_wall)
    assert result == Verdict(Outcome.RATE_LIMITED, retry_after=seconds, quota_window=True)
    assert not result.key_wide  # per (key, model): the key keeps serving other models


def test_without_a_tz_database_the_reset_is_taken_at_utc_minus_8():
    summer = utc(2024, 7, 4, 19, 30, 0)
    assert seconds_to_quota_reset(summer, PACIFIC_STANDARD) == 12.5 * 3600  # an hour off in summer, never early


def test_a_per_day_quota_wins_over_any_shorter_hint():
    result = gemini_verdict(GEMINI_DAILY, headers={"retry-after": "7"})
    assert (result.retry_after, result.quota_window) == (22 * 3600.0, True)


def test_a_per_minute_quota_takes_the_retry_delay_for_that_model_only():
    assert gemini_verdict(GEMINI_MINUTE) == Verdict(Outcome.RATE_LIMITED, retry_after=37.0)


@pytest.mark.parametrize(("delay", "seconds"), [("1.5s", 1.5), ("0.250s", 0.25), (" 37s ", 37.0), ("3600s", 3600.0)])
def test_retry_delay_is_a_protobuf_duration(delay, seconds):
    assert gemini_verdict(gemini_429(retry_info(delay))) == Verdict(Outcome.RATE_LIMITED, retry_after=seconds)


def test_a_rate_limit_header_wins_over_the_bodys_retry_delay():
    assert gemini_verdict(GEMINI_MINUTE, headers={"retry-after": "7"}).retry_after == 7.0


def test_a_user_quota_pattern_matching_geminis_message_does_not_make_its_quota_key_wide():
    patterns = Patterns({"quota": ["exceeded your current quota"]})
    assert gemini_verdict(GEMINI_MINUTE, patterns=patterns) == Verdict(Outcome.RATE_LIMITED, retry_after=37.0)
    # Without the structured details the user's pattern still means the account is out of credit.
    assert gemini_verdict(gemini_429(), patterns=patterns).key_wide


def test_geminis_quota_message_alone_matches_no_default_quota_pattern():
    assert gemini_verdict(gemini_429()) == Verdict(Outcome.RATE_LIMITED)


def test_a_streamed_generate_content_error_comes_in_an_array():
    assert gemini_verdict([GEMINI_MINUTE]).retry_after == 37.0


def test_a_resource_exhausted_4xx_is_read_like_a_429():
    assert gemini_verdict(GEMINI_DAILY, status=400).quota_window


_MINUTE_JSON = json.dumps(GEMINI_MINUTE).encode()
_RPC = b"type.googleapis.com/google.rpc.RetryInfo"


@pytest.mark.parametrize(
    "body",
    [
        _MINUTE_JSON[: len(_MINUTE_JSON) - 20],  # truncated by limits.error_body_bytes
        b"not json at all " + _RPC,
        b"\xff\xfe" + _RPC,
        b"[" * 100_000 + _RPC,  # nesting past the parser's recursion limit
        json.dumps({"pad": "x" * 300_000, **GEMINI_MINUTE}).encode(),  # too large to parse
        json.dumps([1, 2, _RPC.decode()]).encode(),
        json.dumps(_RPC.decode()).encode(),
        json.dumps({"error": _RPC.decode()}).encode(),
        json.dumps({"error": {"details": _RPC.decode()}}).encode(),
        json.dumps({"error": {"details": [_RPC.decode(), 5, None]}}).encode(),
        json.dumps(gemini_429(retry_info(37))).encode(),
        json.dumps(gemini_429(retry_info("37"))).encode(),
        json.dumps(gemini_429(retry_info("-5s"))).encode(),
        json.dumps(gemini_429(retry_info("0s"))).encode(),
        json.dumps(gemini_429(retry_info("1e999s"))).encode(),
        json.dumps(gemini_429(retry_info(None))).encode(),
        json.dumps(gemini_429(retry_info({"seconds": 37}))).encode(),
        json.dumps(gemini_429({"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": "PerDay"})).encode(),
        json.dumps(gemini_429({"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [1, "x"]})).encode(),
        json.dumps(gemini_429({"@type": "type.googleapis.com/google.rpc.QuotaFailure"})).encode(),
    ],
)
def test_a_malformed_google_body_falls_back_to_todays_verdict(body):
    assert google_quota(body) is None
    assert gemini_verdict(body) == Verdict(Outcome.RATE_LIMITED)
    assert gemini_verdict(body, headers={"retry-after": "7"}) == Verdict(Outcome.RATE_LIMITED, retry_after=7.0)


@pytest.mark.parametrize("quota_id", [None, 5, ["PerDay"], "GenerateRequestsPerMinutePerProjectPerModel"])
def test_a_violation_that_names_no_daily_window_is_not_daily(quota_id):
    body = gemini_429(quota_failure("x") | {"violations": [{"quotaId": quota_id}]}, retry_info("37s"))
    assert gemini_verdict(body) == Verdict(Outcome.RATE_LIMITED, retry_after=37.0)


def test_a_quota_failure_without_a_delay_is_still_per_model():
    result = gemini_verdict(gemini_429(PER_MINUTE), patterns=Patterns({"quota": ["exceeded your current quota"]}))
    assert result == Verdict(Outcome.RATE_LIMITED)


def test_openai_insufficient_quota_is_still_key_wide_and_never_read_as_a_window():
    result = verdict(429, QUOTA)
    assert result == Verdict(Outcome.RATE_LIMITED, key_wide=True)
    with_google_noise = {**QUOTA, "details": [PER_DAY]}  # not under "error": not Google's shape
    assert verdict(429, with_google_noise) == Verdict(Outcome.RATE_LIMITED, key_wide=True)
