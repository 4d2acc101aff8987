"""The capacity record and weighted selection, pure: no sockets, an injected clock, exact figures."""

from __future__ import annotations

import datetime

import pytest

from sidecar.capacity import (
    Capacity,
    Report,
    Window,
    anthropic_report,
    estimate_tokens,
    openai_report,
)
from sidecar.classify import SUCCESS, Verdict
from sidecar.config import RetryConfig
from sidecar.health import ALL_MODELS, HealthSettings, KeyState
from sidecar.keys import Key
from sidecar.outcome import Outcome
from tests.pools import Pool
from tests.test_plan import Clock, plan_for, upstream

NOW_WALL = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def keys(*names: str, **extra: dict[str, object]) -> list[Key]:
    return [Key(name, f"secret-{name}-000000", **extra.get(name, {})) for name in names]  # type: ignore[arg-type]


# -- reading the headers ---------------------------------------------------------------------


def test_openai_headers_give_both_limits() -> None:
    headers = {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "150000",
        "x-ratelimit-remaining-tokens": "149984",
        "x-ratelimit-reset-tokens": "6m0s",
    }
    assert openai_report(headers, NOW_WALL) == Report(Window(59, 60, 1.0), Window(149984, 150000, 360.0))


def test_azure_sends_only_what_remains() -> None:
    headers = {"x-ratelimit-remaining-requests": "7", "x-ratelimit-remaining-tokens": "9000"}
    assert openai_report(headers, NOW_WALL) == Report(Window(7), Window(9000))


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"x-ratelimit-remaining-requests": "lots"}, None),
        ({"x-ratelimit-remaining-requests": "-3"}, None),
        ({"x-ratelimit-remaining-requests": "nan"}, None),
        ({"x-ratelimit-remaining-requests": "inf"}, None),
        # a limit below what remains, or zero, is not believed; a garbage reset is dropped
        (
            {"x-ratelimit-remaining-requests": "5", "x-ratelimit-limit-requests": "2", "x-ratelimit-reset-requests": "x"},
            Report(Window(5), None),
        ),
        ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-limit-requests": "0"}, Report(Window(0), None)),
        # plain seconds, as some compatible hosts send them
        ({"x-ratelimit-remaining-tokens": "10", "x-ratelimit-reset-tokens": "2.5"}, Report(None, Window(10, None, 2.5))),
        ({"x-ratelimit-remaining-requests": "1", "x-ratelimit-reset-requests": "120ms"}, Report(Window(1, None, 0.12))),
    ],
)
def test_openai_header_garbage_and_missing_fields(headers: dict[str, str], expected: Report | None) -> None:
    assert openai_report(headers, NOW_WALL) == expected


def _rfc3339(seconds_from_now: float) -> str:
    return datetime.datetime.fromtimestamp(NOW_WALL + seconds_from_now, datetime.UTC).isoformat().replace("+00:00", "Z")


def test_anthropic_headers_take_the_token_limit_with_the_least_room() -> None:
    headers = {
        "anthropic-ratelimit-requests-limit": "50",
        "anthropic-ratelimit-requests-remaining": "49",
        "anthropic-ratelimit-requests-reset": _rfc3339(1.2),
        "anthropic-ratelimit-tokens-limit": "100000",
        "anthropic-ratelimit-tokens-remaining": "90000",
        "anthropic-ratelimit-tokens-reset": _rfc3339(6),
        "anthropic-ratelimit-input-tokens-limit": "40000",
        "anthropic-ratelimit-input-tokens-remaining": "1000",
        "anthropic-ratelimit-input-tokens-reset": _rfc3339(59),
        "anthropic-ratelimit-output-tokens-remaining": "garbage",
    }
    report = anthropic_report(headers, NOW_WALL)
    assert report == Report(Window(49, 50, pytest.approx(1.2)), Window(1000, 40000, pytest.approx(59)))


def test_anthropic_reset_in_the_past_is_now_and_a_bad_time_is_dropped() -> None:
    headers = {
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-requests-reset": _rfc3339(-5),
        "anthropic-ratelimit-tokens-remaining": "10",
        "anthropic-ratelimit-tokens-reset": "tomorrow",
    }
    assert anthropic_report(headers, NOW_WALL) == Report(Window(0, None, 0.0), Window(10, None, None))
    assert anthropic_report({"x-ratelimit-remaining-requests": "3"}, NOW_WALL) is None


