"""Secret hygiene: a key never leaves keymux except in the auth header of its own upstream request.

The fake provider quotes the full key (and a masked form) back in its error messages, as some
providers do. After a scenario full of failures, every byte the app received (headers and
bodies), every log line, /metrics, /keys, /healthz and /readyz are searched for each configured
secret and for every 8-character piece of it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import aiohttp
import openai
import pytest

from sidecar.accesslog import AccessLog
from sidecar.config import load_config
from sidecar.logs import JsonFormatter
from sidecar.redact import PIECE
from soak.stack import CLEAN, Answer, Stack, ask, chat, start_stack

OPENAI_KEYS = {
    "oa-1": "sk-proj-Vq7RtX2mKp9LwZ4nHc8sJd3fGb6yUe1aQ5",
    "oa-2": "sk-proj-N4hWc9TzE2rPx7KmB5vLq8GdJs3fYa6uR1",
    "oa-3": "sk-proj-Hm2Qe8VbX5tLk9WzR4cNp7JdF3sGy6aUq1",
}
ANTHROPIC_KEYS = {
    "an-1": "sk-ant-api03-Zr5Tq8Wm2Xk7Vn4Pb9Lc3Hd6Jf1Gs-AAAA",
    "an-2": "sk-ant-api03-Kc3Vp7Rn2Wq9Xt5Bm8Hz4Ld6Jf1Gs-BBBB",
}
INBOUND = "in-tok-3Fh8Qz2Lw6Xc9Vb4Nm7Kp1Rd5"
SECRETS = [*OPENAI_KEYS.values(), *ANTHROPIC_KEYS.values(), INBOUND]


def _keys(keys: dict[str, str]) -> str:
    return "".join(f"      - name: {name}\n        key: {secret}\n" for name, secret in keys.items())


CONFIG = f"""
providers:
  openai:
    type: openai
    base_url: {{base_url}}
    keys:
{_keys(OPENAI_KEYS)}  anthropic:
    type: anthropic
    base_url: {{base_url}}
    keys:
{_keys(ANTHROPIC_KEYS)}routes:
  - prefix: /openai
    providers: [openai]
  - prefix: /anthropic
    providers: [anthropic]
security:
  inbound_token: {INBOUND}
limits:
  error_body_bytes: 1024
