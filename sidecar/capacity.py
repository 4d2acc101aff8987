"""Capacity: how much room each (key, model) has left, so no request is spent on an exhausted key.

Two sources, one record per provider:

- what the provider says on every answer (`x-ratelimit-*` from OpenAI, Azure and compatible
  hosts, `anthropic-ratelimit-*` from Anthropic): a limit, what remains and when it is full
  again, for requests and for tokens. Between two answers the record keeps the room up to date
  itself: each request sent takes one request and its estimated tokens, and the room refills
  at the pace the provider's own numbers imply (limit - remaining over the time to reset), as
  the token buckets of OpenAI and Anthropic do;
- what the config says for hosts that send no headers (Gemini, Bedrock-style hosts): a key's
  `rpm` and `tpm`, counted here over a sliding minute.

A (key, model) whose room is short of what the next request needs is *saturated* until the
time the room will hold it. Selection passes it over (`ready_at`), and the plan waits for it or
answers 429 with the time it will be ready. This is capacity, not health: the record never
judges a key, and health never counts requests (Envoy keeps its outlier detector apart from
its load balancer the same way).

Plain Python with an injected clock, bounded like the health record.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass

from sidecar.classify import parse_duration, seconds_until
from sidecar.health import ALL_MODELS, Clock, KeyState, KeyStatus, Scope
from sidecar.keys import Key

REQUESTS, TOKENS = "requests", "tokens"  # the limit kinds a provider reports
RPM, TPM = "rpm", "tpm"  # the limits a key's config sets
WINDOW = 60.0  # seconds: what rpm and tpm count over
_LOCAL_ENTRIES = 100_000  # the most sends one key's sliding window remembers


# -- what the provider says ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Window:
    """One limit as an answer reported it."""

    remaining: float
    limit: float | None = None
    reset: float | None = None  # seconds until it is whole again


@dataclass(frozen=True, slots=True)
class Report:
    """The rate-limit headers of one answer: None for a kind the answer did not report."""

    requests: Window | None = None
    tokens: Window | None = None


ReportParser = Callable[[Mapping[str, str], float], Report | None]


def _amount(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _window(remaining: str | None, limit: str | None, reset: float | None) -> Window | None:
    left = _amount(remaining)
    if left is None:
        return None
    top = _amount(limit)
    if top is not None and (top < left or top == 0):
        top = None  # inconsistent: trust only what remains
    if reset is not None and not (math.isfinite(reset) and reset >= 0):
        reset = None
    return Window(left, top, reset)


def _duration(text: str | None) -> float | None:
    if text is None:
        return None
    seconds = parse_duration(text)
    if seconds is None:
        seconds = _amount(text)  # some compatible hosts send plain seconds
    return seconds


def openai_report(headers: Mapping[str, str], now_wall: float) -> Report | None:
    """`x-ratelimit-{limit,remaining,reset}-{requests,tokens}`: OpenAI, Azure, Groq and the
    other OpenAI-compatible hosts. Resets are durations (`6m0s`, `120ms`)."""
    get = headers.get
    requests = get("x-ratelimit-remaining-requests")
    tokens = get("x-ratelimit-remaining-tokens")
    if requests is None and tokens is None:
        return None
    report = Report(
        _window(requests, get("x-ratelimit-limit-requests"), _duration(get("x-ratelimit-reset-requests"))),
        _window(tokens, get("x-ratelimit-limit-tokens"), _duration(get("x-ratelimit-reset-tokens"))),
    )
    return report if report.requests or report.tokens else None


_ANTHROPIC_TOKEN_KINDS = ("tokens", "input-tokens", "output-tokens")


def anthropic_report(headers: Mapping[str, str], now_wall: float) -> Report | None:
    """`anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}`.
    Resets are RFC 3339 times; of the token limits, the one with the least room is the tokens'."""
    get = headers.get
    requests = get("anthropic-ratelimit-requests-remaining")
    windows = []
    for kind in _ANTHROPIC_TOKEN_KINDS:
        raw = get(f"anthropic-ratelimit-{kind}-remaining")
        if raw is not None:
            reset = _when(get(f"anthropic-ratelimit-{kind}-reset"), now_wall)
            found = _window(raw, get(f"anthropic-ratelimit-{kind}-limit"), reset)
            if found is not None:
                windows.append(found)
    if requests is None and not windows:
        return None
    report = Report(
        _window(
            requests,
            get("anthropic-ratelimit-requests-limit"),
            _when(get("anthropic-ratelimit-requests-reset"), now_wall),
        ),
        min(windows, key=lambda w: w.remaining) if windows else None,
    )
    return report if report.requests or report.tokens else None


