"""The app-facing proxy: moves bytes and asks the core what to do.

One Exchange per app request: read the body once, pick a key, forward, classify the answer,
retry on another key (or the next provider) while nothing has reached the app, then stream
the final answer through chunk by chunk.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sidecar.classify import SUCCESS, Verdict, classify, classify_stream_start
from sidecar.health import Key, KeyStatus
from sidecar.metrics import Metrics
from sidecar.outcome import Outcome
from sidecar.providers import APP_CREDENTIAL_HEADERS, APP_CREDENTIAL_QUERY, HOP_BY_HOP_HEADERS, PROVIDERS
from sidecar.redact import BodyScrubber, EventScrubber
from sidecar.runtime import Provider, Runtime, retry_after_header
from sidecar.usage import UsageTail

access_log = logging.getLogger("keymux.access")
log = logging.getLogger("keymux")

_DROP_REQUEST = HOP_BY_HOP_HEADERS | APP_CREDENTIAL_HEADERS | {"accept-encoding"}
_DECODED = frozenset({"content-encoding", "content-length"})
_ENCODED_SEPARATORS = ("%2e", "%2f", "%5c", "%00", "%25", "%0d", "%0a")
# TRACE would make an upstream reflect the request, key included; CONNECT asks for a tunnel.
_REFUSED_METHODS = frozenset({"TRACE", "CONNECT"})
_UPSTREAM_STATUS = {Outcome.TIMEOUT: 504, Outcome.CONNECTION_ERROR: 502}


class Proxy:
    """What outlives a request: the current runtime, the client session, the metrics."""

    def __init__(self, runtime: Runtime, metrics: Metrics) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.session: aiohttp.ClientSession | None = None
        self.streaming: dict[Exchange, None] = {}  # answers being streamed, for the idle watch
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
        # No cookie jar: a cookie one upstream answer sets must never ride along on another
        # app's request (and storing cookies is work on every request).
        self.session = aiohttp.ClientSession(
            connector=connector, skip_auto_headers=("User-Agent",), cookie_jar=aiohttp.DummyCookieJar()
        )
        # aiohttp silently re-sends an idempotent request once when a pooled connection drops;
        # keymux makes that decision itself (another key), so each attempt is one request.
        if hasattr(self.session, "_retry_connection"):
            self.session._retry_connection = False
        self._watcher = asyncio.create_task(self._watch_idle())

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if self.session is not None:
            await self.session.close()

    async def _watch_idle(self) -> None:
        """Cut streams whose upstream sent nothing for timeouts.idle, checked a few times per idle span."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, max(0.05, self.runtime.config.timeouts.idle / 4)))
            now = loop.time()
            for exchange in list(self.streaming):
                if now - exchange.last_chunk > exchange.rt.config.timeouts.idle and exchange.upstream is not None:
                    exchange.idle_expired = True
                    exchange.upstream.close()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        exchange = Exchange(self, self.runtime, request)
        self.metrics.inflight.inc()
        try:
            return await exchange.run()
        except asyncio.CancelledError:
            exchange.outcome = Outcome.CLIENT_DISCONNECTED
            raise
        except Exception:
            # A bug of keymux's own: say so in the provider's shape rather than as a bare 500
            # page, unless the answer has started (then the connection is cut).
            log.exception("unexpected error while proxying a request")
            if exchange.prepared:
                raise
            return exchange.local_error(500, "keymux_error", "keymux: internal error", Outcome.UPSTREAM_ERROR)
        finally:
            self.metrics.inflight.dec()
            exchange.report()


@dataclass
class _Failed:
    """An attempt that failed in a way another key may fix."""

    provider: Provider
    key: Key
    model: str
    verdict: Verdict
    response: aiohttp.ClientResponse | None = None  # the answer, kept in case it is the last
    prefix: bytes = b""


