"""Fault injection through real sockets: whatever the upstream does, the app gets a complete
answer or a clear error in the provider's error shape, the metrics add up, and nothing is left
behind (no upstream request still running, no request in flight, no connection, task or file
descriptor more than before the scenario)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from sidecar.fake_provider import FakeProvider
from soak.stack import (
    CLEAN,
    Answer,
    Stack,
    StubResolver,
    ask,
    chat,
    connections_checked_out,
    connections_idle,
    start_stack,
    start_upstream,
    use_resolver,
)

KEY_A = "sk-fault-a-7f3c9e21d4b8a6f0"
KEY_B = "sk-fault-b-19e4c7a2f0d35b86"
NOW = 1000.0  # the health clock, frozen: cooldowns are read exactly

CONFIG = f"""
providers:
  openai:
    type: openai
    base_url: {{base_url}}
    keys:
      - name: a
        key: {KEY_A}
      - name: b
        key: {KEY_B}
timeouts:
  connect: 0.5
  response_headers: 0.5
  idle: 0.5
  total: 3
"""
# For the disconnect cases: the upstream is slow on purpose, and must not time out first.
PATIENT = CONFIG.replace("timeouts:\n  connect: 0.5\n  response_headers: 0.5\n  idle: 0.5\n  total: 3\n", "")

StartStack = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def stacks() -> AsyncIterator[StartStack]:
    started: list[Stack] = []

    async def start(yaml_text: str = CONFIG, **options: object) -> Stack:
        stack = await start_stack(yaml_text, clock=lambda: NOW, **options)  # type: ignore[arg-type]
        started.append(stack)
        return stack

    yield start
    for stack in started:  # a failed test still closes what it started
        await stack.close()


async def completion(stack: Stack, *, stream: bool = False, model: str = "gpt-4o") -> Answer:
    return await ask(stack.client, stack.url + "/v1/chat/completions", body=chat(model, stream))


def openai_error(answer: Answer) -> dict[str, object]:
    """The OpenAI error object of an answer (fails the test when the shape is wrong)."""
    body = answer.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"], error
    return error


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the upstream cannot be reached or does not speak HTTP -------------------------------------


async def test_connection_refused_on_every_key_is_a_502_in_the_openai_shape(stacks: StartStack) -> None:
    stack = await stacks(CONFIG.replace("{base_url}", f"http://127.0.0.1:{closed_port()}"))
    answer = await completion(stack)
    assert answer.status == 502
    assert answer.headers["x-keymux-error"] == "connection_error"
    assert openai_error(answer)["code"] == "connection_error"
    end = await stack.finish()
    assert end.state() == CLEAN
    assert end.attempts_by("key", "outcome") == {("a", "connection_error"): 1, ("b", "connection_error"): 1}


async def test_connection_refused_falls_back_to_the_next_provider(stacks: StartStack) -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    stack = await stacks(
        f"""
        providers:
          dead:
            type: openai
            base_url: {dead}
            keys:
              - name: d
                key: sk-fault-d-5be1a09c77e2d4f3
          live:
            type: openai
            base_url: {{base_url}}
            keys:
              - name: a
                key: {KEY_A}
        routes:
          - prefix: /
            providers: [dead, live]
        """
    )
    answer = await completion(stack)
    assert answer.status == 200
    assert answer.json()["choices"][0]["message"]["content"] == "Hello from the fake provider."
    end = await stack.finish()
    assert end.state() == CLEAN
    assert end.attempts_by("provider", "key", "outcome") == {
        ("dead", "d", "connection_error"): 1,
        ("live", "a", "success"): 1,
    }


@pytest.mark.parametrize("fault", ["reset_before_headers", "not_http"])
async def test_a_connection_fault_on_one_key_is_retried_on_the_other(stacks: StartStack, fault: str) -> None:
    stack = await stacks()
    stack.provider.script(key=KEY_A, fault=fault)
    answer = await completion(stack)
    assert answer.status == 200
    assert answer.json()["choices"][0]["message"]["content"] == "Hello from the fake provider."
    assert stack.provider.keys_seen() == [KEY_A, KEY_B]
    end = await stack.finish()
    assert end.state() == CLEAN
    assert end.attempts_by("key", "outcome") == {("a", "connection_error"): 1, ("b", "success"): 1}
    assert end.attempts == end.upstream_requests == 2


@pytest.mark.parametrize("fault", ["reset_before_headers", "not_http"])
async def test_a_connection_fault_on_every_key_is_a_502(stacks: StartStack, fault: str) -> None:
    stack = await stacks()
    stack.provider.script(fault=fault)
    answer = await completion(stack)
    assert answer.status == 502
    assert openai_error(answer)["code"] == "connection_error"
    end = await stack.finish()
    assert end.state() == CLEAN
    assert end.attempts == end.upstream_requests == 2


async def test_a_get_reset_before_headers_is_sent_once_per_key(stacks: StartStack) -> None:
    """An idempotent request must not be replayed behind keymux's back (each send is an attempt)."""
    stack = await stacks()
    warm = await ask(stack.client, stack.url + "/v1/models", method="GET")  # pools a connection
    assert warm.status == 200
    stack.provider.script(fault="reset_before_headers")
    answer = await ask(stack.client, stack.url + "/v1/models", method="GET")
    assert answer.status == 502
    end = await stack.finish()
    assert end.state() == CLEAN
    assert stack.provider.keys_seen()[1:] == [KEY_B, KEY_A]
    assert end.attempts == end.upstream_requests == 3