"""
APP = {"x-keymux-token": INBOUND}


def pieces(secret: str) -> Iterator[str]:
    for start in range(len(secret) - PIECE + 1):
        yield secret[start : start + PIECE]


def leaks(haystack: bytes) -> list[str]:
    """Each secret piece found (the first piece per secret, to keep failures readable)."""
    found = []
    for secret in SECRETS:
        hit = next((p for p in pieces(secret) if p.encode() in haystack), None)
        if hit is not None:
            found.append(f"{hit!r} of {secret[:6]}…")
    return found


class LogLines(logging.Handler):
    """Every log line keymux writes, formatted exactly as in production."""

    def __init__(self, stack: Stack) -> None:
        super().__init__(logging.DEBUG)
        runtime = lambda: stack.sidecar.runtime  # noqa: E731 (the runtime changes on reload)
        self.setFormatter(JsonFormatter(lambda text: runtime().redact.text(text)))
        self._lines: list[str] = []
        # The access log writes its own lines, past logging: capture those too.
        self.access = AccessLog(write=self._write_access)
        stack.sidecar.proxy.access = self.access

    def _write_access(self, data: bytes) -> int:
        self._lines.extend(data.decode().splitlines())
        return len(data)

    def emit(self, record: logging.LogRecord) -> None:
        self._lines.append(self.format(record))

    @property
    def lines(self) -> list[str]:
        self.access.flush()
        return self._lines


StartStack = Callable[..., Awaitable[tuple[Stack, LogLines]]]


@pytest.fixture
async def stacks() -> AsyncIterator[StartStack]:
    root = logging.getLogger()
    level = root.level
    started: list[tuple[Stack, LogLines]] = []

    async def start(yaml_text: str = CONFIG) -> tuple[Stack, LogLines]:
        stack = await start_stack(yaml_text)
        lines = LogLines(stack)
        root.addHandler(lines)
        root.setLevel(logging.DEBUG)
        started.append((stack, lines))
        return stack, lines

    yield start
    for stack, lines in started:
        await stack.close()
        root.removeHandler(lines)
    root.setLevel(level)


def received(answer: Answer) -> bytes:
    return answer.raw_headers + b"\r\n\r\n" + answer.body


async def admin_pages(stack: Stack) -> bytes:
    pages = b""
    async with aiohttp.ClientSession() as session:
        for page in ("/metrics", "/keys", "/healthz", "/readyz"):
            async with session.get(stack.admin + page) as response:
                pages += await response.read()
    return pages


async def send(stack: Stack, route: str, model: str, *, stream: bool = False) -> Answer:
    path = "/v1/messages" if route == "/anthropic" else "/v1/chat/completions"
    return await ask(stack.client, stack.url + route + path, body=chat(model, stream), headers=APP)


async def test_echoed_keys_reach_neither_the_app_nor_the_logs_nor_the_admin_pages(stacks: StartStack) -> None:
    stack, lines = await stacks()
    fake = stack.provider
    oa, an = list(OPENAI_KEYS.values()), list(ANTHROPIC_KEYS.values())
    fake.script(key=oa[0], status=401, echo_key=True)  # credential: oa-1 disabled everywhere
    fake.script(key=oa[1], model="gpt-4o", status=500, echo_key=True)  # retried on oa-3
    fake.script(key=oa[2], model="gpt-4o", status=400, echo_key=True)  # the app's fault: forwarded
    fake.script(model="gpt-4o-mini", status=429, echo_key=True, headers={"retry-after": "7"})
    fake.script(model="o1", status=404, echo_key=True)  # model access on every key: the last is forwarded
    fake.script(key=an[0], model="claude-3-5-sonnet", status=529, echo_key=True)  # the provider is overloaded
    fake.script(model="claude-3-5-haiku", status=403, kind="model_access", echo_key=True)
    fake.script(key=an[0], model="claude-3-opus", status=500, echo_key=True)
    fake.script(key=an[1], model="claude-3-opus", status=400, echo_key=True)
    answers = [
        await send(stack, "/openai", "gpt-4o"),
        await send(stack, "/openai", "gpt-4o", stream=True),
        await send(stack, "/openai", "gpt-4o-mini"),
        await send(stack, "/openai", "gpt-4o-mini"),  # every key resting: keymux answers itself (429: they recover)
        await send(stack, "/openai", "o1"),
        await send(stack, "/anthropic", "claude-3-5-sonnet"),
        await send(stack, "/anthropic", "claude-3-5-haiku"),
        await send(stack, "/anthropic", "claude-3-opus", stream=True),
        await ask(stack.client, stack.url + "/openai/v1/chat/completions", body=chat()),  # no token
    ]
    assert [a.status for a in answers] == [400, 400, 429, 429, 404, 529, 403, 400, 401]
    # The scenario did make the fake quote keys: the search below is not vacuous.
    assert fake.keys_seen().count(oa[0]) == 1
    assert len(fake.seen) >= 10
    haystack = b"".join(received(a) for a in answers)
    haystack += "\n".join(lines.lines).encode()
    haystack += await admin_pages(stack)
    assert lines.lines, "no log line was captured"
    assert leaks(haystack) == []
    assert b"[redacted]" in b"".join(a.body for a in answers)
    end = await stack.finish()
    assert end.state() == CLEAN


async def test_a_masked_key_in_an_error_message_is_left_as_the_provider_wrote_it(stacks: StartStack) -> None:
    """`sk-…abcd` holds no 8-character piece of the key: redacting it would only hide which key."""
    stack, _ = await stacks()
    stack.provider.revoked = set(OPENAI_KEYS.values())
    answer = await send(stack, "/openai", "gpt-4o")
    assert answer.status == 401
    masked = "sk-…" + list(OPENAI_KEYS.values())[-1][-4:]
    assert masked in answer.json()["error"]["message"]
    assert leaks(received(answer)) == []
    await stack.finish()


async def test_the_inbound_token_is_never_forwarded_upstream(stacks: StartStack) -> None:
    stack, _ = await stacks()
    answer = await send(stack, "/openai", "gpt-4o")
    assert answer.status == 200
    assert [s.headers.get("x-keymux-token") for s in stack.provider.seen] == [None]
    assert all(INBOUND not in value for s in stack.provider.seen for value in s.headers.values())
    await stack.finish()


# -- echoes beyond the first error bytes -------------------------------------------------------


async def test_a_key_echoed_past_the_classified_prefix_of_an_error_body_is_redacted(stacks: StartStack) -> None:
    """keymux reads limits.error_body_bytes (1024 here) to classify an error; the rest is
    streamed on, and must be redacted too."""
    stack, _ = await stacks()
    key = OPENAI_KEYS["oa-1"]
    message = "x" * 1010 + f" Incorrect value; your key {key} is fine but the request is not."
    stack.provider.script(status=400, body={"error": {"message": message, "type": "invalid_request_error"}})
    answer = await send(stack, "/openai", "gpt-4o")
    assert answer.status == 400
    assert leaks(received(answer)) == []
    await stack.finish()


async def test_a_key_echoed_in_an_error_event_inside_a_200_stream_is_redacted(stacks: StartStack) -> None:
    """Anthropic reports errors inside a 200 stream (`event: error`); quoting the key there is
    as much a leak as in a 4xx body."""
    stack, _ = await stacks()
    stack.provider.script(fault="error_mid_stream", echo_key=True)
    answer = await send(stack, "/anthropic", "claude-3-5-sonnet", stream=True)
    assert answer.status == 200
    assert b"event: error" in answer.body
    assert leaks(received(answer)) == []
    await stack.finish()


async def test_an_upstream_that_reflects_the_request_does_not_hand_the_key_to_the_app(stacks: StartStack) -> None:
    """A TRACE (answered by many plain HTTP servers) reflects the request, auth header included."""
    stack, _ = await stacks()
    stack.provider.script(fault="echo_request")
    answer = await ask(stack.client, stack.url + "/openai/v1/models", method="TRACE", headers=APP)
    assert leaks(received(answer)) == []
    await stack.finish()


# -- the optional inbound token ----------------------------------------------------------------


TOKEN = "tok-8Hq2Zx5Wc7Vn3Lp9Rk4Md6Fj"


def _token_config(security: str, provider: str = "openai") -> str:
    return f"""
