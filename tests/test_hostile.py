"""Hostile input from the app side, through real sockets (raw bytes where a client library would
refuse to send them): nothing reaches a host other than the configured base_url, nothing crashes
keymux, and no key's health moves.

keymux's upstream client resolves names through a stub: `upstream.test` is the fake provider,
every other name is a tripwire listener that counts the connections it gets.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import pytest

from soak.stack import (
    CLEAN,
    Answer,
    Baseline,
    Stack,
    StubResolver,
    Tripwire,
    ask,
    chat,
    raw_status,
    send_raw,
    start_stack,
)

KEY = "sk-hostile-a-4e1f9b7c2d60a835"
MAX_BODY = 16384

# No base path and no port: the shape of https://api.openai.com, where a careless join of
# base_url and the request target changes the host.
PLAIN = f"""
providers:
  openai:
    type: openai
    base_url: http://upstream.test
    keys:
      - name: a
        key: {KEY}
limits:
  max_body_bytes: {MAX_BODY}
"""
# A base path that no request may climb out of.
BASED = PLAIN.replace("http://upstream.test", "http://upstream.test/base")
# Two routes, each provider under its own base path.
ROUTED = f"""
providers:
  openai:
    type: openai
    base_url: http://upstream.test/o
    keys:
      - name: a
        key: {KEY}
  anthropic:
    type: anthropic
    base_url: http://upstream.test/a
    keys:
      - name: b
        key: sk-ant-hostile-b-93c0d2e8f1a7
routes:
  - prefix: /openai
    providers: [openai]
  - prefix: /anthropic
    providers: [anthropic]
"""


@dataclass
class Hostile:
    stack: Stack
    tripwire: Tripwire
    resolver: StubResolver
    prefix: str = ""  # the route a good request takes, to show keymux still serves

    async def raw(self, request: bytes) -> bytes:
        return await send_raw(self.stack.url, request)

    def seen(self) -> list[tuple[str, str]]:
        return [(s.method, s.path) for s in self.stack.provider.seen]

    def hosts(self) -> list[str]:
        return [s.headers.get("Host", "") for s in self.stack.provider.seen]

    def untouched(self) -> dict[str, object]:
        """Where requests went and what health says; compare with UNTOUCHED."""
        table = self.stack.sidecar.key_table()
        return {
            "names_resolved": sorted(set(self.resolver.asked)),
            "tripwire_connections": self.tripwire.connections,
            "hosts": sorted(set(self.hosts())),
            "health": sorted({(r["state"], r["consecutive_failures"], r["last_failure"]) for r in table}),
        }

    async def still_serves(self) -> bool:
        answer = await ask(self.stack.client, self.stack.url + self.prefix + "/v1/chat/completions", body=chat())
        return answer.status == 200


UNTOUCHED = {
    "names_resolved": ["upstream.test"],
    "tripwire_connections": 0,
    "hosts": ["upstream.test"],
    "health": [("usable", 0, None)],
}


StartHostile = Callable[..., Awaitable[Hostile]]


@pytest.fixture
async def hostile() -> AsyncIterator[StartHostile]:
    started: list[Hostile] = []

    async def start(yaml_text: str = PLAIN) -> Hostile:
        baseline = await Baseline.take()
        tripwire = await Tripwire().start()
        stack = await start_stack(yaml_text, baseline=baseline)
        stack.closers.append(tripwire.close)
        upstream_port = int(stack.upstream.url.rsplit(":", 1)[1])
        resolver = StubResolver({"upstream.test": upstream_port}, default=tripwire.port)
        stack.resolve_with(resolver)
        h = Hostile(stack, tripwire, resolver)
        started.append(h)
        return h

    yield start
    for h in started:
        await h.stack.close()


def request(target: bytes, *headers: bytes, method: bytes = b"GET", body: bytes = b"") -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: localhost", *headers, b"Connection: close"]
    if body:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def keymux_error(raw: bytes) -> tuple[int, str | None]:
    """Status and keymux's error code of a raw answer (None when keymux did not write it)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    code = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"x-keymux-error":
            code = value.strip().decode()
    if code is not None:
        assert json.loads(body)["error"]["code"] == code  # the OpenAI error shape
    return raw_status(raw), code


async def _finish_clean(h: Hostile) -> None:
    assert await h.still_serves()
    end = await h.stack.finish()
    assert end.state() == CLEAN


# -- bodies ------------------------------------------------------------------------------------