# -- broken and endless bodies -----------------------------------------------------------------


@pytest.mark.parametrize(("fault", "outcome"), [("reset_mid_stream", "connection_error"), ("hang_body", "timeout")])
async def test_a_stream_broken_after_its_first_bytes_is_cut_for_the_app(
    stacks: StartStack, fault: str, outcome: str
) -> None:
    """Bytes reached the app, so no retry: the app's response ends unterminated, as an error."""
    stack = await stacks()
    stack.provider.script(fault=fault)
    answer = await completion(stack, stream=True)
    assert answer.status == 200
    assert answer.body == b'data: {"choices":[{"delta":{"content":"partial"}}]}\n\n'
    assert answer.broken == "ClientPayloadError"
    end = await stack.finish()
    assert end.state() == CLEAN
    assert end.attempts_by("key", "outcome") == {("a", outcome): 1}
    assert end.attempts == end.upstream_requests == 1


async def test_a_200_with_invalid_json_is_forwarded_byte_for_byte(stacks: StartStack) -> None:
    stack = await stacks()
    stack.provider.script(fault="invalid_json")
    answer = await completion(stack)
    assert (answer.status, answer.body, answer.broken) == (200, b'{"id": "chatcmpl-1", "choices": [', None)
    end = await stack.finish()
    assert end.state() == CLEAN
    assert end.attempts_by("key", "outcome") == {("a", "success"): 1}


async def test_a_10_mb_error_body_on_one_key_is_retried_on_the_other(stacks: StartStack) -> None:
    stack = await stacks()
    stack.provider.script(key=KEY_A, fault="big_error", status=500)
    answer = await completion(stack)
    assert answer.status == 200
    assert answer.json()["choices"][0]["message"]["content"] == "Hello from the fake provider."
    end = await stack.finish()
    assert end.state() == CLEAN
    assert end.attempts_by("key", "outcome") == {("a", "upstream_error"): 1, ("b", "success"): 1}


async def test_a_10_mb_error_body_on_every_key_reaches_the_app_whole(stacks: StartStack) -> None:
    stack = await stacks()
    stack.provider.script(fault="big_error", status=500)
    answer = await completion(stack)
    assert (answer.status, len(answer.body), answer.broken) == (500, 10 * 1024 * 1024, None)
    assert answer.body == b"x" * (10 * 1024 * 1024)
    end = await stack.finish()
    assert end.state() == CLEAN
    assert end.attempts_by("key", "outcome") == {("a", "upstream_error"): 1, ("b", "upstream_error"): 1}


# -- rate limits that say something odd --------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_after", "cooldown"),
    [
        ("soon", 30.0),  # garbage: the default rate-limit cooldown
        ("-5", 30.0),
        ("0", 30.0),
        ("nan", 30.0),
        ("inf", 30.0),
        ("1e400", 30.0),
        ("", 30.0),
        ("31536000", 3600.0),  # a year: capped at rate_limit_cooldown_max
        ("Fri, 31 Dec 2100 23:59:59 GMT", 3600.0),
        ("12", 12.0),  # a sane value is obeyed
    ],
)
async def test_a_429_cools_the_key_for_a_sane_time_whatever_its_retry_after_says(
    stacks: StartStack, retry_after: str, cooldown: float
) -> None:
    stack = await stacks()
    stack.provider.script(key=KEY_A, status=429, headers={"retry-after": retry_after})
    first, second = await completion(stack), await completion(stack)
    assert (first.status, second.status) == (200, 200)
    assert stack.provider.keys_seen() == [KEY_A, KEY_B, KEY_B]  # a rests, b serves
    health = stack.sidecar.runtime.providers["openai"].health
    cooling = [(s.key, s.scope, s.state.value, s.until) for s in health.statuses() if s.until is not None]
    assert cooling == [("a", "gpt-4o", "cooling", NOW + cooldown)]
    end = await stack.finish()
    assert end.state() == CLEAN
    assert end.attempts == end.upstream_requests == 3


