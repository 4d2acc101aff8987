"""Observability, end to end: scripted upstream behaviour, then exact values read back from /metrics,
/keys, /readyz and the access log of a real keymux on real sockets."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from sidecar import __version__
from sidecar.accesslog import AccessLog
from sidecar.logs import JsonFormatter
from sidecar.redact import PIECE
from sidecar.usage import UsageTail
from tests.conftest import FakeServer, Running, StartKeymux, openai_config

A = "sk-test-aaaaaaaaaaaaaaaaaaaa1111"
B = "sk-test-bbbbbbbbbbbbbbbbbbbb2222"
C = "sk-test-cccccccccccccccccccc3333"
CLAUDE = "sk-ant-test-dddddddddddddddd4444"
GEMINI = "AIzaTest-eeeeeeeeeeeeeeeeeeee5555"
ALL_SECRETS = (A, B, C, CLAUDE, GEMINI)

Labels = tuple[tuple[str, str], ...]


def labels(**pairs: str) -> Labels:
    return tuple(sorted(pairs.items()))


def family(samples: dict[tuple[str, Labels], float], name: str) -> dict[Labels, float]:
    """Every series of one sample name, keyed by its sorted labels."""
    return {ls: value for (n, ls), value in samples.items() if n == name}


async def settle(km: Running) -> dict[tuple[str, Labels], float]:
    """Wait until no request is in flight (a request is reported as it leaves), then scrape.

    The bound is a count of polls, not a time assertion: a request the client has finished
    reading may still be leaving keymux for a loop iteration or two.
    """
    for _ in range(200):
        samples = await km.metrics()
        if samples[("keymux_inflight_requests", ())] == 0:
            return samples
        await asyncio.sleep(0.02)
    raise AssertionError("requests still in flight")


async def chat(
    km: Running, model: str = "gpt-4o-mini", path: str = "/v1/chat/completions", **body: Any
) -> tuple[int, bytes]:
    payload = {"model": model, "messages": [{"role": "user", "content": "hi"}], **body}
    async with km.session.post(km.url + path, json=payload, headers={"Authorization": "Bearer app-placeholder"}) as r:
        return r.status, await r.read()


def two_keys(fake: FakeServer) -> str:
    return openai_config(fake.url, {"a": A, "b": B})


# -- retries, fallbacks and provider routing health --------------------------------------------


async def test_a_revoked_key_recovered_by_another_counts_one_failed_attempt_and_one_success(
    fake: FakeServer, keymux: StartKeymux
) -> None:
    fake.provider.revoked.add(A)
    km = await keymux(two_keys(fake))

    status, _ = await chat(km)

    assert status == 200
    samples = await settle(km)
    m = "gpt-4o-mini"
    assert family(samples, "keymux_upstream_attempts_total") == {
        labels(provider="openai", key="a", model=m, outcome="credential_error"): 1,
        labels(provider="openai", key="b", model=m, outcome="success"): 1,
    }
    assert family(samples, "keymux_requests_total") == {
        labels(route="/", provider="openai", model=m, outcome="success"): 1
    }
    # Another key of the provider recovered the request: routing health shows no failure.
    assert family(samples, "keymux_provider_requests_total") == {
        labels(provider="openai", model=m, outcome="success"): 1
    }
    assert family(samples, "keymux_key_retries_total") == {
        labels(provider="openai", model=m, reason="credential_error"): 1
    }
    assert family(samples, "keymux_provider_fallbacks_total") == {}
    # A credential failure disables the key for every model: model="*".
    assert family(samples, "keymux_key_state") == {
        labels(provider="openai", key="a", model="*"): 2,
        labels(provider="openai", key="b", model="*"): 0,
    }
    assert family(samples, "keymux_request_duration_seconds_count") == {
        labels(route="/", model=m, outcome="success"): 1
    }
    assert family(samples, "keymux_upstream_ttfb_seconds_count") == {labels(provider="openai", model=m): 2}
    assert family(samples, "keymux_overhead_seconds_count") == {labels(route="/"): 1}
    assert samples[("keymux_inflight_requests", ())] == 0


async def test_a_model_scoped_429_cools_the_key_for_that_model_only(fake: FakeServer, keymux: StartKeymux) -> None:
    fake.provider.script(key=A, model="gpt-4o", status=429, headers={"retry-after": "30"})
    km = await keymux(two_keys(fake))

    assert (await chat(km, "gpt-4o"))[0] == 200
    assert (await chat(km, "gpt-4o-mini"))[0] == 200  # a still serves another model

    samples = await settle(km)
    assert family(samples, "keymux_key_state") == {
        labels(provider="openai", key="a", model="*"): 0,
        labels(provider="openai", key="b", model="*"): 0,
        labels(provider="openai", key="a", model="gpt-4o"): 1,
    }
    assert family(samples, "keymux_upstream_attempts_total") == {
        labels(provider="openai", key="a", model="gpt-4o", outcome="rate_limited"): 1,
        labels(provider="openai", key="b", model="gpt-4o", outcome="success"): 1,
        labels(provider="openai", key="a", model="gpt-4o-mini", outcome="success"): 1,
    }
    assert family(samples, "keymux_key_retries_total") == {
        labels(provider="openai", model="gpt-4o", reason="rate_limited"): 1
    }


async def test_key_fallback_then_provider_fallback(fake: FakeServer, keymux: StartKeymux) -> None:
    """Both keys of the first provider fail with 5xx: one key retry, one provider fallback, and
    provider routing health shows the first provider failing the request end to end."""
    fake.provider.script(key=A, status=500)
    fake.provider.script(key=B, status=500)
    km = await keymux(f"""
        providers:
          primary:
            type: openai
            base_url: {fake.url}
            keys:
              - name: p1
                key: {A}
              - name: p2
                key: {B}
          backup:
            type: openai
            base_url: {fake.url}
            keys:
              - name: b1
                key: {C}
        routes:
          - prefix: /llm
            providers: [primary, backup]
        """)

    status, _ = await chat(km, path="/llm/v1/chat/completions")

    assert status == 200
    samples = await settle(km)
    m = "gpt-4o-mini"
    assert family(samples, "keymux_provider_fallbacks_total") == {
        labels(route="/llm", from_provider="primary", to_provider="backup"): 1
    }
    assert family(samples, "keymux_key_retries_total") == {
        labels(provider="primary", model=m, reason="upstream_error"): 1
    }
    assert family(samples, "keymux_provider_requests_total") == {
        labels(provider="primary", model=m, outcome="upstream_error"): 1,
        labels(provider="backup", model=m, outcome="success"): 1,
    }
    assert family(samples, "keymux_requests_total") == {
        labels(route="/llm", provider="backup", model=m, outcome="success"): 1
    }
    assert family(samples, "keymux_upstream_attempts_total") == {
        labels(provider="primary", key="p1", model=m, outcome="upstream_error"): 1,
        labels(provider="primary", key="p2", model=m, outcome="upstream_error"): 1,
        labels(provider="backup", key="b1", model=m, outcome="success"): 1,
    }


async def test_a_provider_skipped_for_want_of_a_usable_key_still_counts_a_fallback(
    fake: FakeServer, keymux: StartKeymux
) -> None:
    fake.provider.revoked.add(A)
    km = await keymux(f"""
        providers:
          primary:
            type: openai
            base_url: {fake.url}
            keys: [{{name: p1, key: {A}}}]
          backup:
            type: openai
            base_url: {fake.url}
            keys: [{{name: b1, key: {B}}}]
        routes:
          - prefix: /llm
            providers: [primary, backup]
        """)
    for _ in range(3):
        assert (await chat(km, path="/llm/v1/chat/completions"))[0] == 200

    samples = await settle(km)
    m = "gpt-4o-mini"
    assert family(samples, "keymux_provider_fallbacks_total") == {
        labels(route="/llm", from_provider="primary", to_provider="backup"): 3
    }
    assert family(samples, "keymux_provider_requests_total") == {
        labels(provider="primary", model=m, outcome="credential_error"): 1,
        labels(provider="primary", model=m, outcome="no_key_available"): 2,
        labels(provider="backup", model=m, outcome="success"): 3,
    }


async def test_a_request_no_key_can_serve_counts_no_key_available(fake: FakeServer, keymux: StartKeymux) -> None:
    fake.provider.revoked.add(A)
    km = await keymux(openai_config(fake.url, {"a": A}))

    assert (await chat(km))[0] == 401  # the provider's own answer, passed through
    assert (await chat(km))[0] == 503  # keymux's: the only key is disabled

    samples = await settle(km)
    m = "gpt-4o-mini"
    assert family(samples, "keymux_requests_total") == {
        labels(route="/", provider="openai", model=m, outcome="credential_error"): 1,
        labels(route="/", provider="none", model=m, outcome="no_key_available"): 1,
    }
    assert family(samples, "keymux_provider_requests_total") == {
        labels(provider="openai", model=m, outcome="credential_error"): 1,
        labels(provider="openai", model=m, outcome="no_key_available"): 1,
    }
    assert family(samples, "keymux_upstream_attempts_total") == {
        labels(provider="openai", key="a", model=m, outcome="credential_error"): 1
    }


async def test_a_stream_broken_by_the_upstream_counts_its_attempt_once(fake: FakeServer, keymux: StartKeymux) -> None:
    fake.provider.script(fault="reset_mid_stream")
    km = await keymux(openai_config(fake.url, {"a": A}))

    with pytest.raises(aiohttp.ClientError):
        await chat(km, stream=True)

    samples = await settle(km)
    m = "gpt-4o-mini"
    assert family(samples, "keymux_requests_total") == {
        labels(route="/", provider="openai", model=m, outcome="connection_error"): 1
    }
    # One upstream attempt, one count: the attempt that broke mid-stream is a connection error.
    assert family(samples, "keymux_upstream_attempts_total") == {
        labels(provider="openai", key="a", model=m, outcome="connection_error"): 1
    }


async def test_a_client_that_leaves_while_waiting_is_counted_as_client_disconnected(
    fake: FakeServer, keymux: StartKeymux
) -> None:
    fake.provider.script(delay=30)
    km = await keymux(openai_config(fake.url, {"a": A}))

    with pytest.raises(asyncio.TimeoutError):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as impatient:
            await impatient.post(km.url + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": []})

    samples = await settle(km)
    m = "gpt-4o-mini"
    assert family(samples, "keymux_requests_total") == {
        labels(route="/", provider="openai", model=m, outcome="client_disconnected"): 1
    }
    assert family(samples, "keymux_upstream_attempts_total") == {
        labels(provider="openai", key="a", model=m, outcome="client_disconnected"): 1
    }
    assert family(samples, "keymux_provider_requests_total") == {
        labels(provider="openai", model=m, outcome="client_disconnected"): 1
    }


# -- key state over time ------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_key_state_series_go_when_their_cooldown_ends(fake: FakeServer, keymux: StartKeymux) -> None:
    clock = Clock()
    fake.provider.script(key=A, model="gpt-4o", status=429, headers={"retry-after": "30"}, times=1)
    fake.provider.revoked.add(B)
    km = await keymux(two_keys(fake), clock=clock)

    assert (await chat(km, "gpt-4o"))[0] == 401  # a: 429 for gpt-4o; b: 401, disabled

    state = family(await settle(km), "keymux_key_state")
    assert state == {
        labels(provider="openai", key="a", model="*"): 0,
        labels(provider="openai", key="b", model="*"): 2,
        labels(provider="openai", key="a", model="gpt-4o"): 1,
    }

    clock.now += 31  # the 429's retry-after has passed; the credential cooldown (600 s) has not
    state = family(await km.metrics(), "keymux_key_state")
    assert state == {
        labels(provider="openai", key="a", model="*"): 0,
        labels(provider="openai", key="b", model="*"): 2,
    }

    clock.now += 600
    state = family(await km.metrics(), "keymux_key_state")
    assert state == {
        labels(provider="openai", key="a", model="*"): 0,
        labels(provider="openai", key="b", model="*"): 0,
    }


# -- tokens -------------------------------------------------------------------------------------


async def test_tokens_are_read_from_json_answers_and_openai_streams_with_usage(
    fake: FakeServer, keymux: StartKeymux
) -> None:
    fake.provider.script(model="gpt-4o", events=9)
    km = await keymux(openai_config(fake.url, {"a": A}))

    assert (await chat(km, "gpt-4o-mini"))[0] == 200
    status, body = await chat(km, "gpt-4o", stream=True, stream_options={"include_usage": True})
    assert status == 200 and body.endswith(b"data: [DONE]\n\n")
    assert (await chat(km, "gpt-4.1", stream=True))[0] == 200  # no usage asked for: none counted

    samples = await settle(km)
    assert family(samples, "keymux_tokens_total") == {
        labels(provider="openai", key="a", model="gpt-4o-mini", kind="prompt"): 12,
        labels(provider="openai", key="a", model="gpt-4o-mini", kind="completion"): 7,
        labels(provider="openai", key="a", model="gpt-4o", kind="prompt"): 12,
        labels(provider="openai", key="a", model="gpt-4o", kind="completion"): 9,
    }


async def test_tokens_are_credited_to_the_key_that_answered(fake: FakeServer, keymux: StartKeymux) -> None:
    fake.provider.revoked.add(A)
    km = await keymux(two_keys(fake))

    assert (await chat(km, stream=True, stream_options={"include_usage": True}))[0] == 200

    assert family(await settle(km), "keymux_tokens_total") == {
        labels(provider="openai", key="b", model="gpt-4o-mini", kind="prompt"): 12,
        labels(provider="openai", key="b", model="gpt-4o-mini", kind="completion"): 5,
    }


async def test_tokens_are_read_from_anthropic_and_gemini_answers(fake: FakeServer, keymux: StartKeymux) -> None:
    fake.provider.script(model="claude-3-5-haiku", events=11)
    km = await keymux(f"""
        providers:
          anthropic:
            type: anthropic
            base_url: {fake.url}
            keys:
              - name: claude
                key: {CLAUDE}
          gemini:
            type: gemini
            base_url: {fake.url}
            keys:
              - name: gem
                key: {GEMINI}
        """)
    message = {"max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}

    async with km.session.post(km.url + "/anthropic/v1/messages", json={"model": "claude-3-5-sonnet", **message}) as r:
        assert r.status == 200
        await r.read()
    async with km.session.post(
        km.url + "/anthropic/v1/messages", json={"model": "claude-3-5-haiku", "stream": True, **message}
    ) as r:
        assert r.status == 200
        assert b"message_stop" in await r.read()
    gemini_body = {"contents": [{"parts": [{"text": "hi"}]}]}
    async with km.session.post(
        km.url + "/gemini/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse", json=gemini_body
    ) as r:
        assert r.status == 200
        await r.read()

    assert family(await settle(km), "keymux_tokens_total") == {
        labels(provider="anthropic", key="claude", model="claude-3-5-sonnet", kind="prompt"): 12,
        labels(provider="anthropic", key="claude", model="claude-3-5-sonnet", kind="completion"): 7,
        labels(provider="anthropic", key="claude", model="claude-3-5-haiku", kind="prompt"): 12,
        labels(provider="anthropic", key="claude", model="claude-3-5-haiku", kind="completion"): 11,
        labels(provider="gemini", key="gem", model="gemini-2.0-flash", kind="prompt"): 12,
        labels(provider="gemini", key="gem", model="gemini-2.0-flash", kind="completion"): 5,
    }


# -- cardinality and secrets --------------------------------------------------------------------


async def test_models_beyond_the_cap_are_counted_as_other(fake: FakeServer, keymux: StartKeymux) -> None:
    km = await keymux(f"""
        metrics:
          max_models: 2
        providers:
          openai:
            type: openai
            base_url: {fake.url}
            keys:
              - name: a
                key: {A}
              - name: pinned
                key: {B}
                models: [ft-pinned]
        """)

    for model in ("m1", "m2", "m3", "m4", "ft-pinned", "m1"):
        assert (await chat(km, model))[0] == 200
    async with km.session.get(km.url + "/v1/models") as r:  # names no model: "unknown", not a slot
        assert r.status == 200

    samples = await settle(km)
    assert family(samples, "keymux_requests_total") == {
        labels(route="/", provider="openai", model="m1", outcome="success"): 2,
        labels(route="/", provider="openai", model="m2", outcome="success"): 1,
        labels(route="/", provider="openai", model="other", outcome="success"): 2,
        # configured in an allow-list: always its own label, whatever the cap
        labels(route="/", provider="openai", model="ft-pinned", outcome="success"): 1,
        labels(route="/", provider="openai", model="unknown", outcome="success"): 1,
    }
    models = {dict(ls)["model"] for (name, ls) in samples if "model" in dict(ls)}
    assert models == {"m1", "m2", "other", "ft-pinned", "unknown", "*"}


def leaked(text: str) -> list[str]:
    """Any run of PIECE characters of any test secret found in `text`."""
    return [s for s in ALL_SECRETS for i in range(len(s) - PIECE + 1) if s[i : i + PIECE] in text]


async def test_the_key_label_is_the_configured_name_never_the_secret(fake: FakeServer, keymux: StartKeymux) -> None:
    fake.provider.revoked.add(A)
    fake.provider.script(key=B, model="gpt-4o", status=429, echo_key=True)
    km = await keymux(
        f"""
        providers:
          openai:
            type: openai
            base_url: {fake.url}
            keys:
              - name: a
                key: {A}
            keys_from_env: OPENAI_KEYS
        """,
        env={"OPENAI_KEYS": f"{B},{C}"},
    )
    await chat(km, "gpt-4o")
    await chat(km, "gpt-4o-mini", stream=True, stream_options={"include_usage": True})

    async with km.session.get(km.admin + "/metrics") as r:
        text = await r.text()
    async with km.session.get(km.admin + "/keys") as r:
        keys_json = await r.text()
    samples = await settle(km)

    key_labels = {dict(ls)["key"] for (_, ls) in samples if "key" in dict(ls)}
    assert key_labels == {"a", "openai-2", "openai-3"}
    assert leaked(text) == []
    assert leaked(keys_json) == []


# -- admin endpoints ----------------------------------------------------------------------------

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


async def test_keys_lists_each_key_and_each_cooling_model(fake: FakeServer, keymux: StartKeymux) -> None:
    fake.provider.revoked.add(A)
    km = await keymux(two_keys(fake))
    assert (await chat(km, "gpt-4o"))[0] == 200  # a: 401, disabled; b serves
    fake.provider.script(key=B, model="gpt-4o", status=429, headers={"retry-after": "30"})
    assert (await chat(km, "gpt-4o"))[0] == 429  # b: 429 for gpt-4o, nothing left to try

    async with km.session.get(km.admin + "/keys") as r:
        assert r.status == 200
        rows = (await r.json())["keys"]

    untils = [row.pop("until") for row in rows]
    assert rows == [
        {"provider": "openai", "key": "a", "model": "*", "state": "disabled", "consecutive_failures": 0, "last_failure": "credential_error", "limit": None},
        {"provider": "openai", "key": "b", "model": "*", "state": "usable", "consecutive_failures": 0, "last_failure": None, "limit": None},
        {"provider": "openai", "key": "b", "model": "gpt-4o", "state": "cooling", "consecutive_failures": 0, "last_failure": "rate_limited", "limit": None},
    ]  # fmt: skip
    assert untils[1] is None
    assert ISO.match(untils[0]) and ISO.match(untils[2])
    assert untils[2] < untils[0]  # 30 s of rate limit against a 600 s credential cooldown
    assert family(await settle(km), "keymux_key_state") == {
        labels(provider="openai", key="a", model="*"): 2,
        labels(provider="openai", key="b", model="*"): 0,
        labels(provider="openai", key="b", model="gpt-4o"): 1,
    }


async def test_readyz_turns_503_when_every_key_is_disabled(fake: FakeServer, keymux: StartKeymux) -> None:
    km = await keymux(two_keys(fake))

    async with km.session.get(km.admin + "/readyz") as r:
        assert (r.status, await r.json()) == (200, {"status": "ready", "usable_keys": 2})
    fake.provider.revoked |= {A, B}
    assert (await chat(km))[0] == 401
    async with km.session.get(km.admin + "/readyz") as r:
        assert (r.status, await r.json()) == (503, {"status": "no usable key"})
    async with km.session.get(km.admin + "/healthz") as r:  # alive all the same
        assert (r.status, await r.json()) == (200, {"status": "ok", "version": __version__})
    assert family(await settle(km), "keymux_key_state") == {
        labels(provider="openai", key="a", model="*"): 2,
        labels(provider="openai", key="b", model="*"): 2,
    }


async def test_build_info_and_an_idle_scrape(fake: FakeServer, keymux: StartKeymux) -> None:
    km = await keymux(two_keys(fake))

    samples = await km.metrics()

    assert samples[("keymux_build_info", labels(version=__version__))] == 1
    assert samples[("keymux_inflight_requests", ())] == 0
    assert not any(name.endswith("_created") for name, _ in samples)


async def test_reloads_are_counted_and_a_removed_key_leaves_no_series(fake: FakeServer, keymux: StartKeymux) -> None:
    km = await keymux(two_keys(fake))
    await chat(km)
    await chat(km)  # round robin: one request per key

    header = "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n"
    assert km.sidecar.reload(header + openai_config(fake.url, {"a": A})) is True
    assert km.sidecar.reload("providers: [") is False

    samples = await settle(km)
    assert family(samples, "keymux_config_reloads_total") == {labels(result="success"): 1, labels(result="failure"): 1}
    assert family(samples, "keymux_upstream_attempts_total") == {
        labels(provider="openai", key="a", model="gpt-4o-mini", outcome="success"): 1
    }
    assert family(samples, "keymux_key_state") == {labels(provider="openai", key="a", model="*"): 0}


# -- the access log -----------------------------------------------------------------------------


class Lines(logging.Handler):
    """Every log line of a keymux: logging's through its formatter, and its access log's."""

    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(formatter)
        self.stream = io.StringIO()
        self.access_bytes = bytearray()
        self.access = AccessLog(write=self._write_access)

    def _write_access(self, data: bytes) -> int:
        self.access_bytes += data
        return len(data)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream.write(self.format(record) + "\n")

    def text(self) -> str:
        self.access.flush()
        return self.stream.getvalue() + self.access_bytes.decode()

    def records(self, logger: str) -> list[dict[str, Any]]:
        parsed = [json.loads(line) for line in self.text().splitlines()]
        return [line for line in parsed if line["logger"] == logger]


@pytest.fixture
def keymux_log() -> Callable[[Running], Lines]:
    """Capture every keymux log line through keymux's own JSON formatter and redactor."""
    logger = logging.getLogger("keymux")
    level = logger.level
    handlers: list[Lines] = []

    def attach(km: Running) -> Lines:
        handler = Lines(JsonFormatter(km.sidecar.runtime.redact.text))
        handler.access.enabled = km.sidecar.proxy.access.enabled
        km.sidecar.proxy.access = handler.access
        handlers.append(handler)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        return handler

    yield attach  # type: ignore[misc]
    for handler in handlers:
        logger.removeHandler(handler)
    logger.setLevel(level)