class Exchange:
    """One app request, from arrival to the last byte forwarded."""

    def __init__(self, proxy: Proxy, runtime: Runtime, request: web.BaseRequest) -> None:
        self.proxy = proxy
        self.rt = runtime
        self.request = request
        self.metrics = proxy.metrics
        self.loop = asyncio.get_running_loop()
        self.started = self.loop.time()
        self.route_label = "none"
        self.providers: tuple[Provider, ...] = ()
        self.path = "/"  # upstream path and query: the route prefix and app credentials removed
        self.body = b""
        self._models: dict[str, str] = {}  # by where the model is found: body, path, deployment
        self._headers: list[tuple[str, str]] | None = None
        self.tried: dict[str, set[str]] = {}
        self.done: set[str] = set()  # providers with nothing left to try
        self.provider_outcomes: dict[str, Outcome] = {}
        self.keys_tried: list[str] = []
        self.provider: Provider | None = None  # the one that answered last
        self.model: str | None = None
        self.outcome: Outcome | None = None
        self.status = 0
        self.ttfb: float | None = None
        self.bytes_out = 0
        self.prepared = False  # the answer's headers went to the app: no retry, no other answer
        self._attempt_open = False  # an attempt is under way and not yet counted
        self.upstream: aiohttp.ClientResponse | None = None  # the answer being streamed
        self.last_chunk = 0.0
        self.idle_expired = False
        self.upstream_time = 0.0  # waiting for upstream headers
        self.streaming_time = 0.0  # forwarding the body, paced by the upstream

    # -- the flow --------------------------------------------------------------------------

    async def run(self) -> web.StreamResponse:
        if self.rt.config.security.inbound_token is not None and not self._authorised():
            return self.local_error(401, "unauthorized", "keymux: this sidecar needs its inbound token")
        if self.request.method in _REFUSED_METHODS:
            return self.local_error(405, "method_not_allowed", f"keymux: {self.request.method} is not forwarded")
        found = self.rt.route_for(self.request.path)
        if found is None:
            return self._unknown_route()
        route, self.providers = found
        self.route_label = route.prefix or "/"
        rejected = self._take_path(route.prefix) or await self._read_body()
        if rejected is not None:
            return rejected
        candidate = self._next_candidate(None)
        if candidate is None:
            return self._no_key()
        while True:
            result = await self._attempt(*candidate)
            if not isinstance(result, _Failed):
                return result
            candidate = self._next_candidate(result)
            if candidate is None:
                return await self._give_last_answer(result)
            if result.response is not None:
                result.response.close()

    def _authorised(self) -> bool:
        security = self.rt.config.security
        presented = self.request.headers.get(security.inbound_header, "")
        if presented[:7].lower() == "bearer ":
            presented = presented[7:]
        return hmac.compare_digest(presented.strip().encode(), (security.inbound_token or "").encode())

    def _take_path(self, prefix: str) -> web.Response | None:
        """Set the upstream path: the app's, the route prefix and app credentials removed.

        The path is only ever appended to the configured base_url, so it must start with "/"
        and hold nothing an upstream could resolve elsewhere: no dot segments, backslashes or
        encoded separators. An absolute-form target (`GET http://evil/x`) counts by its path.
        """
        target = self.request.rel_url
        raw_path, query = target.raw_path, target.raw_query_string
        remainder = raw_path[len(prefix) :]
        if not raw_path.startswith(prefix) or (remainder and remainder[0] != "/"):
            return self._unknown_route()  # the prefix was percent-encoded, or not a whole segment
        lowered = raw_path.lower()
        segments = self.request.path.split("/")
        if "." in segments or ".." in segments or "\\" in lowered or any(e in lowered for e in _ENCODED_SEPARATORS):
            return self.local_error(
                400, "invalid_path", "keymux: the path must not hold dot segments or encoded separators"
            )
        self.path = remainder or "/"
        if query:
            query = _strip_credential_query(query)
            if query:
                self.path += "?" + query
        return None

    async def _read_body(self) -> web.Response | None:
        request = self.request
        limit = self.rt.config.limits.max_body_bytes
        length = request.content_length
        too_large = f"keymux: the request body is over the limit of {limit} bytes"
        if length is not None and length > limit:
            return self.local_error(413, "request_too_large", too_large)
        if not request.body_exists:
            return None
        if length is not None:  # the usual case: one read of a known length
            try:
                self.body = await request.content.readexactly(length)
            except asyncio.IncompleteReadError:
                return self.local_error(400, "incomplete_body", "keymux: the request body ended early")
            return None
        chunks = []
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                return self.local_error(413, "request_too_large", too_large)
            chunks.append(chunk)
        self.body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return None

    def model_for(self, provider: Provider) -> str:
        """The model this request asks of `provider` ("" when it names none)."""
        spec = provider.spec
        model = self._models.get(spec.model_location)
        if model is None:
            model = (spec.find_model(self.path.partition("?")[0], self.body) or "")[:256]
            self._models[spec.model_location] = model
            if self.model is None and model:
                self.model = model
        return model

    # -- choosing --------------------------------------------------------------------------

    def _next_candidate(self, failed: _Failed | None) -> tuple[Provider, Key] | None:
        """The next (provider, key) to try, or None when the budget or the keys are spent."""
        retry = self.rt.config.retry
        if len(self.keys_tried) >= retry.max_attempts or self.loop.time() - self.started >= retry.budget:
            return None
        previous = None
        if failed is not None:
            previous = failed.provider
            if failed.verdict.provider_wide:
                self.done.add(failed.provider.name)
        for provider in self.providers:
            if provider.name in self.done:
                continue
            key = provider.pool.choose(self.model_for(provider), self.tried.get(provider.name, ()))
            if key is not None:
                self._count_switch(previous, provider, failed)
                return provider, key
            self.done.add(provider.name)
            self.provider_outcomes.setdefault(provider.name, Outcome.NO_KEY_AVAILABLE)
            previous = provider
        return None

    def _count_switch(self, previous: Provider | None, provider: Provider, failed: _Failed | None) -> None:
        """A key retry within a provider, or a fallback to the next provider of the route."""
        if previous is None:
            return
        if previous is not provider:
            self.metrics.fallbacks(self.route_label, previous.name, provider.name).inc()
        elif failed is not None:
            self.metrics.key_retries(provider.name, self._model_label(), failed.verdict.outcome.value).inc()

    # -- one attempt -----------------------------------------------------------------------

    async def _attempt(self, provider: Provider, key: Key) -> web.StreamResponse | _Failed:
        model = self.model_for(provider)
        self.provider = provider
        self.tried.setdefault(provider.name, set()).add(key.name)
        self.keys_tried.append(f"{provider.name}/{key.name}")
        self._attempt_open = True
        sent = self.loop.time()
        response = None
        try:
            try:
                response = await self._send(provider, key)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                self.upstream_time += self.loop.time() - sent
                return self._failed(provider, key, model, Verdict(_transport_outcome(exc)))
            waited = self.loop.time() - sent
            self.upstream_time += waited
            self.ttfb = waited
            self.metrics.ttfb(provider.name, self._model_label()).observe(waited)
            return await self._judge(provider, key, model, response)
        except asyncio.CancelledError:  # the app went away
            if self._attempt_open:
                provider.pool.record(key.name, model, Verdict(Outcome.CLIENT_DISCONNECTED))
                self._count_attempt(provider, key, Outcome.CLIENT_DISCONNECTED)
            raise
        finally:
            if response is not None and self._attempt_open:
                response.close()

    async def _send(self, provider: Provider, key: Key) -> aiohttp.ClientResponse:
        session = self.proxy.session
        assert session is not None, "Proxy.start() was not awaited"
        return await session.request(
            self.request.method,
            URL(provider.config.base_url + self.path, encoded=True),
            headers=self._headers_for(provider, key),
            data=self.body or None,
            allow_redirects=False,
            timeout=self.rt.client_timeout,
        )

    def _headers_for(self, provider: Provider, key: Key) -> CIMultiDict[str]:
        if self._headers is None:
            incoming = self.request.headers
            drop = _DROP_REQUEST | _connection_tokens(incoming) | {self.rt.config.security.inbound_header}
            self._headers = [(k, v) for k, v in incoming.items() if k.lower() not in drop]
        headers = CIMultiDict(self._headers)
        for name, value in provider.spec.default_headers:
            headers.setdefault(name, value)
        headers.update(provider.key_headers[key.name])
        return headers

    async def _judge(
        self, provider: Provider, key: Key, model: str, response: aiohttp.ClientResponse
    ) -> web.StreamResponse | _Failed:
        """Classify the answer: forward it, or report a failure another key may fix."""
        first = b""
        try:
            if response.status >= 400:
                prefix = await _read_prefix(response, self.rt.config.limits.error_body_bytes)
            elif provider.spec.stream_errors and "event-stream" in response.headers.get("content-type", ""):
                # An error can arrive as the first event of a 200 stream: peek before answering.
                first = await response.content.readany()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            response.close()
            return self._failed(provider, key, model, Verdict(_transport_outcome(exc)))
        if response.status < 400:
            verdict = classify_stream_start(first, provider.patterns) if first else SUCCESS
            if verdict.outcome.retryable:
                return self._failed(provider, key, model, verdict, response, first)
            provider.pool.record(key.name, model, SUCCESS)
            return await self._forward(provider, key, model, response, first, Outcome.SUCCESS)
        verdict = classify(response.status, response.headers, prefix, provider.patterns, time.time())
        if not verdict.outcome.retryable:
            provider.pool.record(key.name, model, verdict)
            return await self._forward(provider, key, model, response, prefix, verdict.outcome)
        return self._failed(provider, key, model, verdict, response, prefix)

    def _failed(
        self,
        provider: Provider,
        key: Key,
        model: str,
        verdict: Verdict,
        response: aiohttp.ClientResponse | None = None,
        prefix: bytes = b"",
    ) -> _Failed:
        provider.pool.record(key.name, model, verdict)
        self._count_attempt(provider, key, verdict.outcome)
        return _Failed(provider, key, model, verdict, response, prefix)

    def _count_attempt(self, provider: Provider, key: Key, outcome: Outcome) -> None:
        self._attempt_open = False
        self.metrics.attempt(provider.name, key.name, self._model_label(), outcome)
        self.provider_outcomes[provider.name] = outcome
        self.outcome = outcome

    async def _give_last_answer(self, failed: _Failed) -> web.StreamResponse:
        """Everything failed: the app gets the last upstream answer, or a gateway error."""
        if failed.response is not None:
            return await self._forward(failed.provider, failed.key, failed.model, failed.response, failed.prefix, None)
        outcome = failed.verdict.outcome
        status = _UPSTREAM_STATUS.get(outcome, 502)
        tried = ", ".join(self.keys_tried)
        return self.local_error(
            status, outcome.value, f"keymux: every attempt failed ({outcome.value}); tried {tried}", outcome
        )

    # -- streaming the answer --------------------------------------------------------------

    async def _forward(
        self,
        provider: Provider,
        key: Key,
        model: str,
        response: aiohttp.ClientResponse,
        prefix: bytes,
        outcome: Outcome | None,
    ) -> web.StreamResponse:
        """Stream an upstream answer to the app chunk by chunk.

        The attempt is counted once, with its final outcome; `outcome` None: already counted.
        """
        self.status = response.status
        out = web.StreamResponse(status=response.status, reason=response.reason)
        length_known = _copy_response_headers(response.headers, out)
        scrub = self._scrubber(response)
        if length_known and not isinstance(scrub, BodyScrubber):  # redaction may change an error body's length
            out.content_length = response.content_length
        usage = UsageTail.for_response(response.headers) if outcome is Outcome.SUCCESS else None
        connection = response.connection
        if connection is not None and connection.protocol is not None:
            # The idle gap between chunks is watched by Proxy._watch_idle once per tick; a
            # socket read timeout would re-arm a timer for every chunk of every stream.
            connection.protocol.read_timeout = None
        final = outcome
        streaming_from = None
        streaming = self.proxy.streaming
        try:
            await out.prepare(self.request)
            self.prepared = True
            streaming_from = self.last_chunk = self.loop.time()
            self.upstream = response
            streaming[self] = None
            if prefix:
                await out.write(self._pass(prefix, usage, scrub))
            clock = self.loop.time
            async for chunk in response.content.iter_any():
                self.last_chunk = clock()
                await out.write(self._pass(chunk, usage, scrub))
            if scrub is not None and (rest := scrub.flush()):
                self.bytes_out += len(rest)
                await out.write(rest)
            await out.write_eof()
        except (TimeoutError, ConnectionResetError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            final = self._stream_interrupted(provider, key, model, exc)
        finally:
            streaming.pop(self, None)
            response.close()
        if streaming_from is not None:
            self.streaming_time = self.loop.time() - streaming_from
        if outcome is not None:
            self._count_attempt(provider, key, final or outcome)
        else:
            self.outcome = final or self.outcome
        if usage is not None and final is Outcome.SUCCESS:
            for kind, count in usage.counts().items():
                self.metrics.tokens(provider.name, key.name, self._model_label(), kind).inc(count)
        return out

    def _pass(self, chunk: bytes, usage: UsageTail | None, scrub: BodyScrubber | EventScrubber | None) -> bytes:
        """One chunk on its way to the app: counted, read for usage, scrubbed of secrets."""
        if usage is not None:
            usage.feed(chunk)
        if scrub is not None:
            chunk = scrub.feed(chunk)
        self.bytes_out += len(chunk)
        return chunk

    def _scrubber(self, response: aiohttp.ClientResponse) -> BodyScrubber | EventScrubber | None:
        """What redacts echoed secrets on the way to the app: every error body, and the error
        events of a success stream; other success bodies pass untouched."""
        if response.status >= 400:
            return BodyScrubber(self.rt.redact)
        if "event-stream" in response.headers.get("content-type", ""):
            return EventScrubber(self.rt.redact)
        return None

    def _stream_interrupted(self, provider: Provider, key: Key, model: str, exc: BaseException) -> Outcome:
        """The stream stopped after bytes reached the app: no retry is possible any more."""
        transport = self.request.transport
        if transport is None or transport.is_closing():  # the app went away
            provider.pool.record(key.name, model, Verdict(Outcome.CLIENT_DISCONNECTED))
            return Outcome.CLIENT_DISCONNECTED
        verdict = Verdict(Outcome.TIMEOUT if self.idle_expired else _transport_outcome(exc))  # the upstream broke
        provider.pool.record(key.name, model, verdict)
        transport.close()  # an unterminated body tells the app the answer is incomplete
        return verdict.outcome

    # -- local answers ---------------------------------------------------------------------

    def local_error(
        self,
        status: int,
        code: str,
        message: str,
        outcome: Outcome = Outcome.CLIENT_ERROR,
        retry_after: str | None = None,
    ) -> web.Response:
        """An error keymux itself answers, in the shape the app's SDK expects."""
        spec = self.providers[0].spec if self.providers else self._guess_spec()
        headers = {"x-keymux-error": code}
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        body = spec.error_json(status, code, message)
        self.outcome, self.status, self.bytes_out = outcome, status, len(body)
        return web.Response(status=status, body=body, content_type="application/json", headers=headers)

    def _guess_spec(self) -> Any:
        types = {p.spec.type for p in self.rt.providers.values()}
        return PROVIDERS[types.pop()] if len(types) == 1 else PROVIDERS["openai"]

    def _unknown_route(self) -> web.Response:
        prefixes = ", ".join(route.prefix or "/" for route, _ in self.rt.routes)
        return self.local_error(404, "route_not_found", f"keymux: no route for this path; routes: {prefixes}")

    def _no_key(self) -> web.Response:
        """No key could take the request at all: 503, or 429 when every one is rate-limited."""
        now = self.rt.clock()
        blocked: list[tuple[Provider, KeyStatus]] = []
        for provider in self.providers:
            model = self.model_for(provider)
            blocked += [(provider, status) for status in provider.pool.blocking(model)]
        parts = [_describe(provider, status, now) for provider, status in blocked]
        model = self.model or ""
        if not parts:
            detail = f"no configured key is allowed to serve model '{model}'" if model else "no keys are configured"
        else:
            detail = f"no key can serve model '{model}' right now: " + "; ".join(parts)
        waits = [status.until - now for _, status in blocked if status.until is not None]
        limited = bool(blocked) and all(s.last_outcome is Outcome.RATE_LIMITED for _, s in blocked)
        retry_after = retry_after_header(min(waits)) if waits else None
        status = 429 if limited else 503
        return self.local_error(status, "no_key_available", f"keymux: {detail}", Outcome.NO_KEY_AVAILABLE, retry_after)

    # -- reporting -------------------------------------------------------------------------

    def _model_label(self) -> str:
        return self.metrics.models(self.model)

    def report(self) -> None:
        outcome = self.outcome or Outcome.CLIENT_DISCONNECTED
        duration = self.loop.time() - self.started
        model = self._model_label()
        provider = self.provider.name if self.provider else "none"
        metrics = self.metrics
        metrics.requests(self.route_label, provider, model, outcome.value).inc()
        metrics.duration(self.route_label, model, outcome.value).observe(duration)
        metrics.overhead(self.route_label).observe(max(duration - self.upstream_time - self.streaming_time, 0.0))
        for name, result in self.provider_outcomes.items():
            metrics.provider_requests(name, model, result.value).inc()
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(
                "request",
                extra={
                    "fields": {
                        "route": self.route_label,
                        "method": self.request.method,
                        "provider": provider,
                        "keys": self.keys_tried,
                        "model": model,
                        "attempts": len(self.keys_tried),
                        "outcome": outcome.value,
                        "status": self.status,
                        "ttfb_ms": None if self.ttfb is None else round(self.ttfb * 1000, 2),
                        "duration_ms": round(duration * 1000, 2),
                        "bytes": self.bytes_out,
                    }
                },
            )


def _describe(provider: Provider, status: KeyStatus, now: float) -> str:
    scope = "every model" if status.model is None else f"model '{status.model}'"
    why = f" after {status.last_outcome.value}" if status.last_outcome else ""
    until = f" for {max(status.until - now, 0):.0f} s" if status.until is not None else " (probe in flight)"
    return f"{provider.name}/{status.key} {status.state.value} for {scope}{why}{until}"


def _transport_outcome(exc: BaseException) -> Outcome:
    return Outcome.TIMEOUT if isinstance(exc, TimeoutError) else Outcome.CONNECTION_ERROR


def _connection_tokens(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    value = headers.get("connection")
    if not value:
        return frozenset()
    return frozenset(token.strip().lower() for token in value.split(","))


def _copy_response_headers(upstream: CIMultiDictProxy[str], out: web.StreamResponse) -> bool:
    """Copy end-to-end headers; True when the upstream Content-Length still holds."""
    decoded = "content-encoding" in upstream  # the client session decoded the body
    for name, value in upstream.items():
        lowered = name.lower()
        if lowered in HOP_BY_HOP_HEADERS or (decoded and lowered in _DECODED):
            continue
        out.headers.add(name, value)
    return not decoded and upstream.get("content-length") is not None


def _strip_credential_query(query: str) -> str:
    parts = [p for p in query.split("&") if p.partition("=")[0].lower() not in APP_CREDENTIAL_QUERY]
    return "&".join(parts)


async def _read_prefix(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """At most `limit` bytes of the body, to classify an error without reading all of it."""
    chunks = []
    size = 0
    content = response.content
    while size < limit:
        chunk = await content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)