async def test_when_every_key_is_rate_limited_for_a_year_the_app_is_told_to_wait_an_hour(
    stacks: StartStack,
) -> None:
    stack = await stacks()
    stack.provider.script(status=429, headers={"retry-after": "31536000"})
    first = await completion(stack)
    assert first.status == 429  # the last upstream answer
    assert openai_error(first)["code"] == "rate_limit_exceeded"
    second = await completion(stack)
    assert second.status == 429
    assert second.headers["Retry-After"] == "3600"
    assert openai_error(second)["code"] == "no_key_available"
    end = await stack.finish()
    assert end.state() == CLEAN
    assert end.attempts == end.upstream_requests == 2


async def test_every_key_disabled_gives_503_without_touching_the_upstream(stacks: StartStack) -> None:
    stack = await stacks(provider=FakeProvider(revoked={KEY_A, KEY_B}))
    first = await completion(stack)
    assert first.status == 401  # the last upstream answer, forwarded
    assert openai_error(first)["code"] == "invalid_api_key"
    second = await completion(stack)
    assert second.status == 503
    error = openai_error(second)
    assert error["code"] == "no_key_available"
    assert "openai/a disabled for every model after credential_error" in str(error["message"])
    assert "openai/b disabled for every model after credential_error" in str(error["message"])
    async with aiohttp.ClientSession() as admin, admin.get(stack.admin + "/readyz") as ready:
        assert ready.status == 503
    end = await stack.finish()
    assert end.state() == CLEAN
    assert end.attempts == end.upstream_requests == 2
    assert end.attempts_by("outcome") == {("credential_error",): 2}


# -- timeouts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("slowness", [{"fault": "hang_headers"}, {"delay": 1.0}])
async def test_headers_slower_than_the_timeout_on_one_key_are_retried(stacks: StartStack, slowness: dict) -> None:
    stack = await stacks()
    stack.provider.script(key=KEY_A, **slowness)
    answer = await completion(stack)
    assert answer.status == 200
    assert answer.json()["choices"][0]["message"]["content"] == "Hello from the fake provider."
    end = await stack.finish()
    assert end.state() == CLEAN
    assert end.attempts_by("key", "outcome") == {("a", "timeout"): 1, ("b", "success"): 1}
    assert stack.provider.cancelled == 1  # the abandoned upstream request was closed


@pytest.mark.parametrize("slowness", [{"fault": "hang_headers"}, {"delay": 1.0}])
async def test_headers_slower_than_the_timeout_on_every_key_are_a_504(stacks: StartStack, slowness: dict) -> None:
    stack = await stacks()
    stack.provider.script(**slowness)
    answer = await completion(stack)
    assert answer.status == 504
    assert answer.headers["x-keymux-error"] == "timeout"
    assert openai_error(answer)["code"] == "timeout"
    end = await stack.finish()
    assert end.state() == CLEAN
    assert end.attempts_by("key", "outcome") == {("a", "timeout"): 1, ("b", "timeout"): 1}
    assert end.upstream_requests == 2


async def test_a_stream_slower_than_the_idle_timeout_is_cut(stacks: StartStack) -> None:
    stack = await stacks()
    stack.provider.script(events=5, event_delay=1.0)
    answer = await completion(stack, stream=True)
    assert answer.status == 200
    assert answer.broken == "ClientPayloadError"
    assert answer.body.count(b"data: ") == 1  # the first event only
    end = await stack.finish()
    assert end.state() == CLEAN
    assert end.attempts_by("key", "outcome") == {("a", "timeout"): 1}
    assert end.attempts == end.upstream_requests == 1


