"""The health rules and key selection, on the pure core with an injected clock."""

from __future__ import annotations

from collections import Counter

import pytest

from sidecar.classify import Verdict
from sidecar.health import ALL_MODELS, HealthSettings, KeyState, backoff
from sidecar.keys import Key
from sidecar.outcome import Outcome
from tests.pools import Pool


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_pool(names=("a", "b", "c"), policy: HealthSettings | None = None, models=None):
    clock = Clock()
    keys = [Key(n, f"secret-{n}-0000", (models or {}).get(n)) for n in names]
    return Pool(keys, policy or HealthSettings(), clock), clock


def chosen(pool: Pool, model: str, n: int) -> Counter[str]:
    picks: Counter[str] = Counter()
    for _ in range(n):
        key = pool.choose(model)
        assert key is not None
        picks[key.name] += 1
        pool.record(key.name, model, Verdict(Outcome.SUCCESS))
    return picks


CREDENTIAL = Verdict(Outcome.CREDENTIAL_ERROR, key_wide=True)
SERVER = Verdict(Outcome.UPSTREAM_ERROR)


def test_three_healthy_keys_share_300_requests_evenly():
    pool, _ = make_pool()
    assert chosen(pool, "gpt-4o", 300) == {"a": 100, "b": 100, "c": 100}


def test_round_robin_is_fair_among_usable_keys_when_one_cools():
    pool, _ = make_pool(("a", "b", "c", "d"))
    pool.record("b", "gpt-4o", Verdict(Outcome.RATE_LIMITED, retry_after=60))
    assert chosen(pool, "gpt-4o", 300) == {"a": 100, "c": 100, "d": 100}


def test_round_robin_is_kept_per_model():
    pool, _ = make_pool()
    assert [pool.choose("m1").name for _ in range(2)] == ["a", "b"]
    assert pool.choose("m2").name == "a"  # a new model starts its own rotation
    assert pool.choose("m1").name == "c"


def test_a_key_rate_limited_for_one_model_keeps_serving_others():
    pool, clock = make_pool(("a", "b"))
    pool.record("a", "gpt-4o", Verdict(Outcome.RATE_LIMITED, retry_after=20))
    assert chosen(pool, "gpt-4o", 4) == {"b": 4}
    assert chosen(pool, "gpt-4o-mini", 4) == {"a": 2, "b": 2}
    clock.advance(20)
    assert chosen(pool, "gpt-4o", 4) == {"a": 2, "b": 2}


def test_retry_after_is_capped_by_policy():
    pool, clock = make_pool(("a",), HealthSettings(rate_limit_cooldown_max=100))
    pool.record("a", "m", Verdict(Outcome.RATE_LIMITED, retry_after=365 * 86400))
    clock.advance(99.9)
    assert pool.choose("m") is None
    clock.advance(0.2)
    assert pool.choose("m").name == "a"


def test_rate_limit_without_hint_uses_the_default_and_doubles():
    pool, clock = make_pool(("a",), HealthSettings(rate_limit_cooldown=30, rate_limit_cooldown_max=600))
    pool.record("a", "m", Verdict(Outcome.RATE_LIMITED))
    clock.advance(29)
    assert pool.choose("m") is None
    clock.advance(1)
    assert pool.choose("m").name == "a"  # half-open probe
    pool.record("a", "m", Verdict(Outcome.RATE_LIMITED))
    clock.advance(59)
    assert pool.choose("m") is None
    clock.advance(1)
    assert pool.choose("m").name == "a"


def test_credential_failure_disables_the_key_for_every_model():
    pool, _ = make_pool(("a", "b"))
    pool.record("a", "gemini-pro", CREDENTIAL)
    assert chosen(pool, "gemini-pro", 3) == {"b": 3}
    assert chosen(pool, "gemini-flash", 3) == {"b": 3}
    rows = {(s.key, s.scope): s.state for s in pool.statuses()}
    assert rows[("a", ALL_MODELS)] is KeyState.DISABLED


def test_credential_cooldown_doubles_then_half_open_probe_reenables():
    pool, clock = make_pool(("a",), HealthSettings(credential_cooldown=600, credential_cooldown_max=6 * 3600))
    pool.record("a", "m", CREDENTIAL)
    clock.advance(599)
    assert pool.choose("m") is None
    clock.advance(1)
    assert pool.choose("m").name == "a"  # one request is let through
    assert pool.choose("m") is None  # ... and only one while it is in flight
    pool.record("a", "m", CREDENTIAL)  # still bad: 1200 s this time
    clock.advance(1199)
    assert pool.choose("m") is None
    clock.advance(1)
    assert pool.choose("m").name == "a"
    pool.record("a", "m", Verdict(Outcome.SUCCESS))
    assert [s.state for s in pool.statuses()] == [KeyState.USABLE]
    assert pool.entry_count() == 0


