"""What an upstream answer says about the key, from status, headers and a body prefix."""

from __future__ import annotations

import json

import pytest

from sidecar.classify import Patterns, classify, parse_duration, retry_after_seconds, transport_outcome
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