async def test_a_stream_longer_than_the_total_timeout_is_cut(stacks: StartStack) -> None:
    stack = await stacks()
    stack.provider.script(events=40, event_delay=0.2)  # 8 s of events, each within idle
    answer = await completion(stack, stream=True)
    assert answer.status == 200
    assert answer.broken == "ClientPayloadError"
    assert 1 <= answer.body.count(b"data: ") < 40
    end = await stack.finish()
    assert end.state() == CLEAN
    assert end.attempts_by("key", "outcome") == {("a", "timeout"): 1}
    assert end.attempts == end.upstream_requests == 1


# -- the app goes away -------------------------------------------------------------------------


async def _hang_up_before_the_headers(stack: Stack, seconds: float) -> None:
    request = stack.client.post(stack.url + "/v1/chat/completions", data=chat())
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(request, seconds)  # the cancelled client closes its connection


async def _hang_up_after_the_first_chunk(stack: Stack) -> None:
    async with stack.client.post(stack.url + "/v1/chat/completions", data=chat(stream=True)) as response:
        assert response.status == 200
        assert (await response.content.readany()).startswith(b"data: ")
        response.close()  # the rest is never read


async def _requests_by_outcome(stack: Stack) -> dict[str, float]:
    samples = await stack.metrics()
    found: dict[str, float] = {}
    for (name, labels), value in samples.items():
        if name == "keymux_requests_total" and value:
            outcome = dict(labels)["outcome"]
            found[outcome] = found.get(outcome, 0.0) + value
    return found


async def test_an_app_that_hangs_up_before_the_headers_cancels_the_upstream_request(stacks: StartStack) -> None:
    stack = await stacks(PATIENT)
    stack.provider.script(delay=20)
    await _hang_up_before_the_headers(stack, 0.3)
    assert await stack.quiet() == CLEAN["busy"]
    assert stack.provider.cancelled == 1
    assert await _requests_by_outcome(stack) == {"client_disconnected": 1}
    assert await stack.keys() == _healthy_keys()
    end = await stack.finish()
    assert end.state() == CLEAN
    assert end.attempts == end.upstream_requests == 1


async def test_an_app_that_hangs_up_mid_stream_cancels_the_upstream_stream(stacks: StartStack) -> None:
    stack = await stacks(PATIENT)
    stack.provider.script(events=50, event_delay=0.2)
    await _hang_up_after_the_first_chunk(stack)
    assert await stack.quiet() == CLEAN["busy"]
    assert stack.provider.cancelled == 1
    assert await _requests_by_outcome(stack) == {"client_disconnected": 1}
    assert await stack.keys() == _healthy_keys()
    end = await stack.finish()
    assert end.state() == CLEAN
    assert end.attempts == end.upstream_requests == 1


async def test_an_app_that_hangs_up_during_a_retry_cancels_the_second_attempt(stacks: StartStack) -> None:
    stack = await stacks(PATIENT)
    stack.provider.script(key=KEY_A, status=500)
    stack.provider.script(key=KEY_B, delay=20)
    await _hang_up_before_the_headers(stack, 0.5)
    assert await stack.quiet() == CLEAN["busy"]
    assert stack.provider.keys_seen() == [KEY_A, KEY_B]
    assert stack.provider.cancelled == 1
    assert await _requests_by_outcome(stack) == {"client_disconnected": 1}
    end = await stack.finish()
    assert end.state() == CLEAN
    assert end.attempts == end.upstream_requests == 2


def _healthy_keys() -> list[dict[str, object]]:
    row = {
        "provider": "openai",
        "model": "*",
        "state": "usable",
        "until": None,
        "consecutive_failures": 0,
        "last_failure": None,
        "limit": None,
    }
    return [{**row, "key": "a"}, {**row, "key": "b"}]


# -- reloads under load ------------------------------------------------------------------------


KEY_C = "sk-fault-c-0d8e6b4f2a913c57"
# The same keys in another order, other health numbers: health and metrics carry over.
REORDERED = (
    CONFIG.replace(
        f"      - name: a\n        key: {KEY_A}\n      - name: b\n        key: {KEY_B}\n",
        f"      - name: b\n        key: {KEY_B}\n      - name: a\n        key: {KEY_A}\n",
    )
    + "health:\n  failure_threshold: 5\n"
)
# Key b replaced by key c.
REPLACED = CONFIG.replace(f"      - name: b\n        key: {KEY_B}\n", f"      - name: c\n        key: {KEY_C}\n")