def test_credential_cooldown_doubles_up_to_its_cap_and_no_further():
    pool, clock = make_pool(("a",), HealthSettings(credential_cooldown=600, credential_cooldown_max=3600))
    for rest in (600, 1200, 2400, 3600, 3600, 3600):
        pool.record("a", "m", CREDENTIAL)  # the half-open probe failed again
        clock.advance(rest - 1)
        assert pool.choose("m") is None  # resting for exactly `rest` seconds ...
        clock.advance(1)
        assert pool.choose("m").name == "a"  # ... then probed


def test_one_backoff_schedule_doubles_and_caps():
    assert [backoff(30, 600, n) for n in range(7)] == [30, 60, 120, 240, 480, 600, 600]
    assert backoff(30, 600, 10_000) == 600  # no overflow however long the streak


def test_transient_failures_cool_at_the_threshold_with_backoff():
    pool, clock = make_pool(("a", "b"), HealthSettings(failure_threshold=3, failure_cooldown=30, failure_cooldown_max=600))
    pool.record("a", "m", SERVER)
    pool.record("a", "m", Verdict(Outcome.TIMEOUT))
    assert pool.choose("m", exclude={"b"}).name == "a"  # two failures: still usable
    pool.record("a", "m", Verdict(Outcome.CONNECTION_ERROR))
    assert chosen(pool, "m", 2) == {"b": 2}
    clock.advance(30)
    key = pool.choose("m", exclude={"b"})
    assert key.name == "a"
    pool.record("a", "m", SERVER)  # the probe failed: 60 s now, no threshold
    clock.advance(59)
    assert pool.choose("m", exclude={"b"}) is None
    clock.advance(1)
    assert pool.choose("m", exclude={"b"}).name == "a"


def test_a_success_resets_the_consecutive_count():
    pool, _ = make_pool(("a",), HealthSettings(failure_threshold=3))
    for _ in range(5):
        pool.record("a", "m", SERVER)
        pool.record("a", "m", SERVER)
        pool.record("a", "m", Verdict(Outcome.SUCCESS))
    assert pool.choose("m").name == "a"


def test_permission_error_cools_only_that_model():
    pool, _ = make_pool(("a", "b"))
    pool.record("a", "gpt-4o", Verdict(Outcome.PERMISSION_ERROR))
    assert chosen(pool, "gpt-4o", 2) == {"b": 2}
    assert chosen(pool, "gpt-4o-mini", 2) == {"a": 1, "b": 1}


def test_quota_exhaustion_rests_the_whole_key():
    pool, clock = make_pool(("a", "b"), HealthSettings(quota_cooldown=1800))
    pool.record("a", "gpt-4o", Verdict(Outcome.RATE_LIMITED, key_wide=True))
    assert chosen(pool, "gpt-4o-mini", 2) == {"b": 2}
    clock.advance(1800)
    assert chosen(pool, "gpt-4o-mini", 2) == {"a": 1, "b": 1}


@pytest.mark.parametrize("outcome", [Outcome.CLIENT_ERROR, Outcome.CLIENT_DISCONNECTED])
def test_neutral_outcomes_free_the_probe_without_penalty(outcome):
    pool, clock = make_pool(("a",))
    pool.record("a", "m", CREDENTIAL)
    clock.advance(600)
    assert pool.choose("m").name == "a"
    pool.record("a", "m", Verdict(outcome))
    assert pool.choose("m").name == "a"  # the slot is free again, still half-open
    assert [s.state for s in pool.statuses()] == [KeyState.HALF_OPEN]


def test_provider_wide_failure_does_not_penalise_the_key():
    pool, _ = make_pool(("a",), HealthSettings(failure_threshold=1))
    pool.record("a", "m", Verdict(Outcome.UPSTREAM_ERROR, provider_wide=True))
    assert pool.choose("m").name == "a"


def test_a_probe_never_reported_frees_its_slot_after_the_probe_timeout():
    pool, clock = make_pool(("a",), HealthSettings(probe_timeout=60))
    pool.record("a", "m", CREDENTIAL)
    clock.advance(600)
    assert pool.choose("m").name == "a"
    clock.advance(59)
    assert pool.choose("m") is None
    clock.advance(1)
    assert pool.choose("m").name == "a"


