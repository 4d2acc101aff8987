"""Properties of the health policy, over the pure core (sidecar/health.py) with a fake clock.

Each test drives a Pool through sequences of operations as the proxy does: a request picks a
key (`choose`), and reports its verdict later (`record`), with other requests, clock steps and
sweeps in between.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sidecar.classify import Verdict
from sidecar.health import HealthSettings
from sidecar.keys import Key
from sidecar.outcome import Outcome
from tests.pools import Pool

# Derandomized, so a run fails or passes the same way every time; no example database on disk.
PROPERTY = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

KEY_NAMES = ("k0", "k1", "k2", "k3")
POLICY = HealthSettings(
    failure_threshold=2,
    failure_cooldown=10.0, failure_cooldown_max=80.0,
    credential_cooldown=100.0, credential_cooldown_max=800.0,
    model_cooldown=50.0, model_cooldown_max=400.0,
    rate_limit_cooldown=5.0, rate_limit_cooldown_max=60.0,
    quota_cooldown=300.0,
    probe_timeout=30.0,
    idle_expiry=120.0,
    max_models=4,
)

SCOPED = [
    Verdict(Outcome.UPSTREAM_ERROR),
    Verdict(Outcome.TIMEOUT),
    Verdict(Outcome.CONNECTION_ERROR),
    Verdict(Outcome.PERMISSION_ERROR),
    Verdict(Outcome.RATE_LIMITED),
    Verdict(Outcome.RATE_LIMITED, retry_after=3.0),
    Verdict(Outcome.RATE_LIMITED, retry_after=1e9),
]
KEY_WIDE = [
    Verdict(Outcome.CREDENTIAL_ERROR, key_wide=True),
    Verdict(Outcome.RATE_LIMITED, key_wide=True),  # insufficient_quota
]
HARMLESS = [
    Verdict(Outcome.SUCCESS),
    Verdict(Outcome.CLIENT_ERROR),
    Verdict(Outcome.CLIENT_DISCONNECTED),
    Verdict(Outcome.UPSTREAM_ERROR, provider_wide=True),
]
VERDICTS = SCOPED + KEY_WIDE + HARMLESS


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pool_of(keys: list[Key], policy: HealthSettings = POLICY) -> tuple[Pool, Clock]:
    clock = Clock()
    return Pool(keys, policy, clock), clock


def plain_keys(count: int = len(KEY_NAMES)) -> list[Key]:
    return [Key(name, f"secret-{name}-0000") for name in KEY_NAMES[:count]]


def least_rest(verdict: Verdict, policy: HealthSettings) -> float:
    """The shortest rest a verdict can impose (0 for those that impose none by themselves)."""
    outcome = verdict.outcome
    if outcome is Outcome.CREDENTIAL_ERROR:
        return policy.credential_cooldown
    if outcome is Outcome.RATE_LIMITED and verdict.key_wide:
        return policy.quota_cooldown
    if outcome is Outcome.RATE_LIMITED:
        asked = verdict.retry_after
        return min(asked, policy.rate_limit_cooldown_max) if asked else policy.rate_limit_cooldown
    if outcome is Outcome.PERMISSION_ERROR:
        return policy.model_cooldown
    return 0.0


# -- operations --------------------------------------------------------------------------------

models = st.sampled_from(["gpt-4o", "gpt-4o-mini", "o1", "o3", "gpt-5", "claude", "gemini"])


@dataclass
class Pick:
    model: str


@dataclass
class Finish:
    index: int  # which pending request (modulo how many there are)
    verdict: Verdict


@dataclass
class Wait:
    seconds: float


@dataclass
class Sweep:
    pass


picks = st.builds(Pick, models)
finishes = st.builds(Finish, st.integers(0, 7), st.sampled_from(VERDICTS))
# Short waits, so that rests are often still running at the next pick.
operations = st.lists(
    st.one_of(picks, finishes, st.builds(Wait, st.floats(0.0, 5.0)), st.just(Sweep())),
    min_size=20,
    max_size=120,
)


@dataclass
class Run:
    """Plays operations on a pool, keeping every pick and every verdict with when it happened."""

    pool: Pool
    clock: Clock
    failing_model: str | None = None  # when set, every other model's verdicts are successes
    pending: list[tuple[str, str]] = field(default_factory=list)  # (key, model) picked, not yet finished
    picks: list[tuple[float, str, str]] = field(default_factory=list)  # (time, model, key)
    records: list[tuple[int, float, str, str, Verdict]] = field(default_factory=list)  # (picks before it, ...)

    def play(self, ops: list[object]) -> None:
        for op in ops:
            if isinstance(op, Pick):
                key = self.pool.choose(op.model)
                if key is not None:
                    self.picks.append((self.clock.now, op.model, key.name))
                    self.pending.append((key.name, op.model))
            elif isinstance(op, Finish) and self.pending:
                key_name, model = self.pending.pop(op.index % len(self.pending))
                verdict = op.verdict
                if self.failing_model not in (None, model):
                    verdict = Verdict(Outcome.SUCCESS)
                self.pool.record(key_name, model, verdict)
                self.records.append((len(self.picks), self.clock.now, key_name, model, verdict))
            elif isinstance(op, Wait):
                self.clock.now += op.seconds
            elif isinstance(op, Sweep):
                self.pool.sweep()


def picked_while_resting(run: Run, *, key_wide_only: bool = False) -> list[tuple[float, str, str]]:
    """Picks made while a verdict recorded earlier still asked that key to rest for that model."""
    wrong = []
    for index, (at, model, key) in enumerate(run.picks):
        for picks_before, when, rec_key, rec_model, verdict in run.records:
            if rec_key != key or picks_before > index or (key_wide_only and not verdict.key_wide):
                continue
            applies = verdict.key_wide or rec_model == model
            if applies and at < when + least_rest(verdict, run.pool.health.settings):
                wrong.append((at, model, key))
    return wrong


# -- the properties ----------------------------------------------------------------------------


@PROPERTY
@given(operations)
def test_a_key_disabled_for_every_model_is_never_chosen_before_its_time(ops: list[object]) -> None:
    run = Run(*pool_of(plain_keys()))
    run.play(ops)
    assert picked_while_resting(run, key_wide_only=True) == []


@PROPERTY
@given(operations)
def test_a_key_cooling_for_a_model_is_never_chosen_for_it_before_its_time(ops: list[object]) -> None:
    """Whatever else happens meanwhile: other models, sweeps, late verdicts (every model fits
    in max_models here; the next test adds more)."""
    run = Run(*pool_of(plain_keys(), replace(POLICY, max_models=7)))
    run.play(ops)
    assert picked_while_resting(run) == []


# Four other models picked while gpt-4o rests push gpt-4o out of the cursors (max_models 4).
EVICTED_WHILE_RESTING = [
    Pick("gpt-4o"),
    Finish(0, Verdict(Outcome.PERMISSION_ERROR)),
    *(Pick(m) for m in ("o1", "o3", "gpt-5", "claude")),
    Pick("gpt-4o"),
]


@PROPERTY
@example(EVICTED_WHILE_RESTING)
@given(operations)
def test_a_rest_outlives_any_number_of_other_models_coming_and_going(ops: list[object]) -> None:
    """Only gpt-4o ever fails, so there is always a model with nothing resting to forget when
    more than max_models (4) models are in use: gpt-4o's rests must be kept."""
    run = Run(*pool_of(plain_keys()), failing_model="gpt-4o")
    run.play(ops)
    assert picked_while_resting(run) == []


