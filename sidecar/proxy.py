"""The app-facing proxy: a thin shell that moves bytes and feeds the attempt plan.

One Exchange per app request: take the request in (route, path, body), then run the plan:
each attempt sends the request with the key the plan chose, classifies the answer, and either
forwards it (a `Relay` streams it chunk by chunk) or hands the plan a failure another key may
fix. Every attempt is finished exactly once, in `Exchange._attempt`, with its final verdict.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar import websocket
from sidecar._aiohttp import disable_connection_retry, stop_read_timeout
from sidecar.accesslog import AccessLog
from sidecar.affinity import Owner, created_id, creates_resource, upload_session
from sidecar.capacity import estimate_tokens
from sidecar.classify import DISCONNECTED, SUCCESS, Verdict, classify, classify_stream_start, transport_outcome
from sidecar.metrics import Metrics
from sidecar.outcome import Outcome
from sidecar.plan import Attempt, LocalAnswer, Plan, retry_after_header
from sidecar.providers import APP_CREDENTIAL_QUERY, HOP_BY_HOP_HEADERS, PROVIDERS, ProviderSpec, decoded_prefix
from sidecar.redact import BodyScrubber, EventScrubber
from sidecar.runtime import Provider, Runtime
from sidecar.spool import SpooledBody
from sidecar.usage import UsageTail
from sidecar.waiting import WaitingLine

log = logging.getLogger("keymux")

_DECODED = frozenset({"content-encoding", "content-length"})
_ENCODED_SEPARATORS = ("%2e", "%2f", "%5c", "%00", "%25", "%0d", "%0a")
# TRACE would make an upstream reflect the request, key included; CONNECT asks for a tunnel.
_REFUSED_METHODS = frozenset({"TRACE", "CONNECT"})
_TRANSPORT_ERRORS = (TimeoutError, aiohttp.ClientError, OSError)
_STREAM_BROKEN = (TimeoutError, ConnectionResetError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)


class Proxy:
    """What outlives a request: the current runtime, the client session, metrics and access log."""

    def __init__(self, runtime: Runtime, metrics: Metrics, access: AccessLog | None = None) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.access = access or AccessLog()
        self.session: aiohttp.ClientSession | None = None
        self.streaming: dict[Relay, None] = {}  # answers being streamed, for the idle watch
        self.line = WaitingLine()  # requests waiting for a saturated or rate-limited key
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
        # No cookie jar: a cookie one upstream answer sets must never ride along on another
        # app's request (and storing cookies is work on every request).
        self.session = aiohttp.ClientSession(
            connector=connector, skip_auto_headers=("User-Agent",), cookie_jar=aiohttp.DummyCookieJar()
        )
        disable_connection_retry(self.session)
        self._watcher = asyncio.create_task(self._watch_idle())

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if self.session is not None:
            await self.session.close()
        self.access.flush()

    async def _watch_idle(self) -> None:
        """Cut streams whose upstream sent nothing for timeouts.idle, checked a few times per idle span."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, max(0.05, self.runtime.config.timeouts.idle / 4)))
            now = loop.time()
            for relay in list(self.streaming):
                if now - relay.last_chunk > relay.idle_limit:
                    relay.idle_expired = True
                    relay.response.close()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        exchange = Exchange(self, self.runtime, request)
        self.metrics.inflight.inc()
        try:
            return await exchange.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug of keymux's own: say so in the provider's shape rather than as a bare 500
            # page, unless the answer has started (then the connection is cut).
            log.exception("unexpected error while proxying a request")
            if exchange.prepared:
                raise
            return exchange.local(LocalAnswer(500, "keymux_error", "keymux: internal error", Outcome.UPSTREAM_ERROR))
        finally:
            self.metrics.inflight.dec()
            exchange.report()
            exchange.release()


@dataclass(slots=True)
class _Held:
    """A failed attempt's answer, kept in case no other attempt follows and it is the last."""

    response: aiohttp.ClientResponse | None
    prefix: bytes = b""