def _when(text: str | None, now_wall: float) -> float | None:
    if text is None:
        return None
    seconds = seconds_until(text, now_wall)
    return None if seconds is None else max(seconds, 0.0)


REPORTS: dict[str, ReportParser] = {"openai": openai_report, "anthropic": anthropic_report}


# -- what the next request needs -------------------------------------------------------------

_MAX_OUTPUT = re.compile(rb'"(?:max_tokens|max_output_tokens|max_completion_tokens|maxOutputTokens)"\s*:\s*(\d{1,9})')


def estimate_tokens(body: bytes, size: int | None = None) -> int:
    """The tokens a request is likely to use: its prompt bytes / 4 plus the output it allows
    (`max_tokens`, `max_output_tokens`, `max_completion_tokens`, Gemini's `maxOutputTokens`).

    `body` is the request body, or the head of a spooled one with `size` its whole length."""
    total = len(body) if size is None else size
    found = _MAX_OUTPUT.search(body) if b"ax" in body else None
    return total // 4 + (int(found.group(1)) if found is not None else 0)


# -- the record ------------------------------------------------------------------------------


_SHARE_STEP = 0.2  # how fast the estimate of this pod's share of a limit follows each answer
_MIN_SHARE = 0.05


@dataclass(slots=True)
class Budget:
    """The room of one limit of one (key, model), kept up to date between answers.

    The provider refills a limit for everyone who uses the key: other pods, other apps. So the
    room refills here at this pod's share of the provider's pace, the share learned from each
    answer: of what the room lost since the last answer, how much this pod took."""

    level: float  # the room at `at`
    at: float
    limit: float | None
    rate: float | None  # refill per second, implied by the provider's limit, remaining and reset
    full_at: float | None  # when the provider said it is whole again
    share: float = 1.0  # this pod's share of what the limit's users take
    taken: float = 0.0  # what this pod took since the last answer
    alone: float = 0.0  # the room at `at` had this pod been the limit's only user

    def room(self, now: float) -> float:
        rate, limit = self.rate, self.limit
        if rate is not None and limit is not None:
            return min(limit, self.level + rate * self.share * (now - self.at))
        if self.full_at is not None and now >= self.full_at:
            return limit if limit is not None else math.inf
        return self.level

    def _alone(self, now: float) -> float:
        rate, limit = self.rate, self.limit
        if rate is None or limit is None:
            return self.alone
        return min(limit, self.alone + rate * (now - self.at))

    def take(self, amount: float, now: float) -> None:
        self.alone = self._alone(now) - amount
        self.level = self.room(now) - amount
        self.taken += amount
        self.at = now

    def ready(self, need: float, now: float) -> float | None:
        """When the room holds `need`: None now (or when nothing says when: the provider will)."""
        have = self.room(now)
        if have >= need or (self.limit is not None and need > self.limit):
            return None  # a request larger than the whole limit is the provider's to refuse
        if self.rate:
            return now + (need - have) / (self.rate * self.share)
        if self.full_at is not None and self.full_at > now:
            return self.full_at
        return None

    def refilled(self, remaining: float, now: float) -> float | None:
        """When the provider's room (for all its users), `remaining` when it answered, holds one
        request again at its own pace: what a saturation tells the fleet (each pod's share of that
        room is each pod's own estimate). None when nothing says when."""
        if remaining >= 1:
            return None
        if self.rate:
            return now + (1 - remaining) / self.rate
        return self.full_at if self.full_at is not None and self.full_at > now else None

    def learn(self, window: Window, behind: float, now: float) -> None:
        """A fresher report: what remained when the provider answered, less what was sent since."""
        actual = window.remaining - behind
        if self.rate is not None and self.limit is not None:
            others = max(self._alone(now) - actual, 0.0)  # what the key's other users took
            if self.taken + others > 0:
                sample = self.taken / (self.taken + others)
                self.share = max(_MIN_SHARE, self.share + _SHARE_STEP * (sample - self.share))
        limit, reset = window.limit, window.reset
        self.limit = limit if limit is not None else self.limit
        if limit is None:
            self.rate = None
        elif reset is not None and reset > 0 and limit > window.remaining:
            used = limit - window.remaining
            if used >= 2:
                # Providers round what remains down: it is anywhere in [remaining, remaining + 1),
                # and the middle keeps a small limit's pace from being overestimated by a fifth.
                self.rate = (used - 0.5) / reset
            elif self.rate is None:
                self.rate = used / reset
        self.full_at = None if reset is None else now + reset
        self.alone = actual
        # What remains is there for every user of the key: this pod counts on its share of it.
        self.level = math.floor(actual * self.share) if actual > 0 else actual  # whole requests
        self.taken = 0.0
        self.at = now