def test_allow_list_is_respected():
    pool, _ = make_pool(("a", "b"), models={"b": frozenset({"gpt-4o-mini"})})
    assert chosen(pool, "gpt-4o", 4) == {"a": 4}
    assert chosen(pool, "gpt-4o-mini", 4) == {"a": 2, "b": 2}


def test_exclude_skips_keys_already_tried_in_this_request():
    pool, _ = make_pool(("a", "b"))
    assert pool.choose("m", exclude={"a", "b"}) is None


def test_a_concurrent_success_does_not_end_a_newer_cooldown():
    pool, _ = make_pool(("a",))
    pool.record("a", "m", Verdict(Outcome.RATE_LIMITED, retry_after=30))
    pool.record("a", "m", Verdict(Outcome.SUCCESS))  # a request that started before the 429
    assert pool.choose("m") is None


def test_tracked_models_are_capped_and_idle_entries_expire():
    pool, clock = make_pool(("a", "b"), HealthSettings(max_models=50, idle_expiry=3600))
    for i in range(10_000):
        pool.choose(f"model-{i}")
        pool.record("a", f"model-{i}", Verdict(Outcome.PERMISSION_ERROR))
    assert len(pool.selector._current) == 50
    assert pool.entry_count() <= 50
    clock.advance(3600 * 3)
    pool.sweep()
    assert pool.entry_count() == 0


def test_adopt_keeps_health_for_unchanged_keys_only():
    old, clock = make_pool(("a", "b"))
    old.record("a", "m", Verdict(Outcome.RATE_LIMITED, retry_after=100))
    old.record("b", "m", Verdict(Outcome.RATE_LIMITED, retry_after=100))
    new = Pool([Key("a", "secret-a-0000"), Key("b", "rotated")], HealthSettings(), clock)
    new.adopt(old, unchanged={"a"})
    assert new.choose("m").name == "b"
    assert new.choose("m").name == "b"


# -- quota windows (Gemini's per-day quotas) -----------------------------------------------------


def daily(seconds: float) -> Verdict:
    return Verdict(Outcome.RATE_LIMITED, retry_after=seconds, quota_window=True)


def test_a_daily_quota_rests_the_model_until_its_window_ends_not_for_rate_limit_cooldown_max():
    pool, clock = make_pool(("a",))
    pool.record("a", "gemini-2.0-flash", daily(79_200.0))
    (status,) = pool.blocking("gemini-2.0-flash")
    assert (status.scope, status.state, status.until) == ("gemini-2.0-flash", KeyState.COOLING, 1000.0 + 79_200.0)
    clock.advance(79_199.9)
    assert pool.choose("gemini-2.0-flash") is None
    clock.advance(0.1)
    assert pool.choose("gemini-2.0-flash").name == "a"  # half-open: one probe after midnight


def test_a_daily_quota_rest_is_capped_by_quota_window_max():
    pool, _ = make_pool(("a",), HealthSettings(quota_window_max=86_400.0, rate_limit_cooldown_max=100.0))
    pool.record("a", "m", daily(88_200.0))
    pool.record("a", "n", daily(50_000.0))
    assert [s.until for s in pool.blocking("m")] == [1000.0 + 86_400.0]
    assert [s.until for s in pool.blocking("n")] == [1000.0 + 50_000.0]


def test_a_retry_delay_that_is_not_a_quota_window_keeps_the_rate_limit_cap():
    pool, _ = make_pool(("a",), HealthSettings(rate_limit_cooldown_max=100.0))
    pool.record("a", "m", Verdict(Outcome.RATE_LIMITED, retry_after=37.0))
    pool.record("a", "n", Verdict(Outcome.RATE_LIMITED, retry_after=50_000.0))
    assert [s.until for s in pool.blocking("m")] == [1037.0]
    assert [s.until for s in pool.blocking("n")] == [1100.0]


def test_a_key_out_of_its_daily_quota_for_one_model_keeps_serving_the_others():
    pool, _ = make_pool(("a", "b"))
    pool.record("a", "gemini-2.0-flash", daily(79_200.0))
    assert chosen(pool, "gemini-2.0-flash", 4) == {"b": 4}
    assert chosen(pool, "gemini-2.5-pro", 4) == {"a": 2, "b": 2}
    rows = {(s.key, s.scope): s.state for s in pool.statuses()}
    assert rows[("a", ALL_MODELS)] is KeyState.USABLE
