"""Capacity-aware selection through real sockets: a real keymux, the fake provider over loopback.

A key whose answers say it has no room left gets no request until the room is back; shares follow
the reported limits or the configured weights; a request waits briefly for a key that frees up,
and gets 429 with Retry-After (503 only when nothing recovers by itself) when none will.

Every keymux here reads an injected clock that only the test moves, except the two waiting tests,
which need the event loop's timer and so real time (under two seconds, asserting orders and
counts only). A request that would wait while an injected clock stands still would wait forever,
so the tests on an injected clock either leave a key free or set `retry.max_wait: 0`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web

from sidecar.fake_provider import FakeProvider
from tests.conftest import FakeServer, Running, StartKeymux, openai_config, provider_config
from tests.test_metrics import family, labels, settle

A = "sk-capacity-a-0000000000000000"
B = "sk-capacity-b-1111111111111111"
C = "sk-capacity-c-2222222222222222"
NAMES: dict[str | None, str] = {A: "a", B: "b", C: "c"}
MODEL = "gpt-4o-mini"
NO_WAIT = "retry:\n  max_wait: 0\n"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def requests_left(remaining: int, limit: int, reset: str) -> dict[str, str]:
    return {
        "x-ratelimit-limit-requests": str(limit),
        "x-ratelimit-remaining-requests": str(remaining),
        "x-ratelimit-reset-requests": reset,
    }


async def chat(km: Running, body: bytes | None = None, model: str = MODEL) -> tuple[int, dict[str, str], Any]:
    """One chat completion: (status, headers, JSON body). `body` is sent byte for byte."""
    if body is None:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
    headers = {"Authorization": "Bearer app-placeholder", "Content-Type": "application/json"}
    async with km.session.post(km.url + "/v1/chat/completions", data=body, headers=headers) as response:
        return response.status, dict(response.headers), await response.json()


async def statuses(km: Running, count: int) -> list[int]:
    return [(await chat(km))[0] for _ in range(count)]


def seen(fake: FakeServer) -> str:
    """The keys the provider saw, in order, by name: "abba"."""
    return "".join(NAMES[key] for key in fake.provider.keys_seen())


async def key_rows(km: Running) -> list[dict[str, Any]]:
    async with km.session.get(km.admin + "/keys") as response:
        assert response.status == 200
        return (await response.json())["keys"]


async def saturated(km: Running) -> dict[tuple[str, str], dict[str, Any]]:
    """The saturated rows of /keys, by (key, model)."""
    return {(row["key"], row["model"]): row for row in await key_rows(km) if row["state"] == "saturated"}


def seconds_from_now(iso: str) -> float:
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp() - time.time()


# -- 1. a key that says it has no room left ---------------------------------------------------


async def test_a_key_reporting_no_requests_left_on_a_success_gets_none_until_its_reset(
    fake: FakeServer, keymux: StartKeymux
) -> None:
    clock = Clock()
    km = await keymux(openai_config(fake.url, {"a": A, "b": B}), clock=clock)
    # A limit of one request, none left, whole again in 20 s: nothing more for 20 s.
    fake.provider.script(key=A, headers=requests_left(0, 1, "20s"), times=1)

    assert await statuses(km, 6) == [200] * 6
    assert seen(fake) == "a" + "b" * 5  # no 429 was spent to learn it

    rows = await saturated(km)
    assert set(rows) == {("a", MODEL)}
    row = rows[("a", MODEL)]
    assert (row["limit"], row["last_failure"]) == ("requests", None)
    assert 18 <= seconds_from_now(row["until"]) <= 21  # /keys shows whole seconds
    samples = await settle(km)
    assert samples[("keymux_key_state", labels(provider="openai", key="a", model=MODEL))] == 3
    assert samples[("keymux_key_state", labels(provider="openai", key="a", model="*"))] == 0
    assert family(samples, "keymux_saturations_total") == {labels(provider="openai", key="a", limit="requests"): 5}
    assert family(samples, "keymux_key_limit") == {labels(provider="openai", key="a", model=MODEL, kind="requests"): 1}
    assert family(samples, "keymux_key_remaining") == {
        labels(provider="openai", key="a", model=MODEL, kind="requests"): 0
    }
    assert family(samples, "keymux_upstream_attempts_total") == {
        labels(provider="openai", key="a", model=MODEL, outcome="success"): 1,
        labels(provider="openai", key="b", model=MODEL, outcome="success"): 5,
    }

    clock.now += 19.5
    assert await statuses(km, 1) == [200]
    assert seen(fake)[6:] == "b"

    clock.now += 1  # past the reset
    assert await saturated(km) == {}
    assert await statuses(km, 2) == [200, 200]
    # b's turn in the rotation comes first (a was charged for the first request, as nginx does).
    assert seen(fake)[7:] == "ba"
    # The estimate took a's one request again, and no answer since said otherwise.
    assert set(await saturated(km)) == {("a", MODEL)}
    samples = await settle(km)
    assert samples[("keymux_saturations_total", labels(provider="openai", key="a", limit="requests"))] == 6


async def test_the_room_refills_at_the_pace_the_reported_limit_implies(fake: FakeServer, keymux: StartKeymux) -> None:
    """10 requests, none left, whole in 20 s: a token bucket refilling at 10 per 20 s has room
    for one request after 2 s (a little later if the provider rounded what remains down), long
    before the 20 s the reset names."""
    clock = Clock()
    km = await keymux(openai_config(fake.url, {"a": A, "b": B}), clock=clock)
    fake.provider.script(key=A, headers=requests_left(0, 10, "20s"), times=1)

    assert await statuses(km, 3) == [200] * 3
    clock.now += 1.9  # not yet one request's room at any pace the headers allow
    assert await statuses(km, 1) == [200]
    assert seen(fake) == "abbb"
    assert set(await saturated(km)) == {("a", MODEL)}
    clock.now += 1.1  # 3 s
    assert await saturated(km) == {}
    assert await statuses(km, 3) == [200] * 3
    # Weights now 10 (reported) and 10 (b's configured 1, scaled to the reported limits): the
    # rotation gives b its owed turn, then a its one request, then b while a refills.
    assert seen(fake)[4:] == "bab"


# -- 2. a small key is not pushed into 429s ---------------------------------------------------


@pytest.fixture
async def bucketed() -> AsyncIterator[tuple[FakeServer, Clock]]:
    """The fake in bucket mode, a limits a to 4 requests/s and b to 2 (one second of burst each),
    on the same injected clock as keymux."""
    clock = Clock()
    provider = FakeProvider(buckets={A: 4, B: 2}, clock=clock)
    runner = web.AppRunner(provider.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield FakeServer(provider, f"http://127.0.0.1:{runner.addresses[0][1]}"), clock
    await runner.cleanup()


async def test_under_capacity_shares_follow_the_reported_limits_with_no_429(
    bucketed: tuple[FakeServer, Clock], keymux: StartKeymux
) -> None:
    fake, clock = bucketed
    km = await keymux(openai_config(fake.url, {"a": A, "b": B}, NO_WAIT), clock=clock)

    results = []
    for _ in range(16):  # 4 requests/s for 4 s, two thirds of the keys' 6/s
        results.append((await chat(km))[0])
        clock.now += 0.25

    assert results == [200] * 16
    # The first two requests know nothing (equal weights: a, b); from then on the reported limits
    # 4 and 2 give nginx's a, a, b pattern.
    assert seen(fake) == "ab" + "aaab" + "aab" * 3 + "a"
    assert fake.provider.stats == {A: {"served": 11}, B: {"served": 5}}
    samples = await settle(km)
    assert family(samples, "keymux_upstream_attempts_total") == {
        labels(provider="openai", key="a", model=MODEL, outcome="success"): 11,
        labels(provider="openai", key="b", model=MODEL, outcome="success"): 5,
    }
    assert family(samples, "keymux_key_limit") == {
        labels(provider="openai", key="a", model=MODEL, kind="requests"): 4,
        labels(provider="openai", key="b", model=MODEL, kind="requests"): 2,
        labels(provider="openai", key="a", model=MODEL, kind="tokens"): 1_000_000,
        labels(provider="openai", key="b", model=MODEL, kind="tokens"): 1_000_000,
    }


async def test_over_capacity_every_key_is_used_to_its_limit_and_never_past_it(
    bucketed: tuple[FakeServer, Clock], keymux: StartKeymux
) -> None:
    fake, clock = bucketed
    km = await keymux(openai_config(fake.url, {"a": A, "b": B}, NO_WAIT), clock=clock)

    results = []
    for _ in range(64):  # 16 requests/s for 4 s, against 6/s
        status, headers, body = await chat(km)
        results.append((status, headers.get("Retry-After"), body["error"]["code"] if status != 200 else None))
        clock.now += 0.0625

    # The provider refused nothing: no 429 was spent on either key.
    served = {NAMES[key]: dict(counts) for key, counts in fake.provider.stats.items()}
    assert set(served) == {"a", "b"}
    assert all(set(counts) == {"served"} for counts in served.values())
    a, b = served["a"]["served"], served["b"]["served"]
    # The most the buckets allow over [0, 3.9375] s: 4 + 4 x 3.9375 = 19.75 on a, 2 + 2 x 3.9375 =
    # 9.875 on b. keymux uses b to the last request and a to within one (the provider rounds what
    # remains down, so the estimate of a's pace starts on the safe side).
    assert (a, b) in {(18, 9), (19, 9)}
    assert results.count((200, None, None)) == a + b
    assert results.count((429, "1", "no_key_available")) == 64 - a - b
    # The burst: both buckets whole. keymux counts on whole requests of what it estimates its
    # share to be, and reads the provider's rounding down as a little taken by others, so the
    # sixth request of the burst waits for the next refill; the totals above are unchanged.
    assert results[:5] == [(200, None, None)] * 5
    samples = await settle(km)
    assert family(samples, "keymux_upstream_attempts_total") == {
        labels(provider="openai", key="a", model=MODEL, outcome="success"): a,
        labels(provider="openai", key="b", model=MODEL, outcome="success"): b,
    }
    assert family(samples, "keymux_requests_total") == {
        labels(route="/", provider="openai", model=MODEL, outcome="success"): a + b,
        labels(route="/", provider="none", model=MODEL, outcome="no_key_available"): 64 - a - b,
    }
    assert family(samples, "keymux_capacity_wait_seconds_count") == {}


# -- 3. configured weights --------------------------------------------------------------------


async def test_configured_weights_share_requests_in_proportion_interleaved(
    fake: FakeServer, keymux: StartKeymux
) -> None:
    km = await keymux(f"""
        providers:
          openai:
            type: openai
            base_url: {fake.url}
            keys:
              - {{name: a, key: {A}, weight: 2}}
              - {{name: b, key: {B}}}
        """)

    assert await statuses(km, 30) == [200] * 30
    assert seen(fake) == "aba" * 10  # 20/10, interleaved (nginx's smooth order)
    samples = await settle(km)
    assert family(samples, "keymux_saturations_total") == {}
    assert family(samples, "keymux_key_limit") == {}


async def test_equal_weights_are_a_plain_round_robin(fake: FakeServer, keymux: StartKeymux) -> None:
    km = await keymux(openai_config(fake.url, {"a": A, "b": B, "c": C}))

    assert await statuses(km, 300) == [200] * 300
    assert seen(fake) == "abc" * 100


# -- 4. waiting for a key, or 429 with Retry-After ------------------------------------------


async def test_a_request_waits_for_the_first_saturated_key_that_frees_up(fake: FakeServer, keymux: StartKeymux) -> None:
    """Real clock: a is whole again in 1.5 s, b in 0.5 s; the waiting request is b's."""
    km = await keymux(openai_config(fake.url, {"a": A, "b": B}, "retry:\n  max_wait: 2\n"))
    fake.provider.script(key=A, headers=requests_left(0, 1, "1500ms"), times=1)
    fake.provider.script(key=B, headers=requests_left(0, 1, "500ms"), times=1)

    assert await statuses(km, 2) == [200, 200]
    assert set(await saturated(km)) == {("a", MODEL), ("b", MODEL)}
    assert await statuses(km, 1) == [200]

    assert seen(fake) == "abb"  # one attempt, on the key that freed up first
    samples = await settle(km)
    assert family(samples, "keymux_capacity_wait_seconds_count") == {labels(result="served"): 1}
    assert family(samples, "keymux_upstream_attempts_total") == {
        labels(provider="openai", key="a", model=MODEL, outcome="success"): 1,
        labels(provider="openai", key="b", model=MODEL, outcome="success"): 2,
    }
    assert family(samples, "keymux_requests_total") == {
        labels(route="/", provider="openai", model=MODEL, outcome="success"): 3
    }


