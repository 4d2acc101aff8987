"""keymux end to end: the official SDKs -> keymux -> the fake provider, all over loopback."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import anthropic
import openai
import pytest

from tests.conftest import openai_config

KEYS = {"a": "sk-test-aaaaaaaaaaaaaaaa", "b": "sk-test-bbbbbbbbbbbbbbbb", "c": "sk-test-cccccccccccccccc"}
NAMES = {secret: name for name, secret in KEYS.items()}
HI = [{"role": "user", "content": "hi"}]


_clients: list[openai.AsyncOpenAI | anthropic.AsyncAnthropic] = []


@pytest.fixture(autouse=True)
async def _close_sdk_clients():
    yield
    while _clients:
        await _clients.pop().close()


def sdk(running, path: str = "/v1") -> openai.AsyncOpenAI:
    client = openai.AsyncOpenAI(base_url=running.url + path, api_key="placeholder-key", max_retries=0)
    _clients.append(client)
    return client


def used(fake) -> list[str]:
    return [NAMES.get(key, key) for key in fake.provider.keys_seen()]


async def test_three_healthy_keys_share_requests_evenly(fake, keymux):
    km = await keymux(openai_config(fake.url, KEYS))
    client = sdk(km)
    for _ in range(30):
        await client.chat.completions.create(model="gpt-4o", messages=HI)
    assert Counter(used(fake)) == {"a": 10, "b": 10, "c": 10}


async def test_upstream_never_sees_the_apps_placeholder_key(fake, keymux):
    km = await keymux(openai_config(fake.url, KEYS))
    await sdk(km).chat.completions.create(model="gpt-4o", messages=HI)
    seen = fake.provider.seen[0]
    assert seen.key == KEYS["a"]
    assert "placeholder-key" not in json.dumps(seen.headers)
    assert seen.headers["Authorization"] == f"Bearer {KEYS['a']}"


async def test_app_credentials_in_the_query_are_removed(fake, keymux):
    km = await keymux(openai_config(fake.url, KEYS))
    async with km.session.get(km.url + "/v1/models?key=app-secret&limit=2") as response:
        assert response.status == 200
    assert fake.provider.seen[0].query == "limit=2"


async def test_revoked_key_is_retried_on_another_key_before_the_app_sees_anything(fake, keymux):
    fake.provider.revoked.add(KEYS["a"])
    km = await keymux(openai_config(fake.url, KEYS))
    client = sdk(km)
    result = await client.chat.completions.create(model="gpt-4o", messages=HI)
    assert result.choices[0].message.content == "Hello from the fake provider."
    assert used(fake) == ["a", "b"]
    for _ in range(4):
        await client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    assert used(fake)[2:] == ["b", "c", "b", "c"]  # a is disabled for every model


async def test_a_key_failing_for_one_model_still_serves_another(fake, keymux):
    fake.provider.script(key=KEYS["a"], model="gpt-4o", status=404, kind="model_access")
    km = await keymux(openai_config(fake.url, {"a": KEYS["a"], "b": KEYS["b"]}))
    client = sdk(km)
    await client.chat.completions.create(model="gpt-4o", messages=HI)
    assert used(fake) == ["a", "b"]
    fake.provider.reset()
    for _ in range(2):
        await client.chat.completions.create(model="gpt-4o", messages=HI)
    for _ in range(2):
        await client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    assert used(fake) == ["b", "b", "a", "b"]


async def test_gemini_invalid_key_400_rotates_and_disables_the_key_for_every_model(fake, keymux):
    fake.provider.revoked.add("AIza-bad-key-000000")
    km = await keymux(
        f"""
providers:
  gemini:
    type: gemini
    base_url: {fake.url}
    keys:
      - {{name: bad, key: AIza-bad-key-000000}}
      - {{name: good, key: AIza-good-key-11111}}
