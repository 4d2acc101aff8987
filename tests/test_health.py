"""The health rules and key selection, on the pure core with an injected clock."""

from __future__ import annotations

from collections import Counter

import pytest

from sidecar.classify import Verdict
from sidecar.health import HealthPolicy, Key, KeyPool, KeyState, exponential
from sidecar.outcome import Outcome


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_pool(names=("a", "b", "c"), policy: HealthPolicy | None = None, models=None):
    clock = Clock()
    keys = [Key(n, f"secret-{n}-0000", (models or {}).get(n)) for n in names]
    return KeyPool("openai", keys, policy or HealthPolicy(), clock), clock


def chosen(pool: KeyPool, model: str, n: int) -> Counter[str]:
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
    pool, clock = make_pool(("a",), HealthPolicy(rate_limit_max=100))
    pool.record("a", "m", Verdict(Outcome.RATE_LIMITED, retry_after=365 * 86400))
    clock.advance(99.9)
    assert pool.choose("m") is None
    clock.advance(0.2)
    assert pool.choose("m").name == "a"


def test_rate_limit_without_hint_uses_the_default_and_doubles():
    pool, clock = make_pool(("a",), HealthPolicy(rate_limit_backoff=exponential(30, 600)))
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
    rows = {(s.key, s.model): s.state for s in pool.statuses()}
    assert rows[("a", None)] is KeyState.DISABLED


def test_credential_cooldown_doubles_then_half_open_probe_reenables():
    pool, clock = make_pool(("a",), HealthPolicy(credential_backoff=exponential(600, 6 * 3600)))
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


def test_credential_cooldown_is_capped():
    pool, clock = make_pool(("a",), HealthPolicy(credential_backoff=exponential(600, 3600)))
    for _ in range(10):
        pool.record("a", "m", CREDENTIAL)
        clock.advance(3600)
        assert pool.choose("m").name == "a"


def test_transient_failures_cool_at_the_threshold_with_backoff():
    pool, clock = make_pool(("a", "b"), HealthPolicy(failure_threshold=3, failure_backoff=exponential(30, 600)))
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
    pool, _ = make_pool(("a",), HealthPolicy(failure_threshold=3))
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
    pool, clock = make_pool(("a", "b"), HealthPolicy(quota_cooldown=1800))
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
    pool, _ = make_pool(("a",), HealthPolicy(failure_threshold=1))
    pool.record("a", "m", Verdict(Outcome.UPSTREAM_ERROR, provider_wide=True))
    assert pool.choose("m").name == "a"


def test_a_probe_never_reported_frees_its_slot_after_the_probe_timeout():
    pool, clock = make_pool(("a",), HealthPolicy(probe_timeout=60))
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
    pool, clock = make_pool(("a",), HealthPolicy(max_models=50, idle_expiry=3600))
    for i in range(10_000):
        pool.choose(f"model-{i}")
        pool.record("a", f"model-{i}", Verdict(Outcome.PERMISSION_ERROR))
    assert len(pool._cursors) == 50
    assert pool.entry_count() <= 50
    clock.advance(3600 * 3)
    pool.sweep()
    assert pool.entry_count() == 0


def test_adopt_keeps_health_for_unchanged_keys_only():
    old, clock = make_pool(("a", "b"))
    old.record("a", "m", Verdict(Outcome.RATE_LIMITED, retry_after=100))
    old.record("b", "m", Verdict(Outcome.RATE_LIMITED, retry_after=100))
    new = KeyPool("openai", [Key("a", "secret-a-0000"), Key("b", "rotated")], HealthPolicy(), clock)
    new.adopt(old, unchanged={"a"})
    assert new.choose("m").name == "b"
    assert new.choose("m").name == "b"