async def test_a_request_waits_for_a_key_resting_after_a_429_with_retry_after(
    fake: FakeServer, keymux: StartKeymux
) -> None:
    """Real clock: both keys answer 429 with `retry-after: 1`; the next request waits for a."""
    km = await keymux(openai_config(fake.url, {"a": A, "b": B}))
    fake.provider.script(key=A, status=429, kind="rate_limit", headers={"retry-after": "1"}, times=1)
    fake.provider.script(key=B, status=429, kind="rate_limit", headers={"retry-after": "1"}, times=1)

    # The first request tried both keys: the last upstream 429 is its answer.
    status, headers, _ = await chat(km)
    assert (status, headers.get("Retry-After")) == (429, "1")
    assert "x-keymux-error" not in headers
    assert seen(fake) == "ab"

    assert await statuses(km, 1) == [200]
    assert seen(fake) == "aba"
    samples = await settle(km)
    assert family(samples, "keymux_capacity_wait_seconds_count") == {labels(result="served"): 1}
    assert family(samples, "keymux_upstream_attempts_total") == {
        labels(provider="openai", key="a", model=MODEL, outcome="rate_limited"): 1,
        labels(provider="openai", key="b", model=MODEL, outcome="rate_limited"): 1,
        labels(provider="openai", key="a", model=MODEL, outcome="success"): 1,
    }