class Exchange:
    """One app request, from arrival to the last byte forwarded. Also the plan's observer."""

    def __init__(self, proxy: Proxy, runtime: Runtime, request: web.BaseRequest) -> None:
        self.proxy = proxy
        self.rt = runtime
        self.request = request
        self.metrics = proxy.metrics
        self.loop = asyncio.get_running_loop()
        self.started = self.loop.time()
        self.route_label = "none"
        self.providers: tuple[Provider, ...] = ()
        self.plan: Plan[Provider] | None = None
        self.path = "/"  # upstream path and query: the route prefix and app credentials removed
        self.body = b""  # the request body when it is kept in memory
        self.spool: SpooledBody | None = None  # ... or on disk, past limits.memory_body_bytes
        self._models: dict[str, str] = {}  # by where the model is found: body, path, deployment
        self._headers: list[tuple[str, str]] | None = None
        self.model: str | None = None  # the first model name found, for labels
        self._label: str | None = None
        self.answer: LocalAnswer | None = None  # set when keymux answered itself
        self.answer_bytes = 0
        self.relay: Relay | None = None  # the answer being (or last) forwarded
        self.upgraded = False  # a WebSocket session was opened with the app
        self.status = 0
        self.ttfb: float | None = None
        self.upstream_time = 0.0  # waiting for upstream headers
        self.waited = 0.0  # waiting in line for a key to free up

    @property
    def prepared(self) -> bool:
        """The answer's headers went to the app: no retry, no other answer."""
        return self.upgraded or (self.relay is not None and self.relay.prepared)

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
        rejected = self._take_path(route.prefix)
        if rejected is not None:
            return rejected
        if websocket.is_websocket(self.request):
            self.plan = self._plan(None)
            return await websocket.serve(self)
        rejected = await self._read_body()
        if rejected is not None:
            return rejected
        plan = self.plan = self._plan(self._pin())
        if self.proxy.line:  # others wait for keys: behind them, not before
            attempt = await self._wait(plan, behind=True)
        else:
            attempt = plan.next()
        if attempt is None:
            attempt = await self._wait(plan)
            if attempt is None:
                return self.local(plan.no_key())
        while True:
            result = await self._attempt(attempt)
            if not isinstance(result, _Held):
                return result
            attempt = plan.next() or await self._wait(plan)
            if attempt is None:
                return await self._give_last_answer(result)
            if result.response is not None:
                result.response.close()

    def _plan(self, pin: tuple[str, Owner] | None) -> Plan[Provider]:
        spool = self.spool
        tokens = estimate_tokens(self.body) if spool is None else estimate_tokens(spool.head, spool.size)
        return Plan(self.providers, self.model_for, self.rt.config.retry, self.rt.clock, self, pin, tokens)

    async def _wait(self, plan: Plan[Provider], behind: bool = False) -> Attempt[Provider] | None:
        """Wait in line for a key that frees up soon (retry.max_wait), when the plan says one
        will; `behind`: a new request's one try at once, behind those already waiting."""
        now = plan.clock()
        window = (now, now) if behind else plan.wait_until()
        if window is None:
            return None
        started = self.loop.time()
        attempt = await self.proxy.line.wait(plan, window)
        waited = self.loop.time() - started
        self.waited += waited
        if not behind:
            self.metrics.capacity_wait("served" if attempt is not None else "gave_up").observe(waited)
        return attempt

    def app_url(self, upstream_url: str, base_url: str) -> str:
        """An upstream URL the app is told to call next, made to point back at keymux."""
        if not upstream_url.startswith(base_url + "/"):
            return upstream_url  # somewhere else: left as the provider said
        request = self.request
        prefix = "" if self.route_label == "/" else self.route_label
        return f"{request.scheme}://{request.host}{prefix}{upstream_url[len(base_url):]}"

    def _pin(self) -> tuple[str, Owner] | None:
        """The resource this request names and the key that created it, when that key's
        provider is on the route and keeps affinity: the only key the request may use."""
        found = self.rt.affinity.pin(self.path, self.body if self.spool is None else self.spool.head)
        if found is None:
            return None
        owner = found[1]
        on_route = any(p.name == owner.provider and p.config.affinity for p in self.providers)
        return found if on_route else None

    def _learn_resource(self, attempt: Attempt[Provider], relay: Relay) -> None:
        """A create answer names the resource it made: remember which key made it."""
        provider = attempt.provider
        if not provider.config.affinity or not creates_resource(self.request.method, self.path.partition("?")[0]):
            return
        upload = relay.response.headers.get("X-Goog-Upload-URL")
        resource = upload_session(upload) if upload else None
        if resource is None and relay.usage is not None:
            resource = created_id(relay.usage.head or b"")
        if resource is not None:
            self.rt.affinity.learn(resource, Owner(provider.name, attempt.key.name))

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
        if _suspicious(raw_path, self.request.path):
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
        if length is not None and length > limit:
            return self._too_large()
        if not request.body_exists:
            return None
        if request.headers.get("Expect", "").lower() == "100-continue" and request.version >= (1, 1):
            # Every check that could refuse the request has passed: ask for the body now
            # (curl waits a second for this above 1 KiB, and some clients wait forever).
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        limits = self.rt.config.limits
        if length is not None and length <= limits.memory_body_bytes:  # the usual case: one read
            try:
                self.body = await request.content.readexactly(length)
            except asyncio.IncompleteReadError:
                return self.local_error(400, "incomplete_body", "keymux: the request body ended early")
            return None
        return await self._read_large_body(length)

    async def _read_large_body(self, length: int | None) -> web.Response | None:
        """A body of unknown or large size: in memory up to limits.memory_body_bytes, then spooled."""
        limits = self.rt.config.limits
        chunks: list[bytes] = []
        size = 0
        spool = None
        async for chunk in self.request.content.iter_any():
            size += len(chunk)
            if size > limits.max_body_bytes:
                return self._too_large()
            if spool is None and size > limits.memory_body_bytes:
                try:
                    spool = self.spool = SpooledBody(limits.spool_dir)
                except OSError as exc:
                    log.error("cannot spool a request body", extra={"fields": {"reason": str(exc)}})
                    message = "keymux: cannot spool the request body"
                    return self.local(LocalAnswer(507, "spool_failed", message, Outcome.UPSTREAM_ERROR))
                for held in chunks:
                    spool.write(held)
                chunks.clear()
            if spool is not None:
                spool.write(chunk)
            else:
                chunks.append(chunk)
        if length is not None and size != length:
            return self.local_error(400, "incomplete_body", "keymux: the request body ended early")
        if spool is not None:
            spool.finish()
        else:
            self.body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return None

    def _too_large(self) -> web.Response:
        message = f"keymux: the request body is over the limit of {self.rt.config.limits.max_body_bytes} bytes"
        return self.local_error(413, "request_too_large", message)

    def model_for(self, provider: Provider) -> str:
        """The model this request asks of `provider` ("" when it names none)."""
        spec = provider.spec
        model = self._models.get(spec.model_location)
        if model is None:
            path, content_type = self.path.partition("?")[0], self.request.headers.get("Content-Type", "")
            found = None
            for body in self._model_sources():
                found = spec.find_model(path, body, content_type)
                if found:
                    break
            if not found:  # a WebSocket names it in the query (Realtime ?model=, Azure ?deployment=)
                query = self.request.rel_url.query
                found = query.get("model") or query.get("deployment")
            model = (found or "")[:256]
            self._models[spec.model_location] = model
            if self.model is None and model:
                self.model = model
        return model

    def _model_sources(self) -> tuple[bytes, ...]:
        """Where the body may name its model: all of it, or a spooled body's two ends; an
        encoded body is read decoded (it is forwarded as it came)."""
        spool, encoding = self.spool, self.request.headers.get("Content-Encoding")
        if spool is None:
            return (decoded_prefix(encoding, self.body),) if self.body and encoding else (self.body,)
        if encoding:
            return (decoded_prefix(encoding, spool.head),)  # the tail of a compressed stream cannot be read alone
        return (spool.head, spool.tail)

    # -- one attempt -----------------------------------------------------------------------

    async def _attempt(self, attempt: Attempt[Provider]) -> web.StreamResponse | _Held:
        """Send, judge, and forward or hold the answer; the attempt is finished here, once."""
        provider = attempt.provider
        verdict = DISCONNECTED  # what it ends as if the app goes away before anything is known
        relay = None
        held = None
        response = None
        try:
            clock = self.loop.time
            sent = clock()
            try:
                response = await self._send(provider, attempt)
                self.ttfb = clock() - sent
                if provider.report is not None and (report := provider.report(response.headers, time.time())):
                    attempt.learn(report)
                self.metrics.ttfb(provider.name, self._model_label()).observe(self.ttfb)
                verdict, prefix = await self._judge(provider, response)
            except _TRANSPORT_ERRORS as exc:
                verdict = Verdict(transport_outcome(exc))
                return _Held(None)
            finally:
                self.upstream_time += clock() - sent
            if verdict.outcome.retryable:
                held = _Held(response, prefix)
                return held
            relay = self.relay = Relay(self, provider, response, prefix, verdict)
            return await relay.run()
        finally:
            final = relay.verdict if relay is not None else verdict
            attempt.finish(final)
            if relay is not None and final.outcome is Outcome.SUCCESS:
                if relay.usage is not None:
                    for kind, count in relay.usage.counts().items():
                        self.metrics.tokens(provider.name, attempt.key.name, self._model_label(), kind).inc(count)
                self._learn_resource(attempt, relay)
            if response is not None and held is None:
                response.close()

    async def _send(self, provider: Provider, attempt: Attempt[Provider]) -> aiohttp.ClientResponse:
        session = self.proxy.session
        assert session is not None, "Proxy.start() was not awaited"
        method, url = self.request.method, provider.config.base_url + self.path
        headers = self.app_headers(provider)
        headers.update(provider.headers_for(attempt.key, method, url, self.body))
        spool = self.spool
        data: bytes | AsyncIterator[bytes] | None = self.body or None
        if spool is not None:
            data = spool.chunks()  # each attempt reads the spooled body from its start
            headers["Content-Length"] = str(spool.size)
        return await session.request(
            method,
            self.rt.url(url),
            headers=headers,
            data=data,
            allow_redirects=False,
            timeout=self.rt.client_timeout,
        )

    def app_headers(self, provider: Provider) -> CIMultiDict[str]:
        """The app's end-to-end headers, less its credentials, plus the provider's defaults."""
        if self._headers is None:
            incoming = self.request.headers
            drop = self.rt.drop_headers
            if "connection" in incoming:
                drop = drop | _connection_tokens(incoming)
            self._headers = [(k, v) for k, v in incoming.items() if k.lower() not in drop]
        headers = CIMultiDict(self._headers)
        for name, value in provider.spec.default_headers:
            headers.setdefault(name, value)
        return headers

    async def _judge(self, provider: Provider, response: aiohttp.ClientResponse) -> tuple[Verdict, bytes]:
        """What the answer says so far, and the bytes read to decide it."""
        if response.status >= 400:
            prefix = await _read_prefix(response, self.rt.config.limits.error_body_bytes)
            return classify(response.status, response.headers, prefix, provider.patterns, time.time()), prefix
        if provider.spec.stream_errors and "event-stream" in response.headers.get("content-type", ""):
            # An error can arrive as the first event of a 200 stream: peek before answering.
            first = await response.content.readany()
            return (classify_stream_start(first, provider.patterns) if first else SUCCESS), first
        return SUCCESS, b""

    async def _give_last_answer(self, held: _Held) -> web.StreamResponse:
        """Everything failed: the app gets the last upstream answer, or a gateway error."""
        if held.response is None:
            assert self.plan is not None
            return self.local(self.plan.exhausted())
        plan = self.plan
        last = plan.last if plan is not None else None
        assert plan is not None and last is not None and last.verdict is not None
        relay = self.relay = Relay(self, last.provider, held.response, held.prefix, last.verdict, usage=False)
        if last.verdict.outcome is Outcome.RATE_LIMITED and "retry-after" not in held.response.headers:
            # The app's SDK backs off by Retry-After: say when a key is free again, as keymux knows it.
            ready = plan.recovery()
            rest = last.verdict.retry_after if ready is None else ready - plan.clock()
            if rest is not None:
                relay.retry_after = retry_after_header(rest)
        try:
            return await relay.run()
        finally:
            held.response.close()

    # -- local answers ---------------------------------------------------------------------

    def local(self, answer: LocalAnswer) -> web.Response:
        """An answer keymux gives itself, in the shape the app's SDK expects."""
        self.answer = answer
        spec = self.providers[0].spec if self.providers else self._guess_spec()
        headers = {"x-keymux-error": answer.code}
        retry_after = answer.retry_after_header
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        body = spec.error_json(answer.status, answer.code, answer.message)
        self.status = answer.status
        self.answer_bytes = len(body)
        return web.Response(status=answer.status, body=body, content_type="application/json", headers=headers)

    def local_error(self, status: int, code: str, message: str) -> web.Response:
        return self.local(LocalAnswer(status, code, message, Outcome.CLIENT_ERROR))

    def _guess_spec(self) -> ProviderSpec:
        types = {p.spec.type for p in self.rt.providers.values()}
        return PROVIDERS[types.pop()] if len(types) == 1 else PROVIDERS["openai"]

    def _unknown_route(self) -> web.Response:
        prefixes = ", ".join(route.prefix or "/" for route, _ in self.rt.routes)
        return self.local_error(404, "route_not_found", f"keymux: no route for this path; routes: {prefixes}")

    # -- the plan's observer ---------------------------------------------------------------

    def attempt_finished(self, attempt: Attempt[Any]) -> None:
        assert attempt.verdict is not None
        self.metrics.attempt(attempt.provider.name, attempt.key.name, self._model_label(), attempt.verdict.outcome)

    def key_retry(self, provider: str, reason: Outcome) -> None:
        self.metrics.key_retries(provider, self._model_label(), reason.value).inc()

    def fallback(self, from_provider: str, to_provider: str) -> None:
        self.metrics.fallbacks(self.route_label, from_provider, to_provider).inc()

    # -- reporting -------------------------------------------------------------------------

    def _model_label(self) -> str:
        label = self._label
        if label is None:
            label = self.metrics.models(self.model)
            if self.model is not None:  # final once the model is known
                self._label = label
        return label

    def outcome(self) -> Outcome:
        """The request's outcome: keymux's own answer's, else the last attempt's final one."""
        if self.answer is not None:
            return self.answer.outcome
        relay = self.relay
        if relay is not None and relay.cut_by_app:
            return Outcome.CLIENT_DISCONNECTED
        last = self.plan.last if self.plan is not None else None
        if last is None or last.verdict is None:
            return Outcome.CLIENT_DISCONNECTED
        return last.verdict.outcome

    def release(self) -> None:
        """Drop the links back to this exchange (the plan's observer, the relay's owner), so
        its request, bodies and buffers are freed as soon as it ends, not at a later GC pass;
        remove a spooled body."""
        self.plan = None
        self.relay = None
        if self.spool is not None:
            self.spool.close()

    def report(self) -> None:
        outcome = self.outcome().value
        duration = self.loop.time() - self.started
        model = self._model_label()
        plan, relay = self.plan, self.relay
        last = plan.last if plan is not None else None
        provider = last.provider.name if last is not None else "none"
        streaming = relay.streaming_time if relay is not None else 0.0
        metrics = self.metrics
        metrics.requests(self.route_label, provider, model, outcome).inc()
        metrics.duration(self.route_label, model, outcome).observe(duration)
        inside = duration - self.upstream_time - streaming - self.waited
        metrics.overhead(self.route_label).observe(max(inside, 0.0))
        if plan is not None:
            for name, result in plan.provider_outcomes.items():
                metrics.provider_requests(name, model, result.value).inc()
        access = self.proxy.access
        if access.enabled:
            access.request(
                self.route_label,
                self.request.method,
                provider,
                plan.keys_tried if plan is not None else [],
                model,
                len(plan.attempts) if plan is not None else 0,
                outcome,
                self.status,
                None if self.ttfb is None else self.ttfb * 1000,
                duration * 1000,
                relay.bytes_out if relay is not None else self.answer_bytes,
            )