async def _load_while_reloading(stack: Stack, configs: list[str], count: int) -> tuple[list[Answer], int, int]:
    """`count` requests, 32 at a time, a third of them streams, while the config flips between
    `configs` and an invalid config is offered (and refused) in between."""
    texts = [c.replace("{base_url}", stack.upstream.url) for c in configs]
    gate = asyncio.Semaphore(32)
    stop = asyncio.Event()

    async def one(i: int) -> Answer:
        async with gate:
            return await completion(stack, stream=i % 3 == 0)

    async def reload_until_stopped() -> tuple[int, int]:
        done = rejected = 0
        while not stop.is_set():
            done += stack.sidecar.reload(texts[done % len(texts)])
            rejected += not stack.sidecar.reload("providers: {broken")
            await asyncio.sleep(0.005)
        return done, rejected

    reloader = asyncio.create_task(reload_until_stopped())
    try:
        answers = await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        stop.set()
        reloads, rejected = await reloader
    return answers, reloads, rejected


def _all_complete(answers: list[Answer]) -> bool:
    for i, answer in enumerate(answers):
        if (answer.status, answer.broken) != (200, None):
            return False
        if i % 3 == 0 and not answer.body.endswith(b"data: [DONE]\n\n"):
            return False
        if i % 3 and answer.json()["object"] != "chat.completion":
            return False
    return True


async def test_config_reloads_in_the_middle_of_load_lose_no_request(stacks: StartStack) -> None:
    stack = await stacks()
    stack.provider.script(delay=0.01)  # keep requests in flight across reloads
    answers, reloads, rejected = await _load_while_reloading(stack, [REORDERED, CONFIG], 400)
    assert reloads >= 10
    assert _all_complete(answers)
    samples = await stack.metrics()
    assert samples[("keymux_config_reloads_total", (("result", "success"),))] == reloads
    assert samples[("keymux_config_reloads_total", (("result", "failure"),))] == rejected == reloads
    end = await stack.finish()
    assert end.state() == CLEAN
    assert end.attempts == end.upstream_requests == 400


async def test_a_key_removed_by_a_reload_under_load_is_no_longer_used(stacks: StartStack) -> None:
    stack = await stacks()
    stack.provider.script(delay=0.01)
    answers, reloads, _ = await _load_while_reloading(stack, [REPLACED, CONFIG, REPLACED], 300)
    assert reloads >= 10
    assert _all_complete(answers)
    assert stack.sidecar.reload(REPLACED.replace("{base_url}", stack.upstream.url))
    stack.provider.seen.clear()
    after = [await completion(stack) for _ in range(4)]
    assert [a.status for a in after] == [200] * 4
    assert sorted(set(stack.provider.keys_seen())) == sorted({KEY_A, KEY_C})
    end = await stack.finish()
    assert end.state() == CLEAN


# -- the harness itself ------------------------------------------------------------------------


async def test_the_aiohttp_internals_the_leak_checks_rely_on_still_mean_what_they_did() -> None:
    """soak/stack.py counts keymux's upstream connections and swaps its resolver through private
    aiohttp attributes, there being no public way. An aiohttp release that renames or reshapes
    them must fail here, by name, rather than let every leak check pass by counting nothing."""
    upstream = await start_upstream()
    upstream.provider.script(events=3, event_delay=0.05)  # the body is still coming after the headers
    port = int(upstream.url.rsplit(":", 1)[1])
    resolver = StubResolver({"upstream.test": port}, default=port)
    connector = aiohttp.TCPConnector()
    use_resolver(connector, resolver)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            headers = {"Authorization": f"Bearer {KEY_A}"}
            async with session.post(
                "http://upstream.test/v1/chat/completions", data=chat(stream=True), headers=headers
            ) as response:
                assert response.status == 200
                during = (connections_checked_out(connector), connections_idle(connector))
                await response.read()
            after = (connections_checked_out(connector), connections_idle(connector))
    finally:
        await upstream.close()
    broken = f"aiohttp {aiohttp.__version__} changed an internal that soak/stack.py reads:"
    assert resolver.asked == ["upstream.test"], f"{broken} TCPConnector._resolver (see use_resolver)"
    assert during == (1, 0), f"{broken} BaseConnector._acquired or _conns (a request in flight counts {during})"
    assert after == (0, 1), f"{broken} BaseConnector._acquired or _conns (a pooled connection counts {after})"
