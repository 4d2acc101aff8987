"""A fake LLM provider for tests, the demo and the benchmark. Loopback only, never a real key.

It answers in the OpenAI, Azure OpenAI, Anthropic and Gemini shapes (chosen by the path), can
stream SSE, and can be scripted per key and per model with rules: an error status with the
provider's real error body, rate-limit headers, delays, and faults such as a connection reset.
Rules are set in-process (`FakeProvider.script`) or over HTTP (`POST /_fake/rules`).

Bucket mode (`buckets=`, `--buckets KEY=RPS,...`) limits keys as OpenAI does: a token bucket per
(key, model), OpenAI's `x-ratelimit-*` headers on every answer, a 429 without `Retry-After` when the
bucket is empty, and per-key counts at `GET /_fake/stats`.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import hashlib
import json
import math
import re
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from aiohttp import BodyPartReader, WSMsgType, web

FAULTS = (
    "reset_before_headers",  # close the connection without answering
    "reset_mid_stream",  # send headers and a first chunk, then reset
    "hang_headers",  # never answer
    "hang_body",  # headers, a first chunk, then nothing more
    "not_http",  # answer bytes that are not HTTP
    "invalid_json",  # 200 with a body that is not JSON
    "big_error",  # an error status with a 10 MB body
    "echo_request",  # 200 message/http quoting the request as received, as a TRACE does
    "error_mid_stream",  # a 200 stream: a first event, then an error event (quoting the key with echo_key)
)


@dataclass
class Rule:
    key: str | None = None  # the secret it applies to (None: any)
    model: str | None = None  # the model it applies to (None: any)
    status: int = 200
    # The error kind for the default body: credential, model_access, rate_limit, quota, server,
    # bad_request or overloaded.
    kind: str | None = None
    body: Any = None  # a body to send instead of the provider-shaped default
    headers: dict[str, str] = field(default_factory=dict)
    times: int | None = None  # apply to this many requests, then expire
    delay: float = 0.0  # seconds before the headers
    fault: str | None = None
    echo_key: bool = False  # quote the full key (and a masked form) in the error message
    events: int | None = None  # SSE events to stream
    event_delay: float | None = None
    end_delay: float = 0.0  # seconds between a stream's last event and the end of its body

    def applies(self, key: str | None, model: str | None) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        return (self.key is None or self.key == key) and (self.model is None or self.model == model)


@dataclass
class Seen:
    """What one request looked like when it reached the fake provider."""

    method: str
    path: str
    query: str
    key: str | None
    model: str | None
    shape: str
    headers: dict[str, str]


class TokenBucket:
    """A request limit as OpenAI enforces one: `capacity` requests of burst, refilled
    continuously at `rate` per second. Pure: the caller passes the time."""

    # Floating-point slack: 0.2 s at 5 per second refills exactly one request, not 0.999….
    _EPSILON = 1e-9

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        if rate <= 0 or capacity < 1:
            raise ValueError(f"a bucket needs rate > 0 and capacity >= 1, not {rate}, {capacity}")
        self.rate = rate
        self.capacity = capacity
        self.tokens = float(capacity)
        self.updated = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Spend `cost` if the bucket holds it (after refilling up to `now`); False when it does not."""
        self._refill(now)
        if self.tokens + self._EPSILON < cost:
            return False
        self.tokens = max(self.tokens - cost, 0.0)
        return True

    def remaining(self) -> int:
        return math.floor(self.tokens + self._EPSILON)

    def until_full(self) -> float:
        """Seconds until the bucket is full again, at the last time it was told."""
        return max(self.capacity - self.tokens, 0.0) / self.rate

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now