"""
    )
    body = {"contents": [{"parts": [{"text": "hi"}]}]}
    async with km.session.post(km.url + "/v1beta/models/gemini-1.5-pro:generateContent", json=body) as r:
        assert r.status == 200
        assert (await r.json())["usageMetadata"]["promptTokenCount"] == 12
    assert fake.provider.keys_seen() == ["AIza-bad-key-000000", "AIza-good-key-11111"]
    assert fake.provider.seen[0].model == "gemini-1.5-pro"
    async with km.session.post(km.url + "/v1beta/models/gemini-1.5-flash:generateContent", json=body) as r:
        assert r.status == 200
    assert fake.provider.keys_seen()[2:] == ["AIza-good-key-11111"]
    rows = {(row["key"], row["model"]): row["state"] for row in km.sidecar.key_table()}
    assert rows[("bad", "*")] == "disabled"


async def test_retry_after_is_honoured_and_all_rate_limited_answers_429(fake, keymux):
    for name in ("a", "b"):
        fake.provider.script(key=KEYS[name], model="gpt-4o", status=429, headers={"retry-after": "30"}, times=1)
    km = await keymux(openai_config(fake.url, {"a": KEYS["a"], "b": KEYS["b"]}))
    client = sdk(km)
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="gpt-4o", messages=HI)
    assert caught.value.status_code == 429  # the last upstream answer, unchanged
    assert used(fake) == ["a", "b"]
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="gpt-4o", messages=HI)
    assert used(fake) == ["a", "b"]  # no key was usable: keymux answered itself
    response = caught.value.response
    assert response.headers["retry-after"] in ("29", "30")
    assert response.headers["x-keymux-error"] == "no_key_available"
    message = caught.value.body["message"]
    assert "openai/a cooling for model 'gpt-4o' after rate_limited" in message
    assert "openai/b cooling for model 'gpt-4o' after rate_limited" in message
    assert KEYS["a"] not in message and KEYS["b"] not in message
    await client.chat.completions.create(model="gpt-4o-mini", messages=HI)  # other models still served


async def test_a_plain_400_is_answered_unchanged_and_not_retried(fake, keymux):
    fake.provider.script(status=400, kind="bad_request")
    km = await keymux(openai_config(fake.url, KEYS))
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk(km).chat.completions.create(model="gpt-4o", messages=HI, temperature=3)
    assert caught.value.body["message"] == "Invalid value for 'temperature': must be between 0 and 2."
    assert used(fake) == ["a"]
    assert all(row["state"] == "usable" for row in km.sidecar.key_table())


async def test_server_errors_retry_on_another_key(fake, keymux):
    fake.provider.script(key=KEYS["a"], status=503)
    km = await keymux(openai_config(fake.url, KEYS))
    await sdk(km).chat.completions.create(model="gpt-4o", messages=HI)
    assert used(fake) == ["a", "b"]


async def test_when_every_key_failed_the_app_gets_the_last_upstream_answer(fake, keymux):
    fake.provider.script(status=500)
    km = await keymux(openai_config(fake.url, KEYS))
    with pytest.raises(openai.InternalServerError) as caught:
        await sdk(km).chat.completions.create(model="gpt-4o", messages=HI)
    assert caught.value.status_code == 500
    assert caught.value.body["message"] == "The server had an error while processing your request."
    assert used(fake) == ["a", "b", "c"]


async def test_every_key_disabled_answers_503_naming_keys_and_states(fake, keymux):
    fake.provider.revoked.update(KEYS.values())
    km = await keymux(openai_config(fake.url, KEYS))
    client = sdk(km)
    with pytest.raises(openai.AuthenticationError):
        await client.chat.completions.create(model="gpt-4o", messages=HI)
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model="gpt-4o", messages=HI)
    assert caught.value.status_code == 503
    assert caught.value.response.headers["retry-after"] in ("599", "600")
    message = caught.value.body["message"]
    assert message.startswith("keymux: no key can serve model 'gpt-4o' right now: ")
    assert "openai/a disabled for every model after credential_error for 600 s" in message
    async with km.session.get(km.admin + "/readyz") as response:
        assert response.status == 503


async def test_provider_fallback_after_every_key_of_the_first_failed(fake, keymux):
    fake.provider.script(key=KEYS["a"], status=500)
    km = await keymux(
        f"""
providers:
  openai:
    base_url: {fake.url}
    keys: [{{name: a, key: {KEYS["a"]}}}]
  backup:
    type: openai-compatible
    base_url: {fake.url}
    keys: [{{name: b, key: {KEYS["b"]}}}]
routes:
  - prefix: /openai
    providers: [openai, backup]