ACCESS_FIELDS = {
    "time", "level", "logger", "msg", "route", "method", "provider", "keys", "model",
    "attempts", "outcome", "status", "ttfb_ms", "duration_ms", "bytes",
}  # fmt: skip


async def test_one_access_line_per_request_with_names_and_numbers_only(
    fake: FakeServer, keymux: StartKeymux, keymux_log: Callable[[Running], Lines]
) -> None:
    km = await keymux(two_keys(fake))
    log = keymux_log(km)
    fake.provider.script(key=A, status=500, echo_key=True, times=1)

    first = await chat(km)  # a: 500 quoting its key; b answers
    fake.provider.script(key=A, status=400, echo_key=True, times=1)
    second = await chat(km)  # a: 400 quoting its key, the app's mistake: passed through
    await settle(km)

    lines = log.records("keymux.access")
    assert [set(line) for line in lines] == [ACCESS_FIELDS, ACCESS_FIELDS]
    timings = [{field: line.pop(field) for field in ("time", "ttfb_ms", "duration_ms")} for line in lines]
    common = {"level": "info", "logger": "keymux.access", "msg": "request", "route": "/", "method": "POST"}
    common |= {"provider": "openai", "model": "gpt-4o-mini"}
    assert lines == [
        {**common, "keys": ["openai/a", "openai/b"], "attempts": 2, "outcome": "success", "status": 200, "bytes": len(first[1])},
        {**common, "keys": ["openai/a"], "attempts": 1, "outcome": "client_error", "status": 400, "bytes": len(second[1])},
    ]  # fmt: skip
    for timing in timings:
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", timing["time"])
        assert isinstance(timing["ttfb_ms"], float) and isinstance(timing["duration_ms"], float)
    assert second[0] == 400 and leaked(second[1].decode()) == []  # the echoed key is redacted
    assert leaked(log.text()) == []


