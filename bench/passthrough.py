"""The floor: a bare aiohttp pass-through with no routing, no health and no metrics.

It forwards method, path, query, headers and body to one upstream over a single shared client
session and streams the answer back chunk by chunk, which is the least any aiohttp proxy does.
keymux is measured against it.
"""

from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from sidecar.providers import HOP_BY_HOP_HEADERS

# Per-connection headers a proxy must not forward (RFC 9110 section 7.6.1), plus the ones the
# client session computes itself.
_HOP_BY_HOP = HOP_BY_HOP_HEADERS  # the same end-to-end rule keymux applies, nothing else of it


class PassThrough:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=2**31)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        # limit=0: no cap on upstream connections, as keymux does; auto_decompress off so the
        # bytes and Content-Length pass through untouched.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )

    async def _stop(self, app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert self.session is not None
        body = await request.read()
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP)
        async with self.session.request(
            request.method,
            self.upstream + request.raw_path,
            headers=headers,
            data=body or None,
            allow_redirects=False,
        ) as upstream:
            out = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    out.headers.add(name, value)
            if upstream.content_length is not None:
                out.content_length = upstream.content_length
            await out.prepare(request)
            async for chunk in upstream.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out


def main() -> None:
    parser = argparse.ArgumentParser(description="a bare aiohttp pass-through proxy (the benchmark's floor)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL every request is forwarded to")
    args = parser.parse_args()
    web.run_app(PassThrough(args.upstream).app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