async def _post(h: Hostile, body: bytes, headers: dict[str, str] | None = None) -> Answer:
    return await ask(h.stack.client, h.stack.url + "/v1/chat/completions", body=body, headers=headers)


async def test_malformed_json_gets_the_providers_400_and_costs_no_health(hostile: StartHostile) -> None:
    h = await hostile()
    answer = await _post(h, b'{"model": "gpt-4o", "messages": [')
    assert answer.status == 400
    assert answer.json()["error"]["type"] == "invalid_request_error"
    assert h.seen() == [("POST", "/v1/chat/completions")]
    assert h.untouched() == UNTOUCHED
    await _finish_clean(h)


async def test_a_body_without_model_is_forwarded_and_counted_as_model_unknown(hostile: StartHostile) -> None:
    h = await hostile()
    answer = await _post(h, chat(model=None))
    assert answer.status == 200
    assert [s.model for s in h.stack.provider.seen] == [None]
    assert h.untouched() == UNTOUCHED
    samples = await h.stack.metrics()
    models = {dict(labels).get("model") for (name, labels), v in samples.items() if name == "keymux_requests_total"}
    assert models == {"unknown"}
    await _finish_clean(h)


async def test_a_10_kb_model_name_is_forwarded_whole_and_kept_out_of_metrics_and_health(
    hostile: StartHostile,
) -> None:
    h = await hostile()
    model = "m" * 10240
    answer = await _post(h, chat(model=model))
    assert answer.status == 200
    assert [s.model for s in h.stack.provider.seen] == [model]
    async with aiohttp.ClientSession() as admin:
        for page in ("/metrics", "/keys"):
            async with admin.get(h.stack.admin + page) as response:
                assert model not in await response.text()
    assert h.stack.sidecar.runtime.providers["openai"].health.entry_count() == 0
    assert h.untouched() == UNTOUCHED
    await _finish_clean(h)


async def test_non_utf8_bytes_in_the_body_get_the_providers_400(hostile: StartHostile) -> None:
    h = await hostile()
    answer = await _post(h, b'{"model": "gpt-4o\xff\xfe", "messages": [{"content": "\xc3\x28"}]}')
    assert answer.status == 400
    assert answer.json()["error"]["type"] == "invalid_request_error"
    assert h.untouched() == UNTOUCHED
    await _finish_clean(h)


async def test_non_utf8_bytes_in_a_header_value_are_forwarded_harmlessly(hostile: StartHostile) -> None:
    h = await hostile()
    raw = await h.raw(request(b"/v1/models", b"X-Note: caf\xe9 \xff"))
    assert raw_status(raw) == 200
    assert h.seen() == [("GET", "/v1/models")]
    assert h.untouched() == UNTOUCHED
    await _finish_clean(h)


@pytest.mark.parametrize("target", [b"/v1/mod\xffels", b"/v1/models\x00", b"/v1/mo dels"])
async def test_raw_bytes_in_the_request_line_are_refused_before_keymux(hostile: StartHostile, target: bytes) -> None:
    h = await hostile()
    raw = await h.raw(request(target))
    assert raw_status(raw) == 400
    assert h.seen() == []
    assert h.untouched() == {**UNTOUCHED, "names_resolved": [], "hosts": []}
    await _finish_clean(h)


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_body_over_the_limit_is_a_413_in_the_openai_shape(hostile: StartHostile, chunked: bool) -> None:
    h = await hostile()
    body = b'{"model": "gpt-4o", "pad": "' + b"x" * MAX_BODY + b'"}'
    if chunked:
        chunks = b"".join(
            b"%x\r\n%s\r\n" % (len(body[i : i + 1000]), body[i : i + 1000]) for i in range(0, len(body), 1000)
        )
        raw = await h.raw(
            request(b"/v1/chat/completions", b"Transfer-Encoding: chunked", method=b"POST") + chunks + b"0\r\n\r\n"
        )
    else:
        raw = await h.raw(request(b"/v1/chat/completions", method=b"POST", body=body))
    assert keymux_error(raw) == (413, "request_too_large")
    assert h.seen() == []
    await _finish_clean(h)


async def test_a_body_exactly_at_the_limit_is_forwarded(hostile: StartHostile) -> None:
    h = await hostile()
    head = b'{"model": "gpt-4o", "pad": "'
    body = head + b"x" * (MAX_BODY - len(head) - 2) + b'"}'
    assert len(body) == MAX_BODY
    answer = await _post(h, body)
    assert answer.status == 200
    assert h.seen() == [("POST", "/v1/chat/completions")]
    await _finish_clean(h)


