"""Each attempt is recorded once, with the verdict of its end: through real sockets.

A stream that breaks mid-body counts against its key; an app that hangs up after the
provider's terminal event got the whole answer, so the request is a success with its tokens.
The clients are the official SDKs, which close the connection at `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from tests.conftest import FakeServer, Running, StartKeymux, openai_config, provider_config
from tests.test_metrics import family, labels, settle

A, B = "sk-attempt-a-000000000000", "sk-attempt-b-000000000000"
MESSAGES = [{"role": "user", "content": "hi"}]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def stream_raw(km: Running, model: str = "gpt-4o") -> tuple[int, bool]:
    """(status, whether the whole body arrived) for one streamed chat completion."""
    payload = {"model": model, "messages": MESSAGES, "stream": True}
    async with km.session.post(km.url + "/v1/chat/completions", json=payload) as response:
        try:
            await response.read()
        except aiohttp.ClientPayloadError:
            return response.status, False
        return response.status, True


async def test_a_key_whose_streams_break_mid_body_is_cooled_at_the_threshold_until_its_probe(
    fake: FakeServer, keymux: StartKeymux
) -> None:
    clock = Clock()
    health = "health:\n  failure_threshold: 3\n  failure_cooldown: 30s\n"
    km = await keymux(openai_config(fake.url, {"a": A, "b": B}, health), clock=clock)
    fake.provider.script(key=A, fault="reset_mid_stream")

    results = [await stream_raw(km) for _ in range(9)]

    # a, b, a, b, a: the third broken stream cools a; b then serves alone.
    assert fake.provider.keys_seen() == [A, B, A, B, A, B, B, B, B]
    assert results == [(200, False), (200, True)] * 2 + [(200, False)] + [(200, True)] * 4
    samples = await settle(km)
    assert family(samples, "keymux_upstream_attempts_total") == {
        labels(provider="openai", key="a", model="gpt-4o", outcome="connection_error"): 3,
        labels(provider="openai", key="b", model="gpt-4o", outcome="success"): 6,
    }
    assert samples[("keymux_key_state", labels(provider="openai", key="a", model="gpt-4o"))] == 1
    [row] = [r for r in km.sidecar.key_table() if r["key"] == "a" and r["model"] == "gpt-4o"]
    assert (row["state"], row["last_failure"]) == ("cooling", "connection_error")

    clock.now += 29
    assert await stream_raw(km) == (200, True)  # still cooling: b
    clock.now += 1
    # a is half-open: it rejoins the weighted rotation where it left it (b's turn comes first),
    # and its one probe fails.
    assert await stream_raw(km) == (200, True)
    assert await stream_raw(km) == (200, False)
    assert await stream_raw(km) == (200, True)
    assert fake.provider.keys_seen()[9:] == [B, B, A, B]


def read_openai_stream(base_url: str, *, stop_after: int | None = None) -> list[Any]:
    """The official sync client: it closes the connection as soon as it reads [DONE]."""
    client = openai.OpenAI(base_url=base_url, api_key="placeholder-key", max_retries=0)
    chunks = []
    try:
        stream = client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        with stream:
            for chunk in stream:
                chunks.append(chunk)
                if stop_after is not None and len(chunks) == stop_after:
                    break  # the app gives up before the end: leaving the block closes the connection
    finally:
        client.close()
    return chunks


@pytest.mark.parametrize("gap", [0.001, 0.01, 0.05])
async def test_an_openai_stream_closed_by_the_sdk_at_done_is_a_success_with_its_tokens(
    fake: FakeServer, keymux: StartKeymux, gap: float
) -> None:
    km = await keymux(openai_config(fake.url, {"a": A}))
    fake.provider.script(end_delay=gap)

    chunks = await asyncio.to_thread(read_openai_stream, km.url + "/v1")

    assert chunks[-1].usage.completion_tokens == 5
    samples = await settle(km)
    assert family(samples, "keymux_requests_total") == {
        labels(route="/", provider="openai", model="gpt-4o", outcome="success"): 1
    }
    assert family(samples, "keymux_upstream_attempts_total") == {
        labels(provider="openai", key="a", model="gpt-4o", outcome="success"): 1
    }
    assert family(samples, "keymux_tokens_total") == {
        labels(provider="openai", key="a", model="gpt-4o", kind="prompt"): 12,
        labels(provider="openai", key="a", model="gpt-4o", kind="completion"): 5,
    }


async def test_an_app_that_hangs_up_before_the_terminal_event_is_client_disconnected(
    fake: FakeServer, keymux: StartKeymux
) -> None:
    km = await keymux(openai_config(fake.url, {"a": A}))
    fake.provider.script(events=20, event_delay=0.02)

    chunks = await asyncio.to_thread(read_openai_stream, km.url + "/v1", stop_after=2)

    assert len(chunks) == 2
    samples = await settle(km)
    assert family(samples, "keymux_requests_total") == {
        labels(route="/", provider="openai", model="gpt-4o", outcome="client_disconnected"): 1
    }
    assert family(samples, "keymux_upstream_attempts_total") == {
        labels(provider="openai", key="a", model="gpt-4o", outcome="client_disconnected"): 1
    }
    assert family(samples, "keymux_tokens_total") == {}
    assert [r["state"] for r in km.sidecar.key_table()] == ["usable"]  # the app's hang-up costs the key nothing


def read_anthropic_until_message_stop(base_url: str) -> list[str]:
    """An app that stops reading and closes the connection once it has `message_stop`."""
    client = anthropic.Anthropic(base_url=base_url, api_key="placeholder-key", max_retries=0)
    kinds = []
    try:
        stream = client.messages.create(model="claude-3-5-haiku", max_tokens=64, messages=MESSAGES, stream=True)
        for event in stream:
            kinds.append(event.type)
            if event.type == "message_stop":
                break
        stream.close()
    finally:
        client.close()
    return kinds


@pytest.mark.parametrize("gap", [0.001, 0.01, 0.05])
async def test_an_anthropic_stream_closed_at_message_stop_is_a_success_with_its_tokens(
    fake: FakeServer, keymux: StartKeymux, gap: float
) -> None:
    km = await keymux(provider_config("anthropic", fake.url, {"a": A}))
    fake.provider.script(end_delay=gap)

    kinds = await asyncio.to_thread(read_anthropic_until_message_stop, km.url)

    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    samples = await settle(km)
    assert family(samples, "keymux_requests_total") == {
        labels(route="/", provider="anthropic", model="claude-3-5-haiku", outcome="success"): 1
    }
    assert family(samples, "keymux_tokens_total") == {
        labels(provider="anthropic", key="a", model="claude-3-5-haiku", kind="prompt"): 12,
        labels(provider="anthropic", key="a", model="claude-3-5-haiku", kind="completion"): 5,
    }


@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_leaves_no_reference_cycle_behind(fake: FakeServer, keymux: StartKeymux, stream: bool) -> None:
    """Its request, bodies and buffers are freed by reference counting as it ends, not held
    until a garbage-collector pass: under load that gap is resident memory."""
    km = await keymux(openai_config(fake.url, {"a": A, "b": B}))
    fake.provider.script(key=A, status=500, times=10)  # retries too: a held answer, a second attempt
    payload = {"model": "gpt-4o", "messages": MESSAGES, "stream": stream}
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(20):
            async with km.session.post(km.url + "/v1/chat/completions", json=payload) as response:
                assert response.status == 200
                await response.read()
        await settle(km)
        gc.collect()
        kept = sorted({type(o).__name__ for o in gc.garbage if type(o).__module__.startswith(("sidecar", "aiohttp"))})
    finally:
        gc.garbage.clear()
        gc.set_debug(0)
        gc.enable()
    assert kept == []