# -- the token estimate ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "size", "expected"),
    [
        (b"", None, 0),
        (b'{"model":"gpt-4o","messages":[]}', None, 8),
        (b'{"model":"gpt-4o","max_tokens": 500}', None, 9 + 500),
        (b'{"max_output_tokens":64,"input":"x"}', None, 9 + 64),
        (b'{"max_completion_tokens":1000}', None, 7 + 1000),
        (b'{"generationConfig":{"maxOutputTokens":256}}', None, 11 + 256),
        (b'{"max_tokens":"lots"}', None, 5),
        (b'{"max_tokens":500', 4_000_000, 1_000_000 + 500),  # a spooled body: its head and its size
    ],
)
def test_the_token_estimate_is_prompt_bytes_over_4_plus_the_output_allowed(
    body: bytes, size: int | None, expected: int
) -> None:
    assert estimate_tokens(body, size) == expected


# -- saturation ---------------------------------------------------------------------------------


def test_a_key_reporting_no_request_left_rests_until_its_pace_gives_one_back() -> None:
    clock = Clock()
    capacity = Capacity(keys("a"), clock)
    ticket = capacity.sent("a", "m", 0)
    capacity.learn("a", "m", Report(Window(0, 10, 20.0)), ticket)  # 10 per 20 s, none left

    # Whole again in 20 s: one request's worth every (20 - 0.5) / 10 ... (used >= 2: the middle)
    pace = (10 - 0.5) / 20
    assert capacity.ready_at("a", "m", 0) == (pytest.approx(clock.now + 1 / pace), "requests")
    [status] = capacity.statuses()
    assert (status.key, status.scope, status.state, status.limit) == ("a", "m", KeyState.SATURATED, "requests")
    clock.now += 1 / pace + 1e-9
    assert capacity.ready_at("a", "m", 0) is None
    assert list(capacity.statuses()) == []


def test_without_a_limit_the_key_rests_until_the_reset() -> None:
    clock = Clock()
    capacity = Capacity(keys("a"), clock)
    capacity.learn("a", "m", Report(Window(0, None, 7.0)), capacity.sent("a", "m", 0))
    assert capacity.ready_at("a", "m", 0) == (clock.now + 7.0, "requests")
    clock.now += 7.0
    assert capacity.ready_at("a", "m", 0) is None


def test_nothing_saying_when_leaves_the_key_to_the_provider() -> None:
    clock = Clock()
    capacity = Capacity(keys("a"), clock)
    capacity.learn("a", "m", Report(Window(0)), capacity.sent("a", "m", 0))
    assert capacity.ready_at("a", "m", 0) is None


def test_requests_sent_after_the_answered_one_are_taken_again() -> None:
    clock = Clock()
    capacity = Capacity(keys("a"), clock)
    first = capacity.sent("a", "m", 0)
    capacity.sent("a", "m", 0)
    capacity.sent("a", "m", 0)  # two more left before the first answer came back
    capacity.learn("a", "m", Report(Window(2, None, 60.0)), first)
    assert capacity.ready_at("a", "m", 0) == (clock.now + 60.0, "requests")  # 2 left - 2 in flight


def test_an_older_answer_says_nothing_new() -> None:
    clock = Clock()
    capacity = Capacity(keys("a"), clock)
    older, newer = capacity.sent("a", "m", 0), capacity.sent("a", "m", 0)
    capacity.learn("a", "m", Report(Window(5, None, 60.0)), newer)
    capacity.learn("a", "m", Report(Window(0, None, 60.0)), older)
    assert capacity.ready_at("a", "m", 0) is None


def test_tokens_saturate_only_requests_that_need_more_than_is_left() -> None:
    clock = Clock()
    capacity = Capacity(keys("a"), clock)
    capacity.learn("a", "m", Report(None, Window(100, 10_000, 30.0)), capacity.sent("a", "m", 0))
    assert capacity.ready_at("a", "m", 100) is None
    held = capacity.ready_at("a", "m", 500)
    assert held is not None and held[1] == "tokens"
    assert capacity.ready_at("a", "m", 20_000) is None  # larger than the whole limit: the provider's call


def test_a_limit_for_one_model_leaves_the_others_alone() -> None:
    clock = Clock()
    capacity = Capacity(keys("a"), clock)
    capacity.learn("a", "m1", Report(Window(0, None, 30.0)), capacity.sent("a", "m1", 0))
    assert capacity.ready_at("a", "m1", 0) is not None
    assert capacity.ready_at("a", "m2", 0) is None