# -- routes, methods and paths -----------------------------------------------------------------


@pytest.mark.parametrize("target", [b"/nope", b"/v1/chat/completions", b"/%6fpenai/v1/models", b"/openaiX/v1/models"])
async def test_an_unknown_route_is_a_404_that_lists_the_routes(hostile: StartHostile, target: bytes) -> None:
    h = await hostile(ROUTED)
    raw = await h.raw(request(target))
    assert keymux_error(raw) == (404, "route_not_found")
    message = json.loads(raw.partition(b"\r\n\r\n")[2])["error"]["message"]
    assert "/openai" in message and "/anthropic" in message
    assert h.seen() == []
    h.prefix = "/openai"
    await _finish_clean(h)


@pytest.mark.parametrize("method", [b"PROPFIND", b"PATCH", b"DELETE", b"OPTIONS", b"PUT"])
async def test_an_unusual_method_goes_to_the_configured_upstream_only(hostile: StartHostile, method: bytes) -> None:
    h = await hostile()
    raw = await h.raw(request(b"/v1/models", method=method))
    assert raw_status(raw) == 200
    assert h.seen() == [(method.decode(), "/v1/models")]
    assert h.untouched() == UNTOUCHED
    await _finish_clean(h)


async def test_an_unknown_method_is_refused_by_the_parser(hostile: StartHostile) -> None:
    h = await hostile()
    raw = await h.raw(request(b"/v1/models", method=b"FOO"))
    assert raw_status(raw) == 400
    assert h.seen() == []
    await _finish_clean(h)


@pytest.mark.parametrize(
    "line",
    [b"TRACE /v1/models", b"CONNECT evil.test:443", b"CONNECT upstream.test:80"],
)
async def test_trace_and_connect_are_refused_with_405(hostile: StartHostile, line: bytes) -> None:
    """TRACE makes an upstream reflect the request, injected key included; CONNECT asks for a
    tunnel. Neither means anything to an LLM API, so keymux answers them itself."""
    h = await hostile()
    method, _, target = line.partition(b" ")
    raw = await h.raw(request(target, method=method))
    assert keymux_error(raw)[0] == 405
    assert keymux_error(raw)[1] is not None
    assert h.seen() == []
    await _finish_clean(h)


@pytest.mark.parametrize(
    "target",
    [
        b"/v1/../../admin",
        b"/v1/./models",
        b"/v1/%2e%2e/%2e%2e/admin",
        b"/v1/%2E%2E/admin",
        b"/v1/.%2e/admin",
        b"/v1/%2e./admin",
        b"/v1%2f..%2fadmin",
        b"/v1/..%2Fadmin",
        b"/v1/%252e%252e/admin",
        b"/v1/..%5cadmin",
        b"/v1/%5c..%5cadmin",
        b"/..",
        b"/v1/models/..",
    ],
)
async def test_dot_segments_and_encoded_separators_are_refused(hostile: StartHostile, target: bytes) -> None:
    h = await hostile(BASED)
    raw = await h.raw(request(target))
    assert keymux_error(raw) == (400, "invalid_path")
    assert h.seen() == []
    await _finish_clean(h)


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        (b"/v1/..;/admin", "/base/v1/..;/admin"),  # a lookalike, not a dot segment
        (b"//evil.test/v1/models", "/base//evil.test/v1/models"),
        (b"/v1/models?next=http://evil.test/&key=abc", "/base/v1/models"),
    ],
)
async def test_lookalike_paths_stay_under_the_base_path(hostile: StartHostile, target: bytes, forwarded: str) -> None:
    h = await hostile(BASED)
    raw = await h.raw(request(target))
    assert raw_status(raw) == 200
    assert h.seen() == [("GET", forwarded)]
    assert h.untouched() == UNTOUCHED
    await _finish_clean(h)


@pytest.mark.parametrize("target", [b"/openai/../anthropic/v1/messages", b"/openai/%2e%2e/anthropic/v1/messages"])
async def test_a_path_cannot_climb_from_one_route_into_another(hostile: StartHostile, target: bytes) -> None:
    h = await hostile(ROUTED)
    raw = await h.raw(request(target, method=b"POST", body=chat()))
    assert raw_status(raw) in (400, 404)
    assert keymux_error(raw)[1] in ("invalid_path", "route_not_found")
    assert h.seen() == []
    h.prefix = "/openai"
    await _finish_clean(h)