def _learned(budget: Budget | None, window: Window, behind: float, now: float) -> Budget:
    """The budget after a report: the one kept so far, or a new one for a first report."""
    if budget is None:
        budget = Budget(0.0, now, None, None, None)
    budget.learn(window, behind, now)
    return budget


@dataclass(slots=True)
class Room:
    """One (key, model): its reported budgets and what was sent to it, numbered."""

    used: float = 0.0  # when a request was last sent or answered
    sent: int = 0  # requests sent, ever
    sent_tokens: int = 0  # their estimated tokens, ever
    reported: int = 0  # the number of the newest request whose answer was learned
    requests: Budget | None = None
    tokens: Budget | None = None
    held_until: float = 0.0  # another pod found it out of requests: none go to it before this
    announced: float = 0.0  # the end of the last saturation this pod told its fleet of

    @property
    def empty(self) -> bool:
        """Nothing learned: no budget, no hold."""
        return self.requests is None and self.tokens is None and not self.held_until


@dataclass(frozen=True, slots=True)
class Ticket:
    """A request sent: its number for its (key, model), and the tokens sent up to it."""

    number: int
    tokens: int


_UNREPORTED = Ticket(0, 0)  # a request to a provider that reports no limits: nothing to learn


class _Local:
    """A key's configured rpm and tpm, counted over a sliding minute: this pod's sends, plus what
    the rest of its fleet sent with the same key in the last minute (when a shared store says)."""

    __slots__ = ("others", "others_tokens", "rpm", "sends", "tokens", "tpm", "unshared", "unshared_tokens")

    def __init__(self, rpm: int | None, tpm: int | None) -> None:
        self.rpm, self.tpm = rpm, tpm
        self.sends: deque[tuple[float, int]] = deque()
        self.tokens = 0
        self.others = 0  # the fleet's other requests with this key in the last minute
        self.others_tokens = 0
        self.unshared = 0  # sends the fleet has not been told of yet
        self.unshared_tokens = 0

    def _prune(self, now: float) -> None:
        sends, horizon = self.sends, now - WINDOW
        while sends and (sends[0][0] <= horizon or len(sends) > _LOCAL_ENTRIES):
            self.tokens -= sends.popleft()[1]

    def take(self, tokens: int, now: float) -> None:
        self._prune(now)
        self.sends.append((now, tokens))
        self.tokens += tokens
        self.unshared += 1
        self.unshared_tokens += tokens

    def ready(self, tokens: int, now: float) -> tuple[float, str] | None:
        self._prune(now)
        sends = self.sends
        if self.rpm is not None and len(sends) + self.others >= self.rpm:
            return self._frees(len(sends) + self.others - self.rpm, now), RPM
        tpm = self.tpm
        if tpm is not None and tokens <= tpm and self.tokens + self.others_tokens + tokens > tpm:
            freed, excess = 0, self.tokens + self.others_tokens + tokens - tpm
            for at, count in sends:
                freed += count
                if freed >= excess:
                    return at + WINDOW, TPM
            return now + FLEET_STEP, TPM
        return None

    def _frees(self, surplus: int, now: float) -> float:
        """When the window drops the `surplus`+1-th oldest of this pod's sends; when it must drop
        the fleet's, the next look at the fleet's counts."""
        sends = self.sends
        return sends[surplus][0] + WINDOW if surplus < len(sends) else now + FLEET_STEP


FLEET_STEP = 5.0  # seconds: the buckets the fleet counts configured limits in


@dataclass(frozen=True, slots=True)
class Gauge:
    """One learned limit and its room now, for keymux_key_limit and keymux_key_remaining."""

    key: str
    model: str
    kind: str
    limit: float | None
    remaining: float