@PROPERTY
@given(
    st.lists(st.one_of(st.none(), st.sets(models, min_size=1, max_size=3)), min_size=1, max_size=4),
    operations,
)
def test_a_key_is_never_chosen_for_a_model_outside_its_allow_list(
    allow: list[set[str] | None], ops: list[object]
) -> None:
    keys = [Key(KEY_NAMES[i], f"secret-{i}-0000", None if a is None else frozenset(a)) for i, a in enumerate(allow)]
    run = Run(*pool_of(keys))
    run.play(ops)
    allowed = {key.name: key.models for key in keys}
    wrong = [(model, key) for _, model, key in run.picks if allowed[key] is not None and model not in allowed[key]]
    assert wrong == []


@PROPERTY
@given(
    st.lists(st.one_of(st.none(), st.sets(models, min_size=1, max_size=3)), min_size=1, max_size=4),
    operations,
    models,
)
def test_no_key_is_answered_only_when_every_allowed_key_is_resting(
    allow: list[set[str] | None], ops: list[object], model: str
) -> None:
    keys = [Key(KEY_NAMES[i], f"secret-{i}-0000", None if a is None else frozenset(a)) for i, a in enumerate(allow)]
    run = Run(*pool_of(keys))
    run.play(ops)
    blocked = {status.key for status in run.pool.blocking(model)}
    allowed = {key.name for key in keys if key.allows(model)}
    chosen = run.pool.choose(model)
    if chosen is None:
        assert allowed <= blocked
    else:
        assert chosen.name in allowed - blocked