def openai_duration(seconds: float) -> str:
    """A reset as OpenAI writes it: `250ms` under a second, else `1s`, `1.5s`, `6m0s`."""
    ms = round(seconds * 1000)
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest = divmod(ms / 1000, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


def parse_buckets(text: str) -> dict[str, float]:
    """`KEY=RPS,KEY=RPS` (the CLI's --buckets) as {key: requests per second}."""
    rates = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, rate = item.rpartition("=")
        if not sep or not key:
            raise ValueError(f"--buckets wants KEY=RPS, not {item!r}")
        rates[key] = float(rate)
    return rates


# The tokens limit of a bucketed key: per minute, as OpenAI's TPM, and far above what any test sends.
TOKENS_PER_MINUTE = 1_000_000
TOKENS_PER_REQUEST = 19  # the usage of a fake completion


_GEMINI = re.compile(r"/models/([^/:]+):(generateContent|streamGenerateContent)$")
_AZURE = re.compile(r"/openai/deployments/([^/]+)/")


class FakeProvider:
    def __init__(
        self,
        *,
        revoked: set[str] | None = None,
        valid: set[str] | None = None,
        events: int = 5,
        event_delay: float = 0.0,
        record: int = 10000,
        fast: bool = False,
        buckets: dict[str, float] | None = None,
        latency: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        tokens_per_minute: int = TOKENS_PER_MINUTE,
    ) -> None:
        self.revoked = set(revoked or ())
        self.valid = valid  # None: every key not revoked is valid
        self.events = events
        self.event_delay = event_delay
        self.rules: list[Rule] = []
        self.seen: deque[Seen] = deque(maxlen=record)
        self.active = 0  # requests being answered now
        self.cancelled = 0  # requests whose client went away before the answer ended
        self.completed = 0
        # Resources exist for the key that made them, as upstream: another key gets a 404.
        self.owners: dict[str, str | None] = {}
        self.uploads: dict[str, bytearray] = {}  # Gemini resumable uploads in progress
        self._made = 0
        # Fast mode (the benchmark's upstream): canned answers, no rules, no parsing, no log.
        self.fast = fast
        self._canned = json.dumps(_completion("openai", "gpt-4o-mini", "/v1/chat/completions")).encode()
        self._canned_stream = b"".join(_sse_events("openai", "gpt-4o-mini", {}, events))
        # Bucket mode: requests per second by key secret (keys not named are not limited).
        self.buckets = dict(buckets) if buckets is not None else None
        self.latency = latency  # seconds before each successful answer
        self.clock = clock
        self.tokens_per_minute = tokens_per_minute
        self._request_buckets: dict[tuple[str, str | None], TokenBucket] = {}
        self._token_buckets: dict[tuple[str, str | None], TokenBucket] = {}
        self.stats: dict[str, Counter[str]] = {}  # bucket mode: answers by key secret, see count()

    # -- scripting -------------------------------------------------------------------------

    def script(self, **fields: Any) -> Rule:
        rule = Rule(**fields)
        if rule.fault is not None and rule.fault not in FAULTS:
            raise ValueError(f"unknown fault {rule.fault!r}; known: {', '.join(FAULTS)}")
        self.rules.append(rule)
        return rule

    def reset(self) -> None:
        self.rules.clear()
        self.seen.clear()

    def keys_seen(self) -> list[str | None]:
        return [s.key for s in self.seen]

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/_fake/rules", self._set_rules)
        app.router.add_delete("/_fake/rules", self._clear_rules)
        app.router.add_get("/_fake/requests", self._requests)
        app.router.add_get("/_fake/stats", self._stats)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def _set_rules(self, request: web.Request) -> web.Response:
        for fields in await request.json():
            self.script(**fields)
        return web.json_response({"rules": len(self.rules)})

    async def _clear_rules(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"rules": 0})

    async def _requests(self, request: web.Request) -> web.Response:
        return web.json_response([asdict(s) for s in self.seen])

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response({"keys": {key: dict(counts) for key, counts in self.stats.items()}})

    # -- bucket mode -------------------------------------------------------------------------

    def count(self, key: str | None, status: int) -> None:
        """One answer for the stats: `served` (2xx), else its status (`429`, `401`, ...)."""
        counts = self.stats.setdefault(key or "", Counter())
        counts["served" if 200 <= status < 300 else str(status)] += 1

    def limit(self, key: str, model: str | None) -> tuple[bool, dict[str, str]] | None:
        """Spend one request of the key's bucket for this model: (whether the bucket had it, the
        rate-limit headers to answer with). None: the key has no bucket."""
        rate = (self.buckets or {}).get(key)
        if rate is None:
            return None
        now = self.clock()
        scope = (key, model)
        requests = self._request_buckets.get(scope)
        if requests is None:
            capacity = max(math.floor(rate), 1)  # one second of burst
            requests = self._request_buckets[scope] = TokenBucket(rate, capacity, now)
        tokens = self._token_buckets.get(scope)
        if tokens is None:
            per_minute = self.tokens_per_minute
            tokens = self._token_buckets[scope] = TokenBucket(per_minute / 60, per_minute, now)
        allowed = requests.take(now)
        if allowed:
            tokens.take(now, TOKENS_PER_REQUEST)
        headers = {
            "x-ratelimit-limit-requests": str(math.floor(requests.capacity)),
            "x-ratelimit-remaining-requests": str(requests.remaining()),
            "x-ratelimit-reset-requests": openai_duration(requests.until_full()),
            "x-ratelimit-limit-tokens": str(math.floor(tokens.capacity)),
            "x-ratelimit-remaining-tokens": str(tokens.remaining()),
            "x-ratelimit-reset-tokens": openai_duration(tokens.until_full()),
        }
        return allowed, headers

    # -- answering -------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.fast:
            return await self._fast(request)
        self.active += 1
        try:
            response = await self._answer(request)
            if self.buckets is not None:
                self.count(_key_of(request), response.status)
            return response
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1
            self.completed += 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._websocket(request)
        if request.path.endswith("/files") and request.content_type == "multipart/form-data":
            return await self._upload(request)
        if "/v1beta/files" in request.path:
            return await self._gemini_file(request)
        raw = await request.read()
        if request.content_type == "multipart/form-data":  # audio and image uploads: the model is a field
            body: Any = _form_fields(request.headers["Content-Type"], raw)
        else:
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                body = None
        shape, model = _shape_and_model(request.path, body)
        key = _key_of(request)
        self.seen.append(
            Seen(request.method, request.path, request.query_string, key, model, shape, dict(request.headers))
        )
        if body is None:
            return _error(shape, 400, "bad_request", "We could not parse the JSON body of your request.")
        if not key or key in self.revoked or (self.valid is not None and key not in self.valid):
            return _error(shape, 401 if shape != "gemini" else 400, "credential", _invalid_key_message(shape, key))
        bucket = self.limit(key, model) if self.buckets is not None else None
        allowed, limits = bucket or (True, {})
        if not allowed:
            limit = limits["x-ratelimit-limit-requests"]
            message = f"Rate limit reached for {model} on requests: Limit {limit}, Used {limit}, Requested 1."
            return _error(shape, 429, "rate_limit", message, limits)
        rule = next((r for r in self.rules if r.applies(key, model)), None)
        if rule is not None and rule.times is not None:
            rule.times -= 1
        if rule is not None and rule.delay:
            await asyncio.sleep(rule.delay)
        if rule is not None and rule.fault is not None:
            return await self._fault(request, rule, shape)
        if rule is not None and rule.status >= 400:
            return _rule_error(shape, rule, key or "", model)
        if (owned := self._resources(request, key, body)) is not None:
            return owned
        if self.latency:
            await asyncio.sleep(self.latency)
        headers = {**limits, **(rule.headers if rule else {})}
        stream = bool(body.get("stream")) or request.path.endswith(":streamGenerateContent")
        if stream:
            events = rule.events if rule and rule.events is not None else self.events
            delay = rule.event_delay if rule and rule.event_delay is not None else self.event_delay
            end_delay = rule.end_delay if rule else 0.0
            return await _stream(request, shape, model, body, events, delay, headers, end_delay)
        if request.path.endswith(("/audio/transcriptions", "/audio/translations")):
            return web.json_response({"text": "Hello from the fake provider."}, headers=headers)
        return web.json_response(_completion(shape, model, request.path), headers=headers)

    async def _fast(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        if b'"stream": true' not in raw and b'"stream":true' not in raw:
            return web.Response(body=self._canned, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if self.event_delay:
            for event in _sse_events("openai", "gpt-4o-mini", {}, self.events):
                await response.write(event)
                await asyncio.sleep(self.event_delay)
        else:
            await response.write(self._canned_stream)
        await response.write_eof()
        return response

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        """A file upload, read part by part without keeping it: its size and digest are answered."""
        key = _key_of(request)
        headers = dict(request.headers)
        self.seen.append(Seen(request.method, request.path, request.query_string, key, None, "openai", headers))
        rule = next((r for r in self.rules if r.applies(key, None)), None)
        if rule is not None and rule.times is not None:
            rule.times -= 1
        if rule is not None and rule.status >= 400:
            return _rule_error("openai", rule, key or "", None)
        if not key or key in self.revoked:
            return _error("openai", 401, "credential", _invalid_key_message("openai", key))
        size, digest, purpose = 0, hashlib.sha256(), None
        async for part in await request.multipart():
            if not isinstance(part, BodyPartReader):
                continue
            if part.filename is None:
                purpose = (await part.read()).decode()
                continue
            while chunk := await part.read_chunk(256 * 1024):
                size += len(chunk)
                digest.update(chunk)
        file_id = self._make("file-", key)
        answer = {"id": file_id, "object": "file", "bytes": size, "purpose": purpose, "sha256": digest.hexdigest()}
        return web.json_response(answer)

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        """A Realtime-like session: `session.created`, then each event echoed back; binary frames
        come back reversed; {"type": "close", "code": N, "reason": R} closes with that code."""
        key = _key_of(request) or request.query.get("key")
        model = request.query.get("model") or request.query.get("deployment")
        self.seen.append(Seen("GET", request.path, request.query_string, key, model, "openai", dict(request.headers)))
        if not key or key in self.revoked:
            return _error("openai", 401, "credential", _invalid_key_message("openai", key))
        rule = next((r for r in self.rules if r.applies(key, model)), None)
        if rule is not None and rule.times is not None:
            rule.times -= 1
        if rule is not None and rule.status >= 400:
            return _rule_error("openai", rule, key, model)
        offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        ws = web.WebSocketResponse(protocols=offered[:1])
        await ws.prepare(request)
        if request.path.endswith("BidiGenerateContent"):
            return await _gemini_live(ws)
        await ws.send_str(json.dumps({"type": "session.created", "session": {"model": model}, "protocols": offered}))
        async for message in ws:
            if message.type is WSMsgType.BINARY:
                await ws.send_bytes(message.data[::-1])
                continue
            event = json.loads(message.data)
            if event.get("type") == "close":
                await ws.close(code=int(event["code"]), message=str(event["reason"]).encode())
                break
            await ws.send_str(json.dumps({"type": "echo", "event": event}))
        return ws

    async def _gemini_file(self, request: web.Request) -> web.StreamResponse:
        """Gemini's resumable upload (start, then chunks at the URL it answered) and files.get."""
        key = _key_of(request) or request.query.get("key")
        raw = await request.read()
        headers = dict(request.headers)
        self.seen.append(Seen(request.method, request.path, request.query_string, key, None, "gemini", headers))
        if not key or key in self.revoked:
            return _error("gemini", 400, "credential", _invalid_key_message("gemini", key))
        command = request.headers.get("X-Goog-Upload-Command", "")
        if command == "start":
            session = self._make("upload-", key)
            self.uploads[session] = bytearray()
            url = f"{request.scheme}://{request.host}/upload/v1beta/files?upload_id={session}&upload_protocol=resumable"
            return web.Response(headers={"X-Goog-Upload-URL": url, "X-Goog-Upload-Status": "active"})
        if "upload" in command:
            session = request.query.get("upload_id", "")
            if session not in self.uploads or self.owners.get(session) != key:
                return _error("gemini", 404, "bad_request", f"No upload session {session} for this key.")
            self.uploads[session] += raw
            if "finalize" not in command:
                return web.Response(headers={"X-Goog-Upload-Status": "active"})
            name = self._make("files/f", key)
            size = len(self.uploads.pop(session))
            file = {"name": name, "mimeType": "text/plain", "sizeBytes": str(size), "state": "ACTIVE"}
            file["uri"] = f"{request.scheme}://{request.host}/v1beta/{name}"
            return web.json_response({"file": file}, headers={"X-Goog-Upload-Status": "final"})
        name = "files/" + request.path.rsplit("/", 1)[1]
        if self.owners.get(name, key) != key or name not in self.owners:
            return _error("gemini", 403, "model_access", f"You do not have permission to access the File {name}.")
        return web.json_response({"name": name, "mimeType": "text/plain", "state": "ACTIVE"})

    def _make(self, prefix: str, key: str | None) -> str:
        self._made += 1
        resource = f"{prefix}{self._made}"
        self.owners[resource] = key
        return resource

    def _resources(self, request: web.Request, key: str | None, body: dict[str, Any]) -> web.Response | None:
        """Files, batches and stored responses: made for one key, invisible to the others."""
        named = re.findall(r"(?:file-|batch_|resp_|msgbatch_)\d+", request.path)
        named += re.findall(r"files/f\d+", json.dumps(body.get("contents", "")))
        named += [body[f] for f in ("input_file_id", "previous_response_id", "file_id") if isinstance(body.get(f), str)]
        for resource in named:
            if self.owners.get(resource, key) != key:
                if resource.startswith("files/"):  # Gemini: another project's file is forbidden
                    return _error("gemini", 403, "model_access", f"You do not have permission to access {resource}.")
                return _error("openai", 404, "bad_request", f"No such object: {resource}")
        path, method = request.path, request.method
        if method == "POST" and path.endswith("/responses") and not body.get("stream"):
            return web.json_response(_response(self._make("resp_", key), body.get("model")))
        if path.endswith("/messages/batches") or re.search(r"/messages/batches/msgbatch_\d+$", path):
            batch_id = self._make("msgbatch_", key) if method == "POST" else path.rsplit("/", 1)[1]
            counts = {"processing": 1, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
            return web.json_response({"id": batch_id, "type": "message_batch", "processing_status": "in_progress",
                                      "request_counts": counts, "created_at": "2026-12-01T00:00:00Z",
                                      "expires_at": "2026-12-02T00:00:00Z"})  # fmt: skip
        if method == "POST" and path.endswith("/batches"):
            batch = {"id": self._make("batch_", key), "object": "batch", "endpoint": body.get("endpoint")}
            batch |= {"input_file_id": body.get("input_file_id"), "completion_window": "24h", "status": "validating"}
            return web.json_response({**batch, "created_at": 0})
        if method == "GET" and re.search(r"/files/file-\d+$", path):
            file = {"id": path.rsplit("/", 1)[1], "object": "file", "bytes": 0, "created_at": 0}
            return web.json_response({**file, "filename": "data.jsonl", "purpose": "batch", "status": "processed"})
        return None

    async def _fault(self, request: web.Request, rule: Rule, shape: str) -> web.StreamResponse:
        transport = request.transport
        assert transport is not None
        if rule.fault == "reset_before_headers":
            transport.abort()
            return web.Response()
        if rule.fault == "hang_headers":
            await asyncio.sleep(3600)
        if rule.fault == "not_http":
            transport.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\nthis is not http\r\n")
            transport.close()
            return web.Response()
        if rule.fault == "invalid_json":
            return web.Response(body=b'{"id": "chatcmpl-1", "choices": [', content_type="application/json")
        if rule.fault == "big_error":
            return web.Response(status=rule.status if rule.status >= 400 else 500, body=b"x" * (10 * 1024 * 1024))
        if rule.fault == "echo_request":
            return web.Response(body=_echo(request), content_type="message/http")
        if rule.fault == "error_mid_stream":
            return await _stream_then_error(request, shape, rule)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices":[{"delta":{"content":"partial"}}]}\n\n')
        if rule.fault == "hang_body":
            await asyncio.sleep(3600)
        await asyncio.sleep(0.05)
        transport.abort()
        return response


def _form_fields(content_type: str, raw: bytes) -> dict[str, str]:
    """The text fields of a multipart/form-data body (files left out)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw
    )
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str) and part.get_filename() is None:
            fields[name] = part.get_content().strip()
    return fields


def _echo(request: web.Request) -> bytes:
    version = request.version
    head = f"{request.method} {request.raw_path} HTTP/{version.major}.{version.minor}".encode()
    fields = b"".join(b"\r\n" + name + b": " + value for name, value in request.raw_headers)
    return head + fields + b"\r\n\r\n"


async def _stream_then_error(request: web.Request, shape: str, rule: Rule) -> web.StreamResponse:
    key = _key_of(request) or ""
    message = _MESSAGES["overloaded"] + (f" Key used: {key} ({_mask(key)})." if rule.echo_key else "")
    if shape == "anthropic":
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "partial"}}
        first = f"event: content_block_delta\ndata: {json.dumps(delta)}\n\n".encode()
        error = {"type": "error", "error": {"type": "overloaded_error", "message": message}}
        last = f"event: error\ndata: {json.dumps(error)}\n\n".encode()
    else:
        first = b'data: {"choices":[{"delta":{"content":"partial"}}]}\n\n'
        last = f"data: {json.dumps({'error': {'message': message, 'type': 'server_error', 'code': None}})}\n\n".encode()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(first)
    await asyncio.sleep(0.01)
    await response.write(last)
    await response.write_eof()
    return response


def _key_of(request: web.Request) -> str | None:
    headers = request.headers
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:]
    for name in ("x-api-key", "x-goog-api-key", "api-key"):
        if name in headers:
            return headers[name]
    return request.query.get("key")


def _shape_and_model(path: str, body: Any) -> tuple[str, str | None]:
    model = body.get("model") if isinstance(body, dict) else None
    if (match := _GEMINI.search(path)) is not None:
        return "gemini", match.group(1)
    if (match := _AZURE.search(path)) is not None:
        return "azure", match.group(1)
    if path.endswith("/messages"):
        return "anthropic", model
    return "openai", model


def _mask(key: str | None) -> str:
    return f"sk-…{key[-4:]}" if key else "(none)"


def _invalid_key_message(shape: str, key: str | None) -> str:
    return {
        "openai": f"Incorrect API key provided: {_mask(key)}. You can find your API key at https://platform.openai.com/account/api-keys.",
        "anthropic": "invalid x-api-key",
        "gemini": "API key not valid. Please pass a valid API key.",
        "azure": "Access denied due to invalid subscription key or wrong API endpoint.",
    }[shape]


_MESSAGES = {
    "credential": "Incorrect API key provided",
    "model_access": "The model `{model}` does not exist or you do not have access to it.",
    "rate_limit": "Rate limit reached for requests",
    "quota": "You exceeded your current quota, please check your plan and billing details.",
    "server": "The server had an error while processing your request.",
    "bad_request": "Invalid value for 'temperature': must be between 0 and 2.",
    "overloaded": "Overloaded",
}
_DEFAULT_KIND = {401: "credential", 403: "model_access", 404: "model_access", 429: "rate_limit", 529: "overloaded"}


def _rule_error(shape: str, rule: Rule, key: str, model: str | None) -> web.Response:
    if rule.fault is None and rule.body is not None:
        body = rule.body if isinstance(rule.body, str) else json.dumps(rule.body)
        return web.Response(status=rule.status, text=body, content_type="application/json", headers=rule.headers)
    kind = rule.kind or _DEFAULT_KIND.get(rule.status, "server" if rule.status >= 500 else "bad_request")
    message = _MESSAGES[kind].format(model=model)
    if rule.echo_key:
        message += f" Key used: {key} ({_mask(key)})."
    return _error(shape, rule.status, kind, message, rule.headers)


_OPENAI_CODES = {
    "credential": ("invalid_request_error", "invalid_api_key"),
    "model_access": ("invalid_request_error", "model_not_found"),
    "rate_limit": ("requests", "rate_limit_exceeded"),
    "quota": ("insufficient_quota", "insufficient_quota"),
    "server": ("server_error", None),
    "bad_request": ("invalid_request_error", None),
    "overloaded": ("server_error", None),
}
_ANTHROPIC_TYPES = {
    "credential": "authentication_error",
    "model_access": "permission_error",
    "rate_limit": "rate_limit_error",
    "quota": "rate_limit_error",
    "server": "api_error",
    "bad_request": "invalid_request_error",
    "overloaded": "overloaded_error",
}
_GEMINI_STATUS = {
    "credential": "INVALID_ARGUMENT",
    "model_access": "PERMISSION_DENIED",
    "rate_limit": "RESOURCE_EXHAUSTED",
    "quota": "RESOURCE_EXHAUSTED",
    "server": "INTERNAL",
    "bad_request": "INVALID_ARGUMENT",
    "overloaded": "UNAVAILABLE",
}


def _error(shape: str, status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    if shape == "anthropic":
        body: dict[str, Any] = {"type": "error", "error": {"type": _ANTHROPIC_TYPES[kind], "message": message}}
    elif shape == "gemini":
        body = {"error": {"code": status, "message": message, "status": _GEMINI_STATUS[kind]}}
        if kind == "credential":
            body["error"]["details"] = [
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}
            ]
    elif shape == "azure" and kind == "credential":
        body = {"error": {"code": "401", "message": message}}
    else:
        type_, code = _OPENAI_CODES[kind]
        body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _completion(shape: str, model: str | None, path: str) -> dict[str, Any]:
    if shape == "anthropic":
        return {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": "Hello from the fake provider."}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 12, "output_tokens": 7},
        }
    if shape == "gemini":
        return {
            "candidates": [
                {
                    "content": {"parts": [{"text": "Hello from the fake provider."}], "role": "model"},
                    "finishReason": "STOP",
                    "index": 0,
                }
            ],
            "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": 7, "totalTokenCount": 19},
        }
    if path.endswith("/models"):
        return {"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model", "created": 0, "owned_by": "fake"}]}
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the fake provider."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
    }


async def _gemini_live(ws: web.WebSocketResponse) -> web.WebSocketResponse:
    """Gemini Live: the setup is acknowledged, then every client turn gets one model turn."""
    async for message in ws:
        event = json.loads(message.data)
        if "setup" in event:
            await ws.send_str(json.dumps({"setupComplete": {}}))
            continue
        text = f"echo from {event.get('setup', {}).get('model', 'the fake provider')}"
        turn = {"modelTurn": {"role": "model", "parts": [{"text": text}]}, "turnComplete": True}
        await ws.send_str(json.dumps({"serverContent": turn}))
    return ws


def _response(response_id: str, model: str | None) -> dict[str, Any]:
    text = {"type": "output_text", "text": "Hello from the fake provider.", "annotations": []}
    message = {"type": "message", "id": "msg_fake", "role": "assistant", "status": "completed", "content": [text]}
    usage = {"input_tokens": 12, "output_tokens": 7, "total_tokens": 19}
    return {"id": response_id, "object": "response", "created_at": 0, "status": "completed", "model": model,
            "output": [message], "usage": usage}  # fmt: skip


def _sse_events(shape: str, model: str | None, body: dict[str, Any], count: int) -> list[bytes]:
    def data(obj: Any, event: str | None = None) -> bytes:
        head = f"event: {event}\n" if event else ""
        return f"{head}data: {json.dumps(obj)}\n\n".encode()

    if shape == "anthropic":
        events = [
            data(
                {
                    "type": "message_start",
                    "message": {
                        "id": "msg_fake",
                        "type": "message",
                        "role": "assistant",
                        "model": model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {"input_tokens": 12, "output_tokens": 1},
                    },
                },
                "message_start",
            )
        ]
        events.append(
            data(
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                "content_block_start",
            )
        )
        events += [
            data(
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": f"tok{i} "}},
                "content_block_delta",
            )
            for i in range(count)
        ]
        events.append(data({"type": "content_block_stop", "index": 0}, "content_block_stop"))
        events.append(
            data(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": count},
                },
                "message_delta",
            )
        )
        events.append(data({"type": "message_stop"}, "message_stop"))
        return events
    if shape == "gemini":
        last = count - 1
        return [
            data(
                {
                    "candidates": [
                        {
                            "content": {"parts": [{"text": f"tok{i} "}], "role": "model"},
                            "index": 0,
                            **({"finishReason": "STOP"} if i == last else {}),
                        }
                    ],
                    "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": i + 1},
                }
            )
            for i in range(count)
        ]
    chunk = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": model}
    events = [
        data({**chunk, "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}]})
        for i in range(count)
    ]
    events.append(data({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append(
            data(
                {
                    **chunk,
                    "choices": [],
                    "usage": {"prompt_tokens": 12, "completion_tokens": count, "total_tokens": 12 + count},
                }
            )
        )
    events.append(b"data: [DONE]\n\n")
    return events


async def _stream(
    request: web.Request,
    shape: str,
    model: str | None,
    body: dict[str, Any],
    count: int,
    delay: float,
    headers: dict[str, str],
    end_delay: float = 0.0,
) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers})
    await response.prepare(request)
    for i, event in enumerate(_sse_events(shape, model, body, count)):
        if delay and i:
            await asyncio.sleep(delay)
        await response.write(event)
    if end_delay:  # over a real network the end of the body can trail the last event
        await asyncio.sleep(end_delay)
    await response.write_eof()
    return response


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="keymux's fake LLM provider (loopback only)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4100)
    parser.add_argument("--revoked", action="append", default=[], help="a key that answers as revoked")
    parser.add_argument("--fast", action="store_true", help="canned answers only (for benchmarks)")
    parser.add_argument("--events", type=int, default=5, help="SSE events per stream")
    parser.add_argument("--event-delay", type=float, default=0.0, help="seconds between SSE events")
    parser.add_argument("--buckets", action="append", default=[], metavar="KEY=RPS,...",
                        help="bucket mode: limit each KEY to RPS requests per second per model, with OpenAI's "
                        "x-ratelimit-* headers; counts at GET /_fake/stats")  # fmt: skip
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each successful answer")
    args = parser.parse_args()
    if args.fast and (args.buckets or args.latency):
        parser.error("--fast answers canned bodies only: no --buckets or --latency with it")
    try:
        buckets = {key: rate for text in args.buckets for key, rate in parse_buckets(text).items()}
    except ValueError as exc:
        parser.error(str(exc))
    provider = FakeProvider(
        revoked=set(args.revoked),
        fast=args.fast,
        events=args.events,
        event_delay=args.event_delay,
        buckets=buckets or None,
        latency=args.latency,
    )
    web.run_app(provider.app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
