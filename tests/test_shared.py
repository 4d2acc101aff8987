"""What pods tell each other, pure: the facts' validation and the merge rules, with an injected clock."""

from __future__ import annotations

import json

import pytest

from sidecar.classify import SUCCESS, Verdict
from sidecar.health import ALL_MODELS, Change, HealthSettings, KeyState, LocalHealth
from sidecar.outcome import Outcome
from sidecar.shared import CLEAR, OWN, REST, SATURATED, Fact, Invalid, decode, fingerprint
from tests.test_plan import Clock

SETTINGS = HealthSettings()
SALT = b"0123456789abcdef" * 4
SECRET = "sk-live-abcdefghijklmnopqrstuvwx"
FP = fingerprint(SALT, SECRET)
KNOWN = {FP}


def raw(**fields: object) -> bytes:
    body = {"v": 1, "pod": "pod-a", "k": FP, "s": "gpt-4o", "op": "rest", "why": "rate_limited", "ttl": 30, "n": 1}
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


# -- identity ----------------------------------------------------------------------------------


def test_a_fingerprint_names_the_secret_without_holding_any_of_it() -> None:
    assert len(FP) == 32 and fingerprint(SALT, SECRET) == FP
    assert fingerprint(SALT, SECRET + "x") != FP
    assert fingerprint(b"another salt", SECRET) != FP
    assert not any(SECRET[i : i + 6] in FP for i in range(len(SECRET) - 5))


def test_a_fact_round_trips_and_holds_no_name_nor_secret() -> None:
    fact = Fact("pod-a", FP, "gpt-4o", REST, "rate_limited", 12.3456, 2)
    encoded = fact.encode()
    assert decode(encoded, KNOWN, SETTINGS) == Fact("pod-a", FP, "gpt-4o", REST, "rate_limited", 12.346, 2)
    assert SECRET.encode() not in encoded
    clear = Fact("pod-b", FP, "*", CLEAR)
    assert decode(clear.encode(), KNOWN, SETTINGS) == clear


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        b"not json",
        b"[]",
        b"{}",
        raw(v=2),
        raw(pod=""),
        raw(pod="p" * 65),
        raw(k="ABC"),
        raw(k=FP[:-1] + "g"),
        raw(s=""),
        raw(s="m" * 257),
        raw(op="delete"),
        raw(why="success"),
        raw(why="client_error"),
        raw(why="permission_error", s="*"),  # a model's reason for the whole key
        raw(why="saturated", s="*"),
        raw(ttl=0),
        raw(ttl=-5),
        raw(ttl="30"),
        raw(ttl=True),
        raw(n=31),
        raw(n="1"),
        b'{"v":1,"pod":"p","k":"' + FP.encode() + b'","s":"m","op":"rest","why":"timeout","ttl":1e999}',
        b" " * 2000,
        b"[" * 600 + b"]" * 600,
    ],
)
def test_a_malformed_or_greedy_message_is_invalid(message: bytes) -> None:
    with pytest.raises(Invalid):
        decode(message, KNOWN, SETTINGS)


def test_an_ownership_fact_names_a_resource_id_and_nothing_else() -> None:
    own = Fact("pod-a", FP, "resp_abc123", OWN)
    assert decode(own.encode(), KNOWN, SETTINGS) == own
    assert decode(Fact("pod-a", FP, "files/abc-123", OWN).encode(), KNOWN, SETTINGS) is not None
    for bad in ("../etc", "resp abc", "resp_\n", "-x", "x" * 257):
        with pytest.raises(Invalid):
            decode(Fact("pod-a", FP, bad, OWN).encode(), KNOWN, SETTINGS)
    assert decode(Fact("pod-a", "0" * 32, "resp_1", OWN).encode(), KNOWN, SETTINGS) is None


def test_a_fact_about_a_key_this_pod_does_not_hold_is_ignored() -> None:
    assert decode(raw(k="0" * 32), KNOWN, SETTINGS) is None
    assert decode(Fact("p", "0" * 32, "*", CLEAR).encode(), KNOWN, SETTINGS) is None


@pytest.mark.parametrize(
    ("why", "scope", "longest"),
    [
        ("credential_error", "*", SETTINGS.credential_cooldown_max),
        ("rate_limited", "*", SETTINGS.quota_cooldown),
        ("rate_limited", "gpt-4o", max(SETTINGS.rate_limit_cooldown_max, SETTINGS.quota_window_max)),
        ("permission_error", "gpt-4o", SETTINGS.model_cooldown_max),
        ("upstream_error", "gpt-4o", SETTINGS.failure_cooldown_max),
        ("timeout", "gpt-4o", SETTINGS.failure_cooldown_max),
        ("connection_error", "gpt-4o", SETTINGS.failure_cooldown_max),
        (SATURATED, "gpt-4o", SETTINGS.rate_limit_cooldown_max),
    ],
)
def test_durations_are_capped_by_this_pods_own_settings(why: str, scope: str, longest: float) -> None:
    fact = decode(raw(why=why, s=scope, ttl=10**9), KNOWN, SETTINGS)
    assert fact is not None and fact.ttl == longest


# -- merge rules --------------------------------------------------------------------------------


def health(clock: Clock) -> LocalHealth:
    return LocalHealth(["a", "b"], SETTINGS, clock)