class Relay:
    """Streams one upstream answer to the app chunk by chunk, and says how the stream ended.

    `verdict` is what the stream's end says about the attempt: the verdict of its headers
    when the whole answer went through (or the app hung up after the provider's terminal
    event), a transport failure when the upstream broke, `client_disconnected` when the app
    went away before the end.
    """

    __slots__ = (
        "_headers_verdict",
        "_tail",
        "bytes_out",
        "cut_by_app",
        "exchange",
        "idle_expired",
        "idle_limit",
        "last_chunk",
        "prefix",
        "prepared",
        "provider",
        "response",
        "retry_after",
        "spec",
        "streaming_time",
        "usage",
        "verdict",
    )

    def __init__(
        self,
        exchange: Exchange,
        provider: Provider,
        response: aiohttp.ClientResponse,
        prefix: bytes,
        verdict: Verdict,
        usage: bool = True,
    ) -> None:
        self.exchange = exchange
        self.provider = provider
        self.spec = provider.spec
        self.response = response
        self.prefix = prefix
        self._headers_verdict = verdict
        self.verdict = DISCONNECTED  # until the stream's end says otherwise
        self.usage = UsageTail.for_response(response.headers) if usage and verdict is SUCCESS else None
        self.prepared = False
        self.cut_by_app = False
        self.bytes_out = 0
        self.last_chunk = 0.0
        self.idle_expired = False
        self.idle_limit = exchange.rt.config.timeouts.idle
        self.streaming_time = 0.0
        self._tail = b""  # the last chunk forwarded, to tell a finished stream from a cut one
        self.retry_after: str | None = None  # a Retry-After to add to the answer

    async def run(self) -> web.StreamResponse:
        exchange, response = self.exchange, self.response
        loop = exchange.loop
        exchange.status = response.status
        out = web.StreamResponse(status=response.status, reason=response.reason)
        length_known = _copy_response_headers(response.headers, out)
        if self.retry_after is not None:
            out.headers["Retry-After"] = self.retry_after
        if (upload := out.headers.get("X-Goog-Upload-URL")) is not None:
            # A resumable upload goes on at the URL the start answered: through keymux, not around it.
            out.headers["X-Goog-Upload-URL"] = exchange.app_url(upload, self.provider.config.base_url)
        scrub = self._scrubber()
        if length_known and not isinstance(scrub, BodyScrubber):  # redaction may change an error body's length
            out.content_length = response.content_length
        stop_read_timeout(response)
        streaming = exchange.proxy.streaming
        started = None
        usage = self.usage
        try:
            await out.prepare(exchange.request)
            self.prepared = True
            started = self.last_chunk = loop.time()
            streaming[self] = None
            if self.prefix:
                chunk = self._pass(self.prefix, usage, scrub)
                await out.write(chunk)
                self._sent(chunk)
            clock = loop.time
            async for chunk in response.content.iter_any():  # the hot loop of a stream: no extra await
                self.last_chunk = clock()
                chunk = self._pass(chunk, usage, scrub)
                await out.write(chunk)
                self._sent(chunk)
            if scrub is not None and (rest := scrub.flush()):
                self.bytes_out += len(rest)
                await out.write(rest)
            await out.write_eof()
            self.verdict = self._headers_verdict
        except _STREAM_BROKEN as exc:
            self.verdict = self._interrupted(exc)
        finally:
            streaming.pop(self, None)
            if started is not None:
                self.streaming_time = loop.time() - started
            if self.verdict is DISCONNECTED and self._complete(length_known):
                self.verdict = self._headers_verdict  # the app had the whole answer, then hung up
            self.cut_by_app = self.verdict is DISCONNECTED
        return out

    @staticmethod
    def _pass(chunk: bytes, usage: UsageTail | None, scrub: BodyScrubber | EventScrubber | None) -> bytes:
        """One chunk on its way to the app: read for usage, scrubbed of secrets."""
        if usage is not None:
            usage.feed(chunk)
        return chunk if scrub is None else scrub.feed(chunk)

    def _sent(self, chunk: bytes) -> None:
        """A chunk the app's connection took: counted, and kept to tell a finished stream."""
        self.bytes_out += len(chunk)
        self._tail = chunk

    def _complete(self, length_known: bool) -> bool:
        """Whether the app already has the whole answer: the terminal event, or every byte."""
        response = self.response
        if length_known and response.content_length is not None and self.bytes_out >= response.content_length:
            return True
        return bool(self._tail) and self.spec.ends_stream(self._tail[-512:])

    def _interrupted(self, exc: BaseException) -> Verdict:
        """The stream stopped after bytes reached the app: no retry is possible any more."""
        transport = self.exchange.request.transport
        if transport is None or transport.is_closing():  # the app went away
            return DISCONNECTED
        transport.close()  # an unterminated body tells the app the answer is incomplete
        return Verdict(Outcome.TIMEOUT if self.idle_expired else transport_outcome(exc))  # the upstream broke

    def _scrubber(self) -> BodyScrubber | EventScrubber | None:
        """What redacts echoed secrets on the way to the app: every error body, and the error
        events of a success stream; other success bodies pass untouched."""
        response = self.response
        redact = self.exchange.rt.redact
        if response.status >= 400:
            return BodyScrubber(redact)
        if "event-stream" in response.headers.get("content-type", ""):
            return EventScrubber(redact)
        return None


def _suspicious(raw_path: str, path: str) -> bool:
    """Dot segments, backslashes or encoded separators: what could move a path elsewhere."""
    if "%" not in raw_path and "\\" not in raw_path and "/." not in path:
        return False  # the usual path: nothing to look at closer
    lowered = raw_path.lower()
    segments = path.split("/")
    return "." in segments or ".." in segments or "\\" in lowered or any(e in lowered for e in _ENCODED_SEPARATORS)


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