"""
    )
    result = await sdk(km, "/openai/v1").chat.completions.create(model="gpt-4o", messages=HI)
    assert result.choices[0].finish_reason == "stop"
    assert used(fake) == ["a", "b"]
    assert fake.provider.seen[1].path == "/v1/chat/completions"


async def test_anthropic_sdk_gets_its_key_and_version_header(fake, keymux):
    km = await keymux(
        f"providers:\n  anthropic:\n    type: anthropic\n    base_url: {fake.url}\n    keys: [{{name: c1, key: sk-ant-111111111111}}]\n"
    )
    client = anthropic.AsyncAnthropic(base_url=km.url, api_key="placeholder", max_retries=0)
    _clients.append(client)
    message = await client.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=HI)
    assert message.content[0].text == "Hello from the fake provider."
    seen = fake.provider.seen[0]
    assert (seen.key, seen.model) == ("sk-ant-111111111111", "claude-haiku-4-5")
    assert seen.headers["anthropic-version"] == client.default_headers["anthropic-version"]  # the app's own
    async with km.session.post(
        km.url + "/v1/messages", json={"model": "claude-haiku-4-5", "max_tokens": 5, "messages": HI}
    ) as r:
        assert r.status == 200
    assert fake.provider.seen[1].headers["anthropic-version"] == "2023-06-01"  # added when absent
    async with client.messages.stream(model="claude-haiku-4-5", max_tokens=10, messages=HI) as stream:
        text = "".join([chunk async for chunk in stream.text_stream])
    assert text == "tok0 tok1 tok2 tok3 tok4 "


async def test_azure_deployment_is_the_model(fake, keymux):
    km = await keymux(
        f"providers:\n  azure:\n    type: azure\n    base_url: {fake.url}\n    keys: [{{name: z, key: azure-key-0000000}}]\n"
    )
    client = openai.AsyncAzureOpenAI(
        azure_endpoint=km.url, api_key="placeholder", api_version="2024-06-01", max_retries=0
    )
    _clients.append(client)
    await client.chat.completions.create(model="gpt4o-prod", messages=HI)
    seen = fake.provider.seen[0]
    assert (seen.key, seen.model, seen.shape, seen.query) == (
        "azure-key-0000000",
        "gpt4o-prod",
        "azure",
        "api-version=2024-06-01",
    )
    assert seen.headers["api-key"] == "azure-key-0000000"


async def test_first_sse_chunk_reaches_the_app_before_the_upstream_finishes(fake, keymux):
    fake.provider.event_delay = 0.3
    km = await keymux(openai_config(fake.url, KEYS))
    stream = await sdk(km).chat.completions.create(model="gpt-4o", messages=HI, stream=True)
    first = await stream.__anext__()
    assert first.choices[0].delta.content == "tok0 "
    assert fake.provider.active == 1  # the upstream is still streaming
    rest = [chunk async for chunk in stream]
    assert len(rest) == 5


async def test_a_disconnecting_app_cancels_the_upstream_request(fake, keymux):
    fake.provider.script(delay=30)
    km = await keymux(openai_config(fake.url, KEYS))
    task = asyncio.create_task(sdk(km).chat.completions.create(model="gpt-4o", messages=HI))
    for _ in range(100):
        if fake.provider.active:
            break
        await asyncio.sleep(0.02)
    assert fake.provider.active == 1
    task.cancel()
    for _ in range(100):
        if fake.provider.cancelled:
            break
        await asyncio.sleep(0.02)
    assert (fake.provider.cancelled, fake.provider.active) == (1, 0)
    assert all(row["state"] == "usable" for row in km.sidecar.key_table())


async def test_unknown_route_lists_the_routes(fake, keymux):
    km = await keymux(openai_config(fake.url, KEYS) + "routes:\n  - prefix: /openai\n    providers: [openai]\n")
    async with km.session.post(km.url + "/v1/chat/completions", json={"model": "x"}) as response:
        assert response.status == 404
        assert (await response.json())["error"]["message"] == "keymux: no route for this path; routes: /openai"


async def test_a_body_over_the_limit_gets_413(fake, keymux):
    km = await keymux(openai_config(fake.url, KEYS) + "limits:\n  max_body_bytes: 1000\n")
    async with km.session.post(km.url + "/v1/chat/completions", data=b"x" * 2000) as response:
        assert response.status == 413
        assert (await response.json())["error"]["code"] == "request_too_large"
    assert fake.provider.seen == type(fake.provider.seen)()


async def test_the_same_body_is_resent_on_retry(fake, keymux):
    fake.provider.script(key=KEYS["a"], status=502)
    km = await keymux(openai_config(fake.url, KEYS))
    long_prompt = "word " * 40_000
    await sdk(km).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": long_prompt}])
    assert used(fake) == ["a", "b"]


async def test_a_bug_inside_keymux_answers_in_the_providers_shape(fake, keymux, monkeypatch):
    async def broken(self):
        raise RuntimeError("boom")

    monkeypatch.setattr("sidecar.proxy.Exchange._read_body", broken)
    km = await keymux(openai_config(fake.url, KEYS))
    async with km.session.post(km.url + "/v1/chat/completions", json={"model": "gpt-4o"}) as response:
        assert response.status == 500
        assert response.headers["x-keymux-error"] == "keymux_error"
        assert (await response.json())["error"]["message"] == "keymux: internal error"
    assert fake.provider.seen == type(fake.provider.seen)()
    assert await km.value("keymux_inflight_requests") == 0