async def test_other_log_lines_quoting_a_secret_are_redacted(
    fake: FakeServer, keymux: StartKeymux, keymux_log: Callable[[Running], Lines]
) -> None:
    km = await keymux(two_keys(fake))
    log = keymux_log(km)

    logging.getLogger("keymux").warning("upstream said: Incorrect API key provided: %s", A)

    [line] = log.records("keymux")
    assert line["msg"] == "upstream said: Incorrect API key provided: [redacted]"
    assert leaked(log.text()) == []


async def test_the_log_level_decides_whether_access_lines_are_written(
    fake: FakeServer, keymux: StartKeymux, keymux_log: Callable[[Running], Lines]
) -> None:
    km = await keymux("log_level: warning\n" + two_keys(fake))
    log = keymux_log(km)
    root_level = logging.getLogger().level
    try:
        await chat(km, "quiet-model")
        assert km.sidecar.reload("log_level: info\n" + two_keys(fake))
        await chat(km, "loud-model")
        assert km.sidecar.reload("log_level: error\n" + two_keys(fake))
        await chat(km, "quiet-again")
        await settle(km)
    finally:
        logging.getLogger().setLevel(root_level)

    assert [line["model"] for line in log.records("keymux.access")] == ["loud-model"]


async def test_the_admin_listener_never_forwards_upstream(fake: FakeServer, keymux: StartKeymux) -> None:
    km = await keymux(two_keys(fake))

    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("POST", "/metrics")):
        async with km.session.request(method, km.admin + path, json={"model": "gpt-4o-mini"}) as r:
            assert r.status in (404, 405)
            assert leaked(await r.text()) == []

    assert list(fake.provider.seen) == []


async def test_the_access_line_of_a_request_that_never_reached_upstream(
    fake: FakeServer, keymux: StartKeymux, keymux_log: Callable[[Running], Lines]
) -> None:
    fake.provider.revoked.add(A)
    km = await keymux(openai_config(fake.url, {"a": A}))
    await chat(km)  # a: 401, disabled
    log = keymux_log(km)

    status, body = await chat(km)
    await settle(km)

    assert status == 503
    [line] = log.records("keymux.access")
    assert {k: line[k] for k in ("provider", "keys", "attempts", "outcome", "status", "ttfb_ms", "bytes")} == {
        "provider": "none",
        "keys": [],
        "attempts": 0,
        "outcome": "no_key_available",
        "status": 503,
        "ttfb_ms": None,
        "bytes": len(body),  # keymux's own answer is bytes sent all the same
    }


def test_usage_is_found_at_the_end_of_a_large_answer_read_in_one_chunk() -> None:
    """A JSON answer over 16 KB can reach keymux in a single read; its usage sits at the end."""
    answer = {
        "choices": [{"message": {"content": "x" * 40_000}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7},
    }
    tail = UsageTail()

    tail.feed(json.dumps(answer).encode())

    assert tail.counts() == {"prompt": 12, "completion": 7}
