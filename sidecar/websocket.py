"""WebSocket pass-through: OpenAI Realtime, Azure realtime, Gemini Live.

The key goes into the handshake. A handshake the provider refuses (401, 403, 429, 5xx) is
classified like any answer and the next key is tried before anything reached the app. After the
101, frames are relayed both ways as they come, close codes and reasons pass through, and the
session ends when either side closes, the connection breaks, or nothing moved for
`timeouts.idle`. One session is one request and one attempt in metrics and the access log.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import WSMsgType, web

from sidecar.classify import DISCONNECTED, SUCCESS, Verdict, classify, transport_outcome
from sidecar.outcome import Outcome
from sidecar.plan import Attempt, LocalAnswer

if TYPE_CHECKING:
    from sidecar.proxy import Exchange
    from sidecar.runtime import Provider

# A browser cannot set headers on a WebSocket, so OpenAI accepts the key as a subprotocol; keymux
# holds the keys, so whatever the app put there is dropped like any app credential.
_CREDENTIAL_PROTOCOL = "openai-insecure-api-key."
HANDSHAKE_HEADERS = frozenset(
    {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol"}
)
_WS = aiohttp.WSServerHandshakeError


def is_websocket(request: web.BaseRequest) -> bool:
    return request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket"


def app_protocols(request: web.BaseRequest) -> tuple[str, ...]:
    offered = request.headers.get("Sec-WebSocket-Protocol", "")
    names = (name.strip() for name in offered.split(","))
    return tuple(name for name in names if name and not name.startswith(_CREDENTIAL_PROTOCOL))


class _Refused:
    """A handshake that did not open: the attempt's verdict, and the provider's status when it
    answered one (None: no answer, a timeout or a connection error)."""

    def __init__(self, verdict: Verdict, status: int | None) -> None:
        self.verdict = verdict
        self.status = status


async def serve(exchange: Exchange) -> web.StreamResponse:
    """One WebSocket session: handshakes until one opens, then the relay."""
    plan = exchange.plan
    assert plan is not None
    attempt = plan.next()
    if attempt is None:
        return exchange.local(plan.no_key())
    while True:
        opened = await _handshake(exchange, attempt)
        if not isinstance(opened, _Refused):
            return await _relay(exchange, attempt, opened)
        # The app's own mistake (a 400 or 404 handshake) is not another key's to fix.
        following = plan.next() if opened.verdict.outcome.retryable else None
        if following is None:
            return exchange.local(_refused_answer(exchange, opened))
        attempt = following


async def _handshake(exchange: Exchange, attempt: Attempt[Provider]) -> aiohttp.ClientWebSocketResponse | _Refused:
    provider = attempt.provider
    session = exchange.proxy.session
    assert session is not None
    url = provider.config.base_url + exchange.path
    headers = exchange.app_headers(provider)
    for name in HANDSHAKE_HEADERS:
        headers.popall(name, None)
    headers.update(provider.headers_for(attempt.key, "GET", url, b""))
    sent = time.monotonic()
    verdict: Verdict = DISCONNECTED
    try:
        async with asyncio.timeout(exchange.rt.config.timeouts.response_headers):  # the handshake's answer
            upstream = await session.ws_connect(
                exchange.rt.url(url),
                headers=headers,
                protocols=app_protocols(exchange.request),
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10.0),
                autoclose=True,
                autoping=True,
                max_msg_size=0,
            )
    except _WS as exc:
        verdict = classify(exc.status, exc.headers or {}, b"", provider.patterns, time.time())
        attempt.finish(verdict)
        return _Refused(verdict, exc.status)
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        verdict = Verdict(transport_outcome(exc))
        attempt.finish(verdict)
        return _Refused(verdict, None)
    except BaseException:
        attempt.finish(verdict)
        raise
    finally:
        exchange.upstream_time += time.monotonic() - sent
    return upstream


def _refused_answer(exchange: Exchange, refused: _Refused) -> LocalAnswer:
    plan = exchange.plan
    assert plan is not None
    if refused.status is None:  # no answer at all: the gateway error every request gets
        return plan.exhausted()
    outcome = refused.verdict.outcome
    tried = ", ".join(plan.keys_tried)
    message = f"keymux: the provider refused the WebSocket handshake ({refused.status}, {outcome.value}); tried {tried}"
    return LocalAnswer(refused.status, outcome.value, message, outcome, refused.verdict.retry_after)


async def _relay(
    exchange: Exchange, attempt: Attempt[Provider], upstream: aiohttp.ClientWebSocketResponse
) -> web.StreamResponse:
    """Frames both ways until a side closes; the attempt is finished with how the session ended."""
    session = _Session(asyncio.get_running_loop().time())
    app = web.WebSocketResponse(
        protocols=(upstream.protocol,) if upstream.protocol else (), autoclose=True, autoping=True, max_msg_size=0
    )
    try:
        await app.prepare(exchange.request)
        exchange.upgraded = True
        exchange.status = 101
        await _pump_both(exchange, app, upstream, session)
        return app
    finally:
        # A close frame from either side, or an idle end, is a session that ended well, even when
        # the app's connection went away right after its close (that cancels this handler).
        attempt.finish(session.verdict())
        await upstream.close()
        if not app.closed:
            await app.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"keymux: the session ended")


class _Session:
    """How the two directions of a session ended, written by each as it ends."""

    def __init__(self, now: float) -> None:
        self.activity = now
        self.ended: str | None = None  # "closed", "idle", or who broke: "upstream broke", "app broke"

    def verdict(self) -> Verdict:
        if self.ended in ("closed", "idle"):
            return SUCCESS
        if self.ended == "upstream broke":  # the connection broke without a close frame
            return Verdict(Outcome.CONNECTION_ERROR)
        return DISCONNECTED


async def _pump_both(
    exchange: Exchange, app: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse, session: _Session
) -> None:
    idle = exchange.rt.config.timeouts.idle
    to_upstream = asyncio.create_task(_pump(app, upstream, session, idle, "app broke"))
    to_app = asyncio.create_task(_pump(upstream, app, session, idle, "upstream broke"))
    try:
        await asyncio.wait((to_upstream, to_app), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (to_upstream, to_app):
            task.cancel()
        await asyncio.gather(to_upstream, to_app, return_exceptions=True)


async def _pump(
    source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    session: _Session,
    idle: float,
    broken: str,
) -> None:
    """Relay one direction until a close frame, an idle session or a broken connection."""
    loop = asyncio.get_running_loop()
    check = min(idle, 1.0)
    while True:
        try:
            message = await source.receive(timeout=check)
        except TimeoutError:
            if loop.time() - session.activity >= idle:
                session.ended = session.ended or "idle"
                await sink.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"keymux: idle")
                await source.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"keymux: idle")
                return
            continue
        session.activity = loop.time()
        if message.type is WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif message.type is WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        elif message.type is WSMsgType.CLOSE:
            session.ended = session.ended or "closed"
            await sink.close(code=message.data, message=(message.extra or "").encode())
            return
        elif message.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            session.ended = session.ended or broken
            return