def test_the_later_deadline_wins_and_a_rest_is_never_shortened() -> None:
    clock = Clock()
    record = health(clock)
    assert record.rest("a", "m", Outcome.RATE_LIMITED, 60, 1)
    assert not record.rest("a", "m", Outcome.RATE_LIMITED, 1, 0)  # a shorter one says nothing new
    assert record.blocker("a", "m").until == clock.now + 60  # type: ignore[union-attr]
    assert record.rest("a", "m", Outcome.RATE_LIMITED, 90, 0)
    assert record.blocker("a", "m").until == clock.now + 90  # type: ignore[union-attr]


def test_a_re_cooled_key_keeps_the_longer_deadline_whichever_arrives_first() -> None:
    """LiteLLM's bug: Retry-After 1 then a 60 s cooldown put the key back after 1 s."""
    clock = Clock()
    record = health(clock)
    record.record("a", "m", Verdict(Outcome.RATE_LIMITED, retry_after=60))
    record.rest("a", "m", Outcome.RATE_LIMITED, 1, 0)
    clock.now += 2
    assert not record.usable("a", "m")


def test_only_a_proven_success_ends_a_rest_early() -> None:
    clock = Clock()
    record = health(clock)
    record.rest("a", ALL_MODELS, Outcome.CREDENTIAL_ERROR, 600, 1)
    assert not record.usable("a", "m")
    assert record.clear("a", ALL_MODELS)
    assert record.usable("a", "m")
    assert not record.clear("a", ALL_MODELS)  # nothing left to clear


def test_a_rest_from_the_fleet_is_half_open_when_it_ends_and_counts_its_strikes() -> None:
    clock = Clock()
    record = health(clock)
    record.rest("a", "m", Outcome.UPSTREAM_ERROR, 30, 3)
    clock.now += 30
    assert record.admit("a", "m")  # the probe
    assert not record.admit("a", "m")  # only one
    record.record("a", "m", Verdict(Outcome.UPSTREAM_ERROR))
    # the next cooldown doubles from the fleet's strikes: 30 s x 2**3
    assert record.blocker("a", "m").until == clock.now + 240  # type: ignore[union-attr]


def test_another_pods_probe_lease_holds_the_key_here() -> None:
    clock = Clock()
    record = health(clock)
    record.rest("a", "m", Outcome.RATE_LIMITED, 10, 0)
    clock.now += 10
    record.hold("a", "m", clock.now + 30)
    assert not record.usable("a", "m")
    assert record.resting("a", "m") == (clock.now + 30, True, False)
    assert record.held("a", "m") == clock.now + 30
    record.hold("b", "m", clock.now + 30)  # nothing resting: nothing held
    assert record.usable("b", "m")

    record.release("a", "m")  # this pod won the lease: half-open here, and its one probe
    assert record.admit("a", "m")
    assert record.resting("a", "m") == (clock.now, True, True)
    assert not record.admit("a", "m")


def test_winning_the_lease_before_the_rest_ends_keeps_the_rest() -> None:
    """The lease is contested a moment before the rest ends: winning it ends the hold, not the rest."""
    clock = Clock()
    record = health(clock)
    record.rest("a", "m", Outcome.RATE_LIMITED, 1.0, 0)
    clock.now += 0.5
    record.hold("a", "m", clock.now + 1.0)  # the round is open
    record.release("a", "m")  # ... and this pod won it
    assert not record.usable("a", "m")
    assert record.blocker("a", "m").until == clock.now + 0.5  # type: ignore[union-attr]
    clock.now += 0.5
    assert record.admit("a", "m")  # then its probe


def test_a_release_never_ends_a_rest_of_the_keys_own() -> None:
    clock = Clock()
    record = health(clock)
    record.rest("a", "m", Outcome.RATE_LIMITED, 10, 0)
    clock.now += 10
    record.hold("a", "m", clock.now + 30)
    record.rest("a", "m", Outcome.RATE_LIMITED, 60, 1)  # a new 429 while held: a rest of its own
    record.release("a", "m")
    assert record.blocker("a", "m").until == clock.now + 60  # type: ignore[union-attr]


def test_what_this_pod_learns_is_told_to_the_watcher_once_per_change() -> None:
    clock = Clock()
    record = health(clock)
    told: list[Change] = []
    record.watcher = told.append
    record.record("a", "m", Verdict(Outcome.CREDENTIAL_ERROR, key_wide=True))
    record.record("b", "m", Verdict(Outcome.UPSTREAM_ERROR))  # one failure: nothing to tell
    record.record("b", "m", Verdict(Outcome.RATE_LIMITED, retry_after=20))
    record.rest("b", "x", Outcome.RATE_LIMITED, 5)  # learned from the fleet: not told back
    clock.now += 600
    record.admit("a", "m")
    record.record("a", "m", SUCCESS)  # the probe passed
    assert told == [
        Change("a", ALL_MODELS, False, Outcome.CREDENTIAL_ERROR, 600.0, 1),
        Change("b", "m", False, Outcome.RATE_LIMITED, 20.0, 1),
        Change("a", ALL_MODELS, True),
    ]
    assert record.blocker("a", "m") is None
    assert [s.state for s in record.statuses() if s.key == "a"] == [KeyState.USABLE]