providers:
  {provider}:
    type: {provider}
    base_url: {{base_url}}
    keys:
      - name: k
        key: sk-token-test-5Tq8Wm2Xk7Vn4Pb9
security:
{security}
"""


async def _call(stack: Stack, headers: dict[str, str], path: str = "/v1/chat/completions") -> Answer:
    return await ask(stack.client, stack.url + path, body=chat(), headers=headers)


@pytest.mark.parametrize(
    "headers",
    [{}, {"x-keymux-token": "wrong-token-wrong-token"}, {"x-keymux-token": TOKEN[:-1]}, {"x-other": TOKEN}],
)
async def test_without_the_inbound_token_the_app_gets_401_in_the_providers_shape(headers: dict[str, str]) -> None:
    stack = await start_stack(_token_config(f"  inbound_token: {TOKEN}"))
    try:
        answer = await _call(stack, headers)
        assert answer.status == 401
        assert set(answer.json()) == {"error"}
        assert TOKEN not in answer.body.decode()
        assert list(stack.provider.seen) == []
        assert stack.sidecar.key_table()[0]["consecutive_failures"] == 0
    finally:
        end = await stack.finish()
    assert end.state() == CLEAN
    assert end.attempts == 0


@pytest.mark.parametrize("presented", [TOKEN, f"Bearer {TOKEN}"])
async def test_with_the_inbound_token_in_the_default_header_the_request_goes_through(presented: str) -> None:
    stack = await start_stack(_token_config(f"  inbound_token: {TOKEN}"))
    try:
        answer = await _call(stack, {"x-keymux-token": presented})
        assert answer.status == 200
        assert [s.headers.get("x-keymux-token") for s in stack.provider.seen] == [None]
    finally:
        await stack.close()


async def test_a_custom_inbound_header_replaces_the_default_one() -> None:
    stack = await start_stack(_token_config(f"  inbound_token: {TOKEN}\n  inbound_header: X-App-Token"))
    try:
        assert (await _call(stack, {"X-App-Token": TOKEN})).status == 200
        assert (await _call(stack, {"x-keymux-token": TOKEN})).status == 401
        forwarded = [{k.lower() for k in s.headers} for s in stack.provider.seen]
        assert forwarded == [forwarded[0] - {"x-app-token"}]
    finally:
        await stack.close()


async def test_the_inbound_token_can_be_the_sdks_api_key() -> None:
    """With inbound_header: authorization, apps pass the token as their SDK's api_key."""
    stack = await start_stack(_token_config(f"  inbound_token: {TOKEN}\n  inbound_header: authorization"))
    try:
        good = openai.AsyncOpenAI(base_url=stack.url + "/v1", api_key=TOKEN, max_retries=0)
        bad = openai.AsyncOpenAI(base_url=stack.url + "/v1", api_key="sk-not-the-token", max_retries=0)
        reply = await good.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "Hello from the fake provider."
        with pytest.raises(openai.AuthenticationError):
            await bad.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert [s.key for s in stack.provider.seen] == ["sk-token-test-5Tq8Wm2Xk7Vn4Pb9"]
        await good.close()
        await bad.close()
    finally:
        await stack.close()


async def test_an_anthropic_route_answers_401_in_the_anthropic_shape() -> None:
    stack = await start_stack(_token_config(f"  inbound_token: {TOKEN}", provider="anthropic"))
    try:
        answer = await _call(stack, {}, path="/v1/messages")
        assert answer.status == 401
        body = answer.json()
        assert (body["type"], body["error"]["type"]) == ("error", "authentication_error")
    finally:
        await stack.close()


async def test_a_reload_that_changes_the_token_refuses_the_old_one() -> None:
    stack = await start_stack(_token_config(f"  inbound_token: {TOKEN}"))
    try:
        new = "tok-Rk4Md6Fj8Hq2Zx5Wc7Vn3Lp9"
        assert stack.sidecar.reload(_token_config(f"  inbound_token: {new}").replace("{base_url}", stack.upstream.url))
        assert (await _call(stack, {"x-keymux-token": TOKEN})).status == 401
        assert (await _call(stack, {"x-keymux-token": new})).status == 200
    finally:
        await stack.close()


def test_the_app_listener_defaults_to_loopback() -> None:
    config = load_config(_token_config("  {}").replace("{base_url}", "http://127.0.0.1:1"), {}, lambda p: "")
    assert config.listen == ("127.0.0.1", 4000)
