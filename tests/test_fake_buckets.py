"""The fake provider's bucket mode, over real sockets: OpenAI's request limits as the capacity
benchmark needs them. The buckets read an injected clock, so every count here is exact."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar.fake_provider import FakeProvider, TokenBucket, openai_duration, parse_buckets

SMALL = "sk-fake-bucket-small-5rps"
BIG = "sk-fake-bucket-big-20rps"
REVOKED = "sk-fake-bucket-revoked"
UNLIMITED = "sk-fake-bucket-unlimited"
CHAT = "/v1/chat/completions"
LIMIT_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


Post = Callable[..., Any]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def bucketed(clock: Clock) -> AsyncIterator[tuple[FakeProvider, str, aiohttp.ClientSession]]:
    provider = FakeProvider(buckets={SMALL: 5, BIG: 20}, revoked={REVOKED}, clock=clock)
    runner = web.AppRunner(provider.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    async with aiohttp.ClientSession() as session:
        yield provider, f"http://127.0.0.1:{runner.addresses[0][1]}", session
    await runner.cleanup()


async def chat(
    bucketed: tuple[FakeProvider, str, aiohttp.ClientSession], key: str, model: str = "gpt-4o-mini"
) -> tuple[int, dict[str, str], Any]:
    _, url, session = bucketed
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {key}"}
    async with session.post(url + CHAT, json=body, headers=headers) as response:
        return response.status, {k.lower(): v for k, v in response.headers.items()}, await response.json()


def limits(headers: dict[str, str]) -> tuple[str, str, str]:
    return (
        headers["x-ratelimit-limit-requests"],
        headers["x-ratelimit-remaining-requests"],
        headers["x-ratelimit-reset-requests"],
    )


async def test_a_5_rps_key_answers_5_in_a_burst_then_429_with_openai_headers(bucketed: Any) -> None:
    answers = [await chat(bucketed, SMALL) for _ in range(7)]
    assert [status for status, _, _ in answers] == [200, 200, 200, 200, 200, 429, 429]
    assert [limits(headers) for _, headers, _ in answers] == [
        ("5", "4", "200ms"),
        ("5", "3", "400ms"),
        ("5", "2", "600ms"),
        ("5", "1", "800ms"),
        ("5", "0", "1s"),
        ("5", "0", "1s"),
        ("5", "0", "1s"),
    ]
    for _, headers, _ in answers:
        assert set(LIMIT_HEADERS) <= set(headers)
        assert headers["x-ratelimit-limit-tokens"] == "1000000"
        assert "retry-after" not in headers
        assert "retry-after-ms" not in headers
    _, headers, body = answers[-1]
    assert body["error"]["type"] == "requests"
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert "Rate limit reached for gpt-4o-mini" in body["error"]["message"]


async def test_the_tokens_limit_is_spent_by_successes_only(bucketed: Any) -> None:
    answers = [await chat(bucketed, SMALL) for _ in range(6)]
    remaining = [headers["x-ratelimit-remaining-tokens"] for _, headers, _ in answers]
    # 19 tokens per completion, the clock stands still: the 429 spends none.
    assert remaining == ["999981", "999962", "999943", "999924", "999905", "999905"]
    assert answers[0][1]["x-ratelimit-reset-tokens"] == "1ms"  # 19 tokens at 1,000,000 a minute


async def test_the_bucket_refills_continuously(bucketed: Any, clock: Clock) -> None:
    for _ in range(5):
        await chat(bucketed, SMALL)
    assert (await chat(bucketed, SMALL))[0] == 429
    clock.now = 0.2  # one request's worth at 5 per second
    status, headers, _ = await chat(bucketed, SMALL)
    assert (status, limits(headers)) == (200, ("5", "0", "1s"))
    assert (await chat(bucketed, SMALL))[0] == 429
    clock.now = 0.5  # 1.5 requests' worth: one more, half a request left
    status, headers, _ = await chat(bucketed, SMALL)
    assert (status, limits(headers)) == (200, ("5", "0", "900ms"))
    assert (await chat(bucketed, SMALL))[0] == 429
    clock.now = 100.0  # full, never more than one second of burst
    statuses = [(await chat(bucketed, SMALL))[0] for _ in range(6)]
    assert statuses == [200] * 5 + [429]


async def test_buckets_are_per_key_and_per_model(bucketed: Any) -> None:
    for _ in range(5):
        assert (await chat(bucketed, SMALL))[0] == 200
    assert (await chat(bucketed, SMALL))[0] == 429
    status, headers, _ = await chat(bucketed, SMALL, model="gpt-4o")  # the same key, another model
    assert (status, limits(headers)) == (200, ("5", "4", "200ms"))
    statuses = [(await chat(bucketed, BIG))[0] for _ in range(21)]
    assert statuses == [200] * 20 + [429]
    status, headers, _ = await chat(bucketed, BIG, model="gpt-4o")
    assert limits(headers) == ("20", "19", "50ms")


async def test_revoked_keys_answer_401_and_unlisted_keys_are_not_limited(bucketed: Any) -> None:
    status, headers, body = await chat(bucketed, REVOKED)
    assert status == 401
    assert body["error"]["code"] == "invalid_api_key"
    assert "x-ratelimit-limit-requests" not in headers
    statuses = [(await chat(bucketed, UNLIMITED))[0] for _ in range(30)]
    assert statuses == [200] * 30
    assert "x-ratelimit-limit-requests" not in (await chat(bucketed, UNLIMITED))[1]


async def test_the_stats_endpoint_counts_every_answer_by_key(bucketed: Any) -> None:
    _, url, session = bucketed
    for _ in range(7):
        await chat(bucketed, SMALL)
    for _ in range(2):
        await chat(bucketed, REVOKED)
    await chat(bucketed, BIG)
    async with session.get(url + "/_fake/stats") as response:
        assert response.status == 200
        stats = await response.json()
    assert stats == {"keys": {SMALL: {"served": 5, "429": 2}, REVOKED: {"401": 2}, BIG: {"served": 1}}}


async def test_a_stream_carries_the_headers_too(bucketed: Any) -> None:
    _, url, session = bucketed
    body = {"model": "gpt-4o-mini", "messages": [], "stream": True}
    async with session.post(url + CHAT, json=body, headers={"Authorization": f"Bearer {SMALL}"}) as response:
        assert response.status == 200
        assert response.headers["x-ratelimit-remaining-requests"] == "4"
        text = await response.text()
    assert text.endswith("data: [DONE]\n\n")


async def test_without_buckets_nothing_changes(fake: Any) -> None:
    """The default fake: no limit headers, no stats, every answer a 200."""
    async with aiohttp.ClientSession() as session:
        for _ in range(30):
            body = json.dumps({"model": "gpt-4o-mini", "messages": []})
            headers = {"Authorization": f"Bearer {SMALL}", "Content-Type": "application/json"}
            async with session.post(fake.url + CHAT, data=body, headers=headers) as response:
                assert response.status == 200
                assert "x-ratelimit-limit-requests" not in response.headers
        async with session.get(fake.url + "/_fake/stats") as response:
            assert await response.json() == {"keys": {}}


def test_a_bucket_holds_one_second_of_burst_and_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=10, capacity=10, now=0.0)
    assert [bucket.take(0.0) for _ in range(11)] == [True] * 10 + [False]
    assert bucket.until_full() == 1.0
    assert bucket.take(0.1) is True
    assert bucket.take(0.1) is False
    assert bucket.take(0.05) is False  # the clock going back refills nothing
    assert bucket.take(10.0) is True
    assert bucket.remaining() == 9


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "0ms"), (0.0004, "0ms"), (0.25, "250ms"), (0.9994, "999ms"), (1.0, "1s"), (1.5, "1.5s"),
     (59.0, "59s"), (60.0, "1m0s"), (61.25, "1m1.25s")],
)  # fmt: skip
def test_resets_are_written_as_openai_durations(seconds: float, text: str) -> None:
    assert openai_duration(seconds) == text


def test_the_buckets_flag_names_keys_and_rates() -> None:
    assert parse_buckets("sk-a=20, sk-b=10,,sk=c=5") == {"sk-a": 20.0, "sk-b": 10.0, "sk=c": 5.0}
    with pytest.raises(ValueError, match="KEY=RPS"):
        parse_buckets("sk-a")