class Capacity:
    """The capacity record of one provider's keys."""

    def __init__(self, keys: Sequence[Key], clock: Clock, max_models: int = 1000, reported: bool = True) -> None:
        self.keys = tuple(keys)
        self._clock = clock
        self.max_models = max_models
        self.reported = reported  # whether the provider's answers report rate limits
        self._weights = {key.name: key.weight for key in keys}
        self._local = {key.name: _Local(key.rpm, key.tpm) for key in keys if key.rpm or key.tpm}
        self._rooms: OrderedDict[str, dict[str, Room]] = OrderedDict()  # model -> key -> room, LRU first
        self.avoided: dict[tuple[str, str], int] = {}  # (key, limit) -> requests kept off it
        self._learned_limits = False  # whether any answer reported a requests limit yet
        self._learned = False  # whether anything at all was learned (a budget, a hold)
        # Told when an answer leaves a (key, model) out of requests: (key, model, seconds), if any.
        self.watcher: Callable[[str, str, float], None] | None = None

    # -- asked by selection ----------------------------------------------------------------

    def ready_at(self, key: str, model: str, tokens: int) -> tuple[float, str] | None:
        """When `key` has room for a request of `tokens` for `model`, and the limit that holds
        it: None when it has room now."""
        rooms = self._rooms.get(model)
        room = rooms.get(key) if rooms else None
        local = self._local.get(key)
        if local is None and (room is None or room.empty):
            return None  # the usual case without limits: nothing to count against
        now = self._clock()
        found = None
        if room is not None:
            if room.held_until > now:
                found = (room.held_until, REQUESTS)
            if room.requests is not None and (at := room.requests.ready(1, now)) is not None:
                found = max(found, (at, REQUESTS)) if found else (at, REQUESTS)
            if tokens and room.tokens is not None and (at := room.tokens.ready(tokens, now)) is not None:
                found = max(found, (at, TOKENS)) if found else (at, TOKENS)
        if local is not None and (held := local.ready(tokens, now)) is not None:
            found = max(found, held) if found else held
        return found

    @property
    def quiet(self) -> bool:
        """Nothing to hold any key back: no configured limit, nothing learned. Selection's fast path."""
        return not self._learned and not self._local

    def skipped(self, key: str, limit: str) -> None:
        """Selection passed `key` over because `limit` holds it: a saturation avoided."""
        self.avoided[(key, limit)] = self.avoided.get((key, limit), 0) + 1

    def weights(self, model: str, keys: Sequence[Key]) -> list[float]:
        """Each key's share: the requests limit its provider reported for `model`, else its
        configured weight, scaled to the reported limits of the others so the two mix."""
        rooms = self._rooms.get(model)
        configured = self._weights
        if not rooms or not self._learned_limits:
            return [configured[key.name] for key in keys]
        learned: list[float | None] = []
        scale_sum, scale_count = 0.0, 0
        for key in keys:
            room = rooms.get(key.name)
            limit = room.requests.limit if room is not None and room.requests is not None else None
            learned.append(limit)
            if limit is not None:
                scale_sum += limit / configured[key.name]
                scale_count += 1
        scale = scale_sum / scale_count if scale_count else 1.0
        return [w if w is not None else configured[k.name] * scale for k, w in zip(keys, learned, strict=True)]

    # -- learning --------------------------------------------------------------------------

    def sent(self, key: str, model: str, tokens: int) -> Ticket:
        """A request for `model` leaves with `key`: it takes its share of the room now."""
        now = self._clock()
        local = self._local.get(key)
        if local is not None:
            local.take(tokens, now)
        if not self.reported:
            return _UNREPORTED
        room = self._room(key, model)
        room.used = now
        room.sent += 1
        room.sent_tokens += tokens
        if room.requests is not None:
            room.requests.take(1, now)
        if room.tokens is not None:
            room.tokens.take(tokens, now)
        return Ticket(room.sent, room.sent_tokens)

    def learn(self, key: str, model: str, report: Report, ticket: Ticket) -> None:
        """The provider's answer to the request `ticket` says how much room is left.

        What it says was true when it answered that request: the requests sent after it are
        taken from the room again. An answer older than one already learned says nothing new."""
        rooms = self._rooms.get(model)
        room = rooms.get(key) if rooms else None
        if room is None or ticket.number <= room.reported:
            return
        room.reported = ticket.number
        now = room.used = self._clock()
        self._learned = True
        if report.requests is not None:
            room.requests = requests = _learned(room.requests, report.requests, room.sent - ticket.number, now)
            self._learned_limits = self._learned_limits or requests.limit is not None
            # The provider says none is left: the fleet rests it too, once per saturation.
            out = report.requests.remaining < 1 and self.watcher is not None
            if out and (at := requests.refilled(report.requests.remaining, now)) is not None and at > room.announced:
                room.announced = at
                self.watcher(key, model, at - now)  # type: ignore[misc]
        if report.tokens is not None:
            room.tokens = _learned(room.tokens, report.tokens, room.sent_tokens - ticket.tokens, now)

    @property
    def limited(self) -> tuple[str, ...]:
        """The keys with a configured rpm or tpm."""
        return tuple(self._local)

    def unshared_counts(self) -> Iterator[tuple[str, int, int]]:
        """(key, requests, tokens) sent under a configured rpm/tpm since the fleet was last told."""
        for key, local in self._local.items():
            if local.unshared:
                yield key, local.unshared, local.unshared_tokens
                local.unshared = local.unshared_tokens = 0

    def fleet_counts(self, key: str, requests: int, tokens: int) -> None:
        """The whole fleet sent `requests` and `tokens` with `key` in the last minute: the others'
        part counts toward its rpm and tpm here."""
        local = self._local.get(key)
        if local is not None:
            local._prune(self._clock())
            local.others = max(requests - len(local.sends), 0)
            local.others_tokens = max(tokens - local.tokens, 0)

    def hold(self, key: str, model: str, seconds: float) -> None:
        """Another pod's answer left (key, model) with no request: none go to it for `seconds`."""
        if not self.reported:
            return
        room = self._room(key, model)
        room.held_until = max(room.held_until, self._clock() + seconds)
        self._learned = True

    def _room(self, key: str, model: str) -> Room:
        rooms = self._rooms
        entries = rooms.get(model)
        if entries is None:
            if len(rooms) >= self.max_models:
                rooms.popitem(last=False)
            entries = rooms[model] = {}
        else:
            rooms.move_to_end(model)
        room = entries.get(key)
        if room is None:
            room = entries[key] = Room()
        return room

    # -- reporting and upkeep --------------------------------------------------------------

    def blocker(self, key: str, model: str, tokens: int) -> KeyStatus | None:
        """Why `key` has no room for `model` now, as a row of the health table."""
        held = self.ready_at(key, model, tokens)
        return None if held is None else _saturated(key, model, held)

    def statuses(self) -> Iterator[KeyStatus]:
        """A row for every key held by its rpm or tpm (every model), then every (key, model)
        whose reported room is short of one request, or of one token, now."""
        now = self._clock()
        for key, local in self._local.items():
            if (held := local.ready(0, now)) is not None:
                yield _saturated(key, ALL_MODELS, held)
        for model, rooms in self._rooms.items():
            for key, room in rooms.items():
                short: list[tuple[float, str]] = [
                    (at, kind)
                    for kind, budget in ((REQUESTS, room.requests), (TOKENS, room.tokens))
                    if budget is not None and (at := budget.ready(1, now)) is not None
                ]
                if room.held_until > now:
                    short.append((room.held_until, REQUESTS))
                if short:
                    yield _saturated(key, model, max(short))

    def gauges(self) -> Iterator[Gauge]:
        now = self._clock()
        for model, rooms in self._rooms.items():
            for key, room in rooms.items():
                for kind, budget in ((REQUESTS, room.requests), (TOKENS, room.tokens)):
                    if budget is not None:
                        yield Gauge(key, model, kind, budget.limit, max(budget.room(now), 0.0))

    def sweep(self, idle: float) -> None:
        """Forget the rooms unused for `idle` seconds (a budget is whole again long before)."""
        horizon = self._clock() - idle
        for model in list(self._rooms):
            rooms = self._rooms[model]
            for key in [k for k, room in rooms.items() if room.used <= horizon]:
                del rooms[key]
            if not rooms:
                del self._rooms[model]

    def adopt(self, old: Capacity, unchanged: Collection[str]) -> None:
        """Keep what was learned of the keys whose name and value are unchanged."""
        keep = set(unchanged) & {key.name for key in self.keys}
        for model, rooms in old._rooms.items():
            kept = {key: room for key, room in rooms.items() if key in keep}
            if kept:
                self._rooms[model] = kept
        for key, local in old._local.items():
            if key in keep and key in self._local:
                self._local[key].sends, self._local[key].tokens = local.sends, local.tokens
        self.avoided = {k: v for k, v in old.avoided.items() if k[0] in keep}




def _saturated(key: str, scope: Scope, held: tuple[float, str]) -> KeyStatus:
    if held[1] in (RPM, TPM):
        scope = ALL_MODELS  # a configured limit counts the key's requests for every model
    return KeyStatus(key, scope, KeyState.SATURATED, held[0], 0, None, held[1])