def test_this_pods_share_follows_what_others_take() -> None:
    """Another pod takes three requests for each one of this pod's: the room it counts on and its
    refill shrink toward that share of the provider's."""
    clock = Clock()
    capacity = Capacity(keys("a"), clock)
    steady = Report(Window(10, 20, 0.5))  # half full, whole again in 0.5 s: 20 per second
    capacity.learn("a", "m", steady, capacity.sent("a", "m", 0))
    for _ in range(40):
        clock.now += 0.2  # the provider refills 4 in that time, and four requests take them
        capacity.learn("a", "m", steady, capacity.sent("a", "m", 0))
    room = capacity._rooms["m"]["a"].requests
    # Per answer the pace read is (20 - 10 - 0.5) / 0.5 = 19/s: the others took 10 + 19 x 0.2 - 1 -
    # 10 = 2.8 to this pod's 1, a share of 1 / 3.8.
    assert room is not None and room.share == pytest.approx(1 / 3.8, abs=0.005)
    assert room.room(clock.now) == 2  # whole requests of what remains: this pod's part, rounded down


def test_configured_rpm_holds_the_key_for_every_model_until_the_window_slides() -> None:
    clock = Clock()
    capacity = Capacity(keys("a", a={"rpm": 2}), clock)
    capacity.sent("a", "m1", 0)
    clock.now += 10
    capacity.sent("a", "m2", 0)
    assert capacity.ready_at("a", "m3", 0) == (clock.now - 10 + 60, "rpm")
    [status] = capacity.statuses()
    assert (status.scope, status.limit) == (ALL_MODELS, "rpm")
    clock.now += 50
    assert capacity.ready_at("a", "m3", 0) is None


def test_configured_tpm_frees_up_as_the_oldest_tokens_leave_the_window() -> None:
    clock = Clock()
    capacity = Capacity(keys("a", a={"tpm": 1000}), clock)
    capacity.sent("a", "m", 600)
    clock.now += 30
    capacity.sent("a", "m", 300)
    assert capacity.ready_at("a", "m", 100) is None
    assert capacity.ready_at("a", "m", 200) == (clock.now - 30 + 60, "tpm")  # when the 600 leave
    assert capacity.ready_at("a", "m", 5000) is None  # over the whole limit: the provider's call


def test_a_reload_keeps_what_was_learned_of_unchanged_keys() -> None:
    clock = Clock()
    old = Capacity(keys("a", "b"), clock)
    for name in ("a", "b"):
        old.learn(name, "m", Report(Window(0, None, 30.0)), old.sent(name, "m", 0))
    new = Capacity(keys("a", "b"), clock)
    new.adopt(old, {"a"})
    assert new.ready_at("a", "m", 0) is not None
    assert new.ready_at("b", "m", 0) is None


def test_rooms_are_bounded_by_models_and_swept_when_idle() -> None:
    clock = Clock()
    capacity = Capacity(keys("a"), clock, max_models=10)
    for i in range(1000):
        capacity.sent("a", f"m{i}", 0)
    assert len(capacity._rooms) == 10
    clock.now += 3600
    capacity.sweep(3600)
    assert len(capacity._rooms) == 0


# -- weighted selection -------------------------------------------------------------------------


def shares(pool: Pool, model: str, count: int) -> dict[str, int]:
    seen: dict[str, int] = {}
    for _ in range(count):
        key = pool.choose(model)
        assert key is not None
        seen[key.name] = seen.get(key.name, 0) + 1
    return seen


def test_reported_limits_of_20_10_5_share_4_2_1_within_one_per_70() -> None:
    clock = Clock()
    pool = Pool(keys("a", "b", "c"), HealthSettings(), clock)
    for name, limit in (("a", 20), ("b", 10), ("c", 5)):
        pool.capacity.learn(name, "m", Report(Window(limit, limit, 0.0)), pool.capacity.sent(name, "m", 0))
    for _ in range(10):  # the limits keep room: the shares alone decide
        for name, limit in (("a", 20), ("b", 10), ("c", 5)):
            pool.capacity._rooms["m"][name].requests.level = limit  # type: ignore[union-attr]
        got = shares(pool, "m", 70)
        assert abs(got["a"] - 40) <= 1 and abs(got["b"] - 20) <= 1 and abs(got["c"] - 10) <= 1


def test_weights_interleave_rather_than_bunch() -> None:
    clock = Clock()
    pool = Pool(keys("a", "b", a={"weight": 2.0}), HealthSettings(), clock)
    assert "".join(pool.choose("m").name for _ in range(9)) == "abaabaaba"  # type: ignore[union-attr]


def test_equal_weights_are_round_robin() -> None:
    clock = Clock()
    pool = Pool(keys("a", "b", "c"), HealthSettings(), clock)
    assert shares(pool, "m", 300) == {"a": 100, "b": 100, "c": 100}