@PROPERTY
@given(
    st.integers(1, 4),
    st.sets(st.sampled_from(KEY_NAMES), max_size=3),
    st.integers(1, 5),
    st.lists(models, max_size=30),
)
def test_selection_is_fair_among_usable_keys(
    count: int, disabled: set[str], rounds: int, interleaved: list[str]
) -> None:
    """Over `rounds` x (usable keys) picks, each usable key is picked exactly `rounds` times,
    whatever other models are picked in between."""
    pool, _ = pool_of(plain_keys(count))
    for name in disabled & set(KEY_NAMES[:count]):
        pool.record(name, "gpt-4o", KEY_WIDE[0])
    usable = [name for name in KEY_NAMES[:count] if name not in disabled]
    picks: Counter[str] = Counter()
    others = iter(interleaved)
    for _ in range(rounds * len(usable)):
        other = next(others, None)
        if other is not None and other != "gpt-4o":
            pool.choose(other)
        key = pool.choose("gpt-4o")
        assert key is not None
        picks[key.name] += 1
        pool.record(key.name, "gpt-4o", Verdict(Outcome.SUCCESS))
    assert picks == {name: rounds for name in usable}
    if not usable:
        assert pool.choose("gpt-4o") is None


@PROPERTY
@given(operations, st.lists(st.tuples(st.sampled_from(KEY_NAMES), st.sampled_from(SCOPED)), max_size=40))
def test_a_key_failing_for_one_model_never_changes_another_models_choice(
    ops: list[object], failures: list[tuple[str, Verdict]]
) -> None:
    """Two pools live the same life for every model but "o1"; one of them also hears, between
    operations, of failures of any key for "o1". Every pick for the other models is the same.
    (Room for every model: under max_models pressure, tracking "o1" may push another model
    out, which is memory policy, not health.)"""
    ops = [op for op in ops if not (isinstance(op, Pick) and op.model == "o1")]
    roomy = replace(POLICY, max_models=8)
    quiet, noisy = Run(*pool_of(plain_keys(), roomy)), Run(*pool_of(plain_keys(), roomy))
    extra = iter(failures)
    for op in ops:
        quiet.play([op])
        noisy.play([op])
        failure = next(extra, None)
        if failure is not None:
            noisy.pool.record(failure[0], "o1", failure[1])
    assert noisy.picks == quiet.picks


@PROPERTY
# 30 requests for 30 models in flight at once: each verdict arrives after its model's cursor left.
@example([f"m{i}" for i in range(30)], [Verdict(Outcome.PERMISSION_ERROR)], 30)
@given(
    st.lists(st.one_of(st.text(max_size=40), models), min_size=30, max_size=300),
    st.lists(st.sampled_from(VERDICTS), min_size=1, max_size=20),
    st.integers(1, 64),
)
def test_state_stays_bounded_whatever_model_names_arrive(
    names: list[str], verdicts: list[Verdict], concurrency: int
) -> None:
    """Requests for these model names, `concurrency` of them in flight, each verdict reported
    when the oldest request ends: at most max_models cursors, and entries for at most
    max_models models plus the key-wide ones, at every moment."""
    pool, _ = pool_of(plain_keys())
    in_flight: list[tuple[str, str]] = []
    worst_entries = worst_cursors = 0
    for i, name in enumerate(names + [None] * concurrency):  # type: ignore[list-item]
        if name is not None:
            key = pool.choose(name)
            if key is not None:
                in_flight.append((key.name, name))
        if in_flight and (len(in_flight) >= concurrency or name is None):
            key_name, model = in_flight.pop(0)
            pool.record(key_name, model, verdicts[i % len(verdicts)])
        worst_entries = max(worst_entries, pool.entry_count())
        worst_cursors = max(worst_cursors, len(pool.selector._current))
    assert worst_cursors <= POLICY.max_models
    assert worst_entries <= len(KEY_NAMES) * (POLICY.max_models + 1)