def assert_no_key_available(status: int, headers: dict[str, str], body: Any, retry_after: str) -> None:
    assert (status, headers.get("Retry-After"), headers.get("x-keymux-error")) == (429, retry_after, "no_key_available")
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}  # the OpenAI shape
    assert (error["type"], error["code"], error["param"]) == ("no_key_available", "no_key_available", None)


async def test_with_every_key_saturated_past_max_wait_the_app_gets_429_with_retry_after(
    fake: FakeServer, keymux: StartKeymux
) -> None:
    clock = Clock()
    km = await keymux(openai_config(fake.url, {"a": A, "b": B}), clock=clock)  # max_wait 2 s
    fake.provider.script(key=A, headers=requests_left(0, 1, "20s"), times=1)
    fake.provider.script(key=B, headers=requests_left(0, 1, "30s"), times=1)
    assert await statuses(km, 2) == [200, 200]

    status, headers, body = await chat(km)
    assert_no_key_available(status, headers, body, "20")
    message = body["error"]["message"]
    assert "openai/a saturated for model 'gpt-4o-mini' (requests limit) for 20 s" in message
    assert "openai/b saturated for model 'gpt-4o-mini' (requests limit) for 30 s" in message

    clock.now += 4.5
    assert_no_key_available(*await chat(km), "16")  # the ceiling of the 15.5 s left
    assert seen(fake) == "ab"  # nothing was sent to find out
    samples = await settle(km)
    assert family(samples, "keymux_capacity_wait_seconds_count") == {}
    assert family(samples, "keymux_saturations_total") == {
        labels(provider="openai", key="a", limit="requests"): 3,  # b's request, then the two 429s
        labels(provider="openai", key="b", limit="requests"): 2,
    }
    assert (
        family(samples, "keymux_requests_total")[
            labels(route="/", provider="none", model=MODEL, outcome="no_key_available")
        ]
        == 2
    )