# -- headers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        [b"X-A: foo\rX-Injected: bar"],  # a bare CR
        [b"X-A: foo\nX-Injected: bar"],  # a bare LF
        [b"X-A: foo", b" X-Injected: bar"],  # obs-fold
        [b"X-Injected : bar"],  # whitespace before the colon
        [b"Content-Length: 5", b"Transfer-Encoding: chunked"],  # smuggling
        [b"Content-Length: 5", b"Content-Length: 6"],
        [b"Host: evil.test"],  # a second Host
    ],
)
async def test_crlf_and_smuggling_tricks_in_headers_are_refused(hostile: StartHostile, headers: list[bytes]) -> None:
    h = await hostile()
    raw = await h.raw(request(b"/v1/models", *headers))
    assert raw_status(raw) == 400
    assert h.seen() == []
    await _finish_clean(h)


async def test_an_encoded_crlf_in_the_path_is_never_decoded_into_a_header(hostile: StartHostile) -> None:
    h = await hostile()
    raw = await h.raw(request(b"/v1/models%0d%0aX-Injected:%20bar"))
    injected = [s for s in h.stack.provider.seen if "X-Injected" in s.headers]
    assert injected == []
    # Forwarded as it came, or refused by keymux in the provider's error shape; never a bare
    # error page from under keymux.
    outcome = (raw_status(raw), h.seen()) if keymux_error(raw)[1] is None else keymux_error(raw)
    assert outcome in [(200, [("GET", "/v1/models%0d%0aX-Injected:%20bar")]), (400, "invalid_path")]
    await _finish_clean(h)


@pytest.mark.parametrize(
    "header",
    [
        b"Host: evil.test",
        b"Host: evil.test:443",
        b"Host: upstream.test@evil.test",
        b"X-Forwarded-Host: evil.test",
        b"Forwarded: host=evil.test;proto=https",
        b"X-Original-URL: http://evil.test/v1/models",
    ],
)
async def test_host_tricks_never_change_where_keymux_connects(hostile: StartHostile, header: bytes) -> None:
    h = await hostile()
    raw = (
        request(b"/v1/models", header).replace(b"Host: localhost\r\n", b"")
        if header.startswith(b"Host")
        else request(b"/v1/models", header)
    )
    answer = await h.raw(raw)
    assert raw_status(answer) == 200
    assert h.seen() == [("GET", "/v1/models")]
    assert h.untouched() == UNTOUCHED
    await _finish_clean(h)


@pytest.mark.parametrize(
    "target",
    [
        b"http://evil.test/v1/models",
        b"https://evil.test/v1/models",
        b"evil://x/v1/models",
        b"http://upstream.test@evil.test/v1/models",
        b"http://upstream.test/v1/models",
    ],
)
async def test_an_absolute_form_target_never_reaches_another_host(hostile: StartHostile, target: bytes) -> None:
    """`GET http://evil.test/v1/models` pasted after a base_url with no path and no port must
    not become the host `upstream.testhttp` (nor any other): that would hand the key over."""
    h = await hostile()
    raw = await h.raw(request(target))
    assert h.untouched() == {**UNTOUCHED, "hosts": sorted(set(h.hosts()))}
    assert h.tripwire.received == b""
    # Served as its origin-form path (RFC 9112 3.2.2), or refused by keymux.
    outcome = (raw_status(raw), h.seen()) if keymux_error(raw)[1] is None else keymux_error(raw)[0]
    assert outcome in [(200, [("GET", "/v1/models")]), 400]
    await _finish_clean(h)


@pytest.mark.parametrize("target", [b"http://evil.test/v1/models", b"http://127.0.0.1:1/v1/models"])
async def test_an_absolute_form_target_does_not_crash_keymux_when_base_url_has_a_port(
    hostile: StartHostile, target: bytes
) -> None:
    h = await hostile(PLAIN.replace("http://upstream.test", "{base_url}"))
    raw = await h.raw(request(target))
    assert h.tripwire.connections == 0
    outcome = (raw_status(raw), h.seen()) if keymux_error(raw)[1] is None else keymux_error(raw)[0]
    assert outcome in [(200, [("GET", "/v1/models")]), 400]
    await _finish_clean(h)
