"""The attempt plan, pure: no sockets, an injected clock, exact decisions."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from sidecar.capacity import Capacity
from sidecar.classify import CLIENT_ERROR, DISCONNECTED, SUCCESS, Verdict
from sidecar.config import RetryConfig
from sidecar.health import ALL_MODELS, HealthSettings, KeyState, LocalHealth
from sidecar.keys import Key
from sidecar.outcome import Outcome
from sidecar.plan import Attempt, AttemptFinishedTwice, Plan
from sidecar.selection import WeightedRoundRobin


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Upstream:
    name: str
    selector: WeightedRoundRobin
    health: LocalHealth
    capacity: Capacity


@dataclass
class Seen:
    """What the plan told its observer."""

    attempts: list[tuple[str, str]] = field(default_factory=list)  # (provider/key, outcome)
    retries: list[tuple[str, str]] = field(default_factory=list)  # (provider, reason)
    fallbacks: list[tuple[str, str]] = field(default_factory=list)

    def attempt_finished(self, attempt: Attempt) -> None:
        assert attempt.verdict is not None
        self.attempts.append((attempt.label, attempt.verdict.outcome.value))

    def key_retry(self, provider: str, reason: Outcome) -> None:
        self.retries.append((provider, reason.value))

    def fallback(self, from_provider: str, to_provider: str) -> None:
        self.fallbacks.append((from_provider, to_provider))


def upstream(name: str, keys: str, clock: Clock, settings: HealthSettings | None = None, **models: frozenset[str]):
    settings = settings or HealthSettings()
    key_list = [Key(k, f"secret-{name}-{k}-0000", models.get(k)) for k in keys.split()]
    health = LocalHealth([k.name for k in key_list], settings, clock)
    capacity = Capacity(key_list, clock, settings.max_models)
    return Upstream(name, WeightedRoundRobin(key_list, health, capacity, settings.max_models), health, capacity)


def plan_for(*upstreams: Upstream, clock: Clock, model: str = "gpt-4o", retry: RetryConfig | None = None):
    seen = Seen()
    return Plan(upstreams, lambda u: model, retry or RetryConfig(), clock, seen), seen


RATE_LIMITED = Verdict(Outcome.RATE_LIMITED, retry_after=20)
CREDENTIAL = Verdict(Outcome.CREDENTIAL_ERROR, key_wide=True)
OVERLOADED = Verdict(Outcome.UPSTREAM_ERROR, provider_wide=True)


# -- the failure table: what each verdict means for the route --------------------------------


@pytest.mark.parametrize(
    ("verdict", "next_label", "retry_reason"),
    [
        (CREDENTIAL, "openai/b", "credential_error"),
        (Verdict(Outcome.PERMISSION_ERROR), "openai/b", "permission_error"),
        (RATE_LIMITED, "openai/b", "rate_limited"),
        (Verdict(Outcome.RATE_LIMITED, key_wide=True), "openai/b", "rate_limited"),  # insufficient_quota
        (Verdict(Outcome.UPSTREAM_ERROR), "openai/b", "upstream_error"),
        (Verdict(Outcome.TIMEOUT), "openai/b", "timeout"),
        (Verdict(Outcome.CONNECTION_ERROR), "openai/b", "connection_error"),
        (OVERLOADED, "backup/x", None),  # the provider as a whole: straight to the next one
    ],
)
def test_a_retryable_failure_moves_to_the_next_key_or_provider(verdict, next_label, retry_reason) -> None:
    clock = Clock()
    plan, seen = plan_for(upstream("openai", "a b c", clock), upstream("backup", "x", clock), clock=clock)

    first = plan.next()
    first.finish(verdict)
    second = plan.next()

    assert (first.label, second.label) == ("openai/a", next_label)
    assert seen.retries == ([("openai", retry_reason)] if retry_reason else [])
    assert seen.fallbacks == ([] if retry_reason else [("openai", "backup")])
    assert seen.attempts == [("openai/a", verdict.outcome.value)]


@pytest.mark.parametrize("verdict", [SUCCESS, CLIENT_ERROR, DISCONNECTED])
def test_an_answer_for_the_app_ends_the_plan(verdict: Verdict) -> None:
    clock = Clock()
    plan, _ = plan_for(upstream("openai", "a b", clock), clock=clock)
    attempt = plan.next()
    attempt.finish(verdict)

    with pytest.raises(ValueError, match="retryable"):
        plan.next()
    assert plan.provider_outcomes == {"openai": verdict.outcome}


def test_each_verdict_reaches_the_health_record_once_and_the_next_request_avoids_the_key() -> None:
    clock = Clock()
    openai = upstream("openai", "a b", clock)
    plan, seen = plan_for(openai, clock=clock)
    plan.next().finish(CREDENTIAL)
    plan.next().finish(SUCCESS)

    rows = {(s.key, s.scope): s.state for s in openai.health.statuses()}
    assert rows == {("a", ALL_MODELS): KeyState.DISABLED, ("b", ALL_MODELS): KeyState.USABLE}
    assert seen.attempts == [("openai/a", "credential_error"), ("openai/b", "success")]
    following, _ = plan_for(openai, clock=clock)
    assert following.next().label == "openai/b"


def test_an_attempt_is_finished_exactly_once() -> None:
    clock = Clock()
    plan, seen = plan_for(upstream("openai", "a b", clock), clock=clock)
    attempt = plan.next()
    attempt.finish(SUCCESS)

    with pytest.raises(AttemptFinishedTwice):
        attempt.finish(Verdict(Outcome.CONNECTION_ERROR))
    assert seen.attempts == [("openai/a", "success")]


# -- fallback order, budgets -----------------------------------------------------------------


def test_providers_are_tried_in_route_order_each_key_once() -> None:
    clock = Clock()
    plan, seen = plan_for(upstream("openai", "a b", clock), upstream("backup", "x y", clock), clock=clock)
    attempt = plan.next()
    while attempt is not None:
        attempt.finish(Verdict(Outcome.UPSTREAM_ERROR))
        attempt = plan.next()

    assert plan.keys_tried == ["openai/a", "openai/b", "backup/x", "backup/y"]
    assert seen.retries == [("openai", "upstream_error"), ("backup", "upstream_error")]
    assert seen.fallbacks == [("openai", "backup")]
    assert plan.provider_outcomes == {"openai": Outcome.UPSTREAM_ERROR, "backup": Outcome.UPSTREAM_ERROR}


def test_a_provider_recovered_by_the_next_counts_its_own_failure_and_the_others_success() -> None:
    clock = Clock()
    plan, _ = plan_for(upstream("openai", "a", clock), upstream("backup", "x", clock), clock=clock)
    plan.next().finish(Verdict(Outcome.TIMEOUT))
    plan.next().finish(SUCCESS)

    assert plan.provider_outcomes == {"openai": Outcome.TIMEOUT, "backup": Outcome.SUCCESS}


def test_a_provider_with_no_usable_key_is_skipped_and_counted_as_a_fallback() -> None:
    clock = Clock()
    openai = upstream("openai", "a", clock)
    openai.health.record("a", "gpt-4o", RATE_LIMITED)
    plan, seen = plan_for(openai, upstream("backup", "x", clock), clock=clock)

    assert plan.next().label == "backup/x"
    assert seen.fallbacks == [("openai", "backup")]
    assert plan.provider_outcomes == {"openai": Outcome.NO_KEY_AVAILABLE}


def test_the_attempt_budget_stops_the_request() -> None:
    clock = Clock()
    plan, _ = plan_for(upstream("openai", "a b c d e", clock), clock=clock, retry=RetryConfig(max_attempts=2))
    plan.next().finish(Verdict(Outcome.UPSTREAM_ERROR))
    plan.next().finish(Verdict(Outcome.UPSTREAM_ERROR))

    assert plan.next() is None
    assert plan.keys_tried == ["openai/a", "openai/b"]


def test_the_time_budget_stops_the_request() -> None:
    clock = Clock()
    plan, _ = plan_for(upstream("openai", "a b c", clock), clock=clock, retry=RetryConfig(budget=60))
    plan.next().finish(Verdict(Outcome.TIMEOUT))
    clock.now += 59.9
    plan.next().finish(Verdict(Outcome.TIMEOUT))
    clock.now += 0.1

    assert plan.next() is None
    assert plan.keys_tried == ["openai/a", "openai/b"]


# -- what the app gets when nothing could serve it -------------------------------------------


@pytest.mark.parametrize(("verdict", "status"), [(Verdict(Outcome.TIMEOUT), 504), (Verdict(Outcome.CONNECTION_ERROR), 502)])
def test_every_attempt_failing_in_transport_is_a_gateway_error_naming_the_keys(verdict: Verdict, status: int) -> None:
    clock = Clock()
    plan, _ = plan_for(upstream("openai", "a b", clock), clock=clock)
    plan.next().finish(verdict)
    plan.next().finish(verdict)

    assert plan.next() is None
    answer = plan.exhausted()
    assert (answer.status, answer.code, answer.outcome) == (status, verdict.outcome.value, verdict.outcome)
    assert answer.message == f"keymux: every attempt failed ({verdict.outcome.value}); tried openai/a, openai/b"


def test_no_key_when_every_key_is_rate_limited_is_429_with_the_earliest_retry_after() -> None:
    clock = Clock()
    openai = upstream("openai", "a b", clock)
    openai.health.record("a", "gpt-4o", Verdict(Outcome.RATE_LIMITED, retry_after=20))
    openai.health.record("b", "gpt-4o", Verdict(Outcome.RATE_LIMITED, retry_after=7.2))
    plan, _ = plan_for(openai, clock=clock)

    assert plan.next() is None
    answer = plan.no_key()
    assert (answer.status, answer.outcome, answer.retry_after_header) == (429, Outcome.NO_KEY_AVAILABLE, "8")
    assert answer.message == (
        "keymux: no key can serve model 'gpt-4o' right now: "
        "openai/a cooling for model 'gpt-4o' after rate_limited for 20 s; "
        "openai/b cooling for model 'gpt-4o' after rate_limited for 7 s"
    )


def test_no_key_with_a_revoked_key_among_rate_limited_ones_is_429() -> None:
    """Waiting helps as long as one key only rests for a rate limit: 429, not 503."""
    clock = Clock()
    openai = upstream("openai", "a b", clock)
    openai.health.record("a", "gpt-4o", RATE_LIMITED)
    openai.health.record("b", "gpt-4o", CREDENTIAL)
    plan, _ = plan_for(openai, clock=clock)

    assert plan.next() is None
    answer = plan.no_key()
    assert (answer.status, answer.retry_after_header) == (429, "20")
    assert "openai/b disabled for every model after credential_error for 600 s" in answer.message


def test_no_key_when_none_recovers_by_itself_is_503() -> None:
    clock = Clock()
    openai = upstream("openai", "a b", clock)
    openai.health.record("a", "gpt-4o", Verdict(Outcome.PERMISSION_ERROR))
    openai.health.record("b", "gpt-4o", CREDENTIAL)
    plan, _ = plan_for(openai, clock=clock)

    assert plan.next() is None
    answer = plan.no_key()
    assert (answer.status, answer.retry_after_header) == (503, "300")


def test_no_key_allowed_the_model_says_so() -> None:
    clock = Clock()
    plan, _ = plan_for(upstream("openai", "a", clock, a=frozenset({"gpt-4o-mini"})), clock=clock)

    assert plan.next() is None
    answer = plan.no_key()
    assert (answer.status, answer.retry_after) == (503, None)
    assert answer.message == "keymux: no configured key is allowed to serve model 'gpt-4o'"