async def test_with_max_wait_0_a_key_free_soon_is_not_waited_for(fake: FakeServer, keymux: StartKeymux) -> None:
    clock = Clock()
    km = await keymux(openai_config(fake.url, {"a": A}, NO_WAIT), clock=clock)
    fake.provider.script(key=A, headers=requests_left(0, 1, "1500ms"), times=1)
    assert await statuses(km, 1) == [200]

    assert_no_key_available(*await chat(km), "2")  # 1.5 s, rounded up
    clock.now += 1.25
    assert_no_key_available(*await chat(km), "1")  # 0.25 s: never 0
    clock.now += 0.25
    assert await statuses(km, 1) == [200]
    assert seen(fake) == "aa"


# -- 5. revoked keys among resting ones -------------------------------------------------------


@pytest.mark.parametrize("rest", ["rate_limited", "saturated"])
async def test_a_revoked_key_among_resting_ones_gives_429_not_503(
    fake: FakeServer, keymux: StartKeymux, rest: str
) -> None:
    clock = Clock()
    fake.provider.revoked.add(A)
    if rest == "rate_limited":
        fake.provider.script(key=B, status=429, kind="rate_limit", headers={"retry-after": "30"}, times=1)
    else:
        fake.provider.script(key=B, headers=requests_left(0, 1, "30s"), times=1)
    km = await keymux(openai_config(fake.url, {"a": A, "b": B}), clock=clock)

    first = (await chat(km))[0]
    assert first == (429 if rest == "rate_limited" else 200)  # the upstream's own answer
    assert seen(fake) == "ab"

    status, headers, body = await chat(km)
    assert_no_key_available(status, headers, body, "30")
    assert "openai/a disabled for every model" in body["error"]["message"]
    assert seen(fake) == "ab"