def test_a_key_without_a_report_gets_the_average_learned_share_times_its_weight() -> None:
    clock = Clock()
    pool = Pool(keys("a", "b", "c"), HealthSettings(), clock)
    pool.capacity.learn("a", "m", Report(Window(30, 30, 0.0)), pool.capacity.sent("a", "m", 0))
    pool.capacity.learn("b", "m", Report(Window(10, 10, 0.0)), pool.capacity.sent("b", "m", 0))
    weights = pool.capacity.weights("m", keys("a", "b", "c"))
    assert weights == [30.0, 10.0, 20.0]


def test_a_saturated_key_is_passed_over_and_counted() -> None:
    clock = Clock()
    pool = Pool(keys("a", "b"), HealthSettings(), clock)
    pool.capacity.learn("a", "m", Report(Window(0, None, 30.0)), pool.capacity.sent("a", "m", 0))
    assert [pool.choose("m").name for _ in range(3)] == ["b", "b", "b"]  # type: ignore[union-attr]
    assert pool.capacity.avoided == {("a", "requests"): 3}


def test_a_retry_charges_the_key_that_serves_it_a_whole_turn() -> None:
    clock = Clock()
    pool = Pool(keys("a", "b"), HealthSettings(), clock)
    assert pool.choose("m").name == "a"  # type: ignore[union-attr]
    assert pool.choose("m", exclude={"a"}).name == "b"  # type: ignore[union-attr]  # the retry
    assert pool.choose("m").name == "a"  # type: ignore[union-attr]  # b's turn was the retry


# -- waiting, in the plan -----------------------------------------------------------------------


def test_the_plan_waits_for_the_first_key_to_free_up_within_max_wait() -> None:
    clock = Clock()
    openai = upstream("openai", "a b", clock)
    openai.health.record("a", "gpt-4o", Verdict(Outcome.RATE_LIMITED, retry_after=1.5))
    openai.capacity.learn("b", "gpt-4o", Report(Window(0, None, 0.5)), openai.capacity.sent("b", "gpt-4o", 0))
    plan, _ = plan_for(openai, clock=clock)

    assert plan.next() is None
    assert plan.wait_until() == (clock.now + 0.5, clock.now + 2.0)
    clock.now += 0.5
    attempt = plan.next()
    assert attempt is not None and attempt.key.name == "b"
    attempt.finish(SUCCESS)


def test_the_wait_is_counted_from_the_first_and_bounded_by_the_budget() -> None:
    clock = Clock()
    openai = upstream("openai", "a", clock)
    openai.health.record("a", "gpt-4o", Verdict(Outcome.RATE_LIMITED, retry_after=1.5))
    plan, _ = plan_for(openai, clock=clock)
    assert plan.wait_until() == (clock.now + 1.5, clock.now + 2.0)
    clock.now += 1.0
    assert plan.wait_until() == (clock.now + 0.5, clock.now + 1.0)  # the same deadline

    fresh = upstream("openai", "a", clock)
    fresh.health.record("a", "gpt-4o", Verdict(Outcome.RATE_LIMITED, retry_after=1.5))
    tight, _ = plan_for(fresh, clock=clock, retry=RetryConfig(budget=1.0))
    assert tight.wait_until() is None  # 1.5 s is past the budget: answer at once


def test_no_wait_when_max_wait_is_zero_or_nothing_frees_up_by_itself() -> None:
    clock = Clock()
    openai = upstream("openai", "a b", clock)
    openai.health.record("a", "gpt-4o", Verdict(Outcome.RATE_LIMITED, retry_after=0.5))
    plan, _ = plan_for(openai, clock=clock, retry=RetryConfig(max_wait=0.0))
    assert plan.wait_until() is None

    revoked = upstream("openai", "a", clock)
    revoked.health.record("a", "gpt-4o", Verdict(Outcome.CREDENTIAL_ERROR, key_wide=True))
    plan, _ = plan_for(revoked, clock=clock)
    assert plan.wait_until() is None
    assert plan.no_key().status == 503


def test_a_saturated_key_makes_the_no_key_answer_a_429_naming_the_limit() -> None:
    clock = Clock()
    openai = upstream("openai", "a", clock)
    openai.capacity.learn("a", "gpt-4o", Report(Window(0, None, 30.0)), openai.capacity.sent("a", "gpt-4o", 0))
    plan, _ = plan_for(openai, clock=clock)
    assert plan.next() is None and plan.wait_until() is None
    answer = plan.no_key()
    assert (answer.status, answer.retry_after_header) == (429, "30")
    assert "openai/a saturated for model 'gpt-4o' (requests limit) for 30 s" in answer.message