async def test_with_every_key_revoked_the_app_gets_503(fake: FakeServer, keymux: StartKeymux) -> None:
    clock = Clock()
    fake.provider.revoked |= {A, B}
    km = await keymux(openai_config(fake.url, {"a": A, "b": B}), clock=clock)

    assert (await chat(km))[0] == 401  # the last upstream answer
    status, headers, body = await chat(km)
    assert (status, body["error"]["code"], headers.get("x-keymux-error")) == (
        503,
        "no_key_available",
        "no_key_available",
    )
    assert seen(fake) == "ab"


# -- 6. configured rpm for a provider without headers -----------------------------------------

FLASH = "gemini-2.0-flash"
G1, G2 = "AIza-capacity-g1-000000000000", "AIza-capacity-g2-111111111111"


async def test_a_key_at_its_configured_rpm_rests_until_the_minute_slides(fake: FakeServer, keymux: StartKeymux) -> None:
    clock = Clock()
    km = await keymux(
        f"""
        providers:
          gemini:
            type: gemini
            base_url: {fake.url}
            keys:
              - {{name: g1, key: {G1}, rpm: 2}}
              - {{name: g2, key: {G2}}}
        """,
        clock=clock,
    )

    async def generate(count: int) -> None:
        body = {"contents": [{"parts": [{"text": "hi"}]}]}
        for _ in range(count):
            async with km.session.post(f"{km.url}/v1beta/models/{FLASH}:generateContent", json=body) as r:
                assert r.status == 200, await r.text()

    def used() -> str:
        names: dict[str | None, str] = {G1: "1", G2: "2"}
        return "".join(names[key] for key in fake.provider.keys_seen())

    await generate(2)  # t = 0: g1, g2
    clock.now += 10
    await generate(4)  # t = 10: g1's second request of the minute, then g2 only
    assert used() == "12" + "1222"

    rows = await saturated(km)
    assert set(rows) == {("g1", "*")}  # a configured limit counts every model
    assert rows[("g1", "*")]["limit"] == "rpm"
    assert 48 <= seconds_from_now(rows[("g1", "*")]["until"]) <= 51  # the first request leaves at t = 60
    samples = await settle(km)
    assert samples[("keymux_key_state", labels(provider="gemini", key="g1", model="*"))] == 3
    assert family(samples, "keymux_saturations_total") == {labels(provider="gemini", key="g1", limit="rpm"): 3}
    assert family(samples, "keymux_key_limit") == {}  # nothing reported: Gemini sends no headers

    clock.now = 1059.5
    await generate(1)
    assert used()[6:] == "2"
    clock.now = 1060  # the t = 0 request leaves the window: room for one
    await generate(3)
    # b's owed turn first, then g1 once (its second in [10, 60]), then g2 again.
    assert used()[7:] == "212"
    rows = await saturated(km)
    assert 8 <= seconds_from_now(rows[("g1", "*")]["until"]) <= 11  # the t = 10 request leaves at t = 70


# -- 7. Anthropic's headers -------------------------------------------------------------------


async def test_anthropic_headers_saturate_the_key_too(fake: FakeServer, keymux: StartKeymux) -> None:
    clock = Clock()
    km = await keymux(provider_config("anthropic", fake.url, {"a": A, "b": B}), clock=clock)
    reset = datetime.fromtimestamp(math.ceil(time.time()) + 30, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    fake.provider.script(
        key=A,
        headers={
            "anthropic-ratelimit-requests-limit": "1",
            "anthropic-ratelimit-requests-remaining": "0",
            "anthropic-ratelimit-requests-reset": reset,
            "anthropic-ratelimit-tokens-limit": "80000",
            "anthropic-ratelimit-tokens-remaining": "79000",
            "anthropic-ratelimit-tokens-reset": reset,
        },
        times=1,
    )
    model = "claude-3-5-haiku"

    async def message(count: int) -> None:
        body = {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
        for _ in range(count):
            async with km.session.post(km.url + "/v1/messages", json=body) as r:
                assert r.status == 200, await r.text()

    await message(4)
    assert seen(fake) == "abbb"
    rows = await saturated(km)
    assert set(rows) == {("a", model)}
    assert rows[("a", model)]["limit"] == "requests"
    samples = await settle(km)
    assert samples[("keymux_key_state", labels(provider="anthropic", key="a", model=model))] == 3
    assert family(samples, "keymux_key_limit") == {
        labels(provider="anthropic", key="a", model=model, kind="requests"): 1,
        labels(provider="anthropic", key="a", model=model, kind="tokens"): 80000,
    }
    assert family(samples, "keymux_saturations_total") == {labels(provider="anthropic", key="a", limit="requests"): 3}

    clock.now += 28  # the reset is 29 to 31 s away
    await message(1)
    assert seen(fake)[4:] == "b"
    clock.now += 4
    await message(2)
    assert seen(fake)[5:] == "ba"


# -- 8. the token estimate --------------------------------------------------------------------


def body_of(size: int, **extra: Any) -> bytes:
    """A chat request body of exactly `size` bytes (its prompt padded with x)."""
    head = {"model": MODEL, **extra, "messages": [{"role": "user", "content": ""}]}
    bare = len(json.dumps(head).encode())
    assert size >= bare
    head["messages"][0]["content"] = "x" * (size - bare)
    data = json.dumps(head).encode()
    assert len(data) == size
    return data


async def test_a_key_short_of_tokens_is_passed_over_for_a_request_likely_to_use_more(
    fake: FakeServer, keymux: StartKeymux
) -> None:
    clock = Clock()  # still: no refill (330 tokens/s would bring it back within 0.3 s)
    km = await keymux(openai_config(fake.url, {"a": A, "b": B}, NO_WAIT), clock=clock)
    fake.provider.script(
        key=A,
        headers={
            "x-ratelimit-limit-tokens": "10000",
            "x-ratelimit-remaining-tokens": "100",
            "x-ratelimit-reset-tokens": "30s",
        },
        times=1,
    )
    tiny = body_of(80)  # 20 tokens, no max_tokens
    assert (await chat(km, tiny))[0] == 200  # a: 100 tokens left
    assert (await chat(km, tiny))[0] == 200  # b: its turn
    assert seen(fake) == "ab"

    # Requests likely to use more than 100: passed over for b, not sent to a to be refused.
    assert (await chat(km, body_of(100, max_tokens=500)))[0] == 200  # 25 + 500 tokens
    assert (await chat(km, body_of(404)))[0] == 200  # 101 tokens of prompt alone
    assert (await chat(km, body_of(100, max_completion_tokens=76)))[0] == 200  # 25 + 76
    assert seen(fake)[2:] == "bbb"

    assert (await chat(km, tiny))[0] == 200  # 20 of 100: a, its turn
    assert (await chat(km, tiny))[0] == 200  # b's turn
    assert (await chat(km, body_of(320)))[0] == 200  # exactly the 80 left: a
    assert seen(fake)[5:] == "aba"
    assert (await chat(km, tiny))[0] == 200  # none left: b
    assert seen(fake)[8:] == "b"

    samples = await settle(km)
    assert family(samples, "keymux_saturations_total") == {labels(provider="openai", key="a", limit="tokens"): 4}
    assert family(samples, "keymux_key_limit") == {
        labels(provider="openai", key="a", model=MODEL, kind="tokens"): 10000
    }
    assert family(samples, "keymux_key_remaining") == {
        labels(provider="openai", key="a", model=MODEL, kind="tokens"): 0
    }
