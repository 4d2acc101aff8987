"""The aiohttp shell: the app listener, the admin listener, reloads and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sidecar import __version__
from sidecar.accesslog import AccessLog
from sidecar.config import Config, ConfigError, load_config
from sidecar.logs import setup_logging
from sidecar.metrics import Metrics, scope_label
from sidecar.proxy import Proxy
from sidecar.runtime import Runtime

log = logging.getLogger("keymux")


def read_text(path: str) -> str:
    return Path(path).read_text(encoding="utf-8")


def load_file(path: str, env: Mapping[str, str]) -> Config:
    try:
        text = read_text(path)
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror or exc}") from None
    return load_config(text, env, read_text)


class Sidecar:
    """Both listeners and everything they share, for one process."""

    def __init__(
        self,
        config: Config,
        *,
        config_text: Callable[[], str] | None = None,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        access: AccessLog | None = None,
    ) -> None:
        self.clock = clock
        self.env = dict(env or {})
        self.config_text = config_text  # how to read the config again on reload
        self.metrics = Metrics(config.metrics.max_models)
        self.proxy = Proxy(Runtime(config, clock), self.metrics, access or AccessLog())
        self.proxy.access.enabled = _access_enabled(config)
        self.metrics.models.known |= self.proxy.runtime.known_models
        self.metrics.watch_health(lambda: [(p.name, p) for p in self.proxy.runtime.providers.values()])
        self.metrics.watch_capacity(lambda: [(p.name, p.capacity) for p in self.proxy.runtime.providers.values()])
        self.fleet = None
        if config.shared is not None:  # imported only then: without it keymux is the embedded default
            from sidecar.fleet import FleetLink

            self.fleet = FleetLink(config.shared, lambda: self.proxy.runtime, self.metrics)
        self.draining = False
        self.admin = self._admin_app()
        self._runners: dict[str, web.BaseRunner] = {}
        self._sites: dict[str, web.TCPSite] = {}
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def runtime(self) -> Runtime:
        return self.proxy.runtime

    # -- apps ------------------------------------------------------------------------------

    def _admin_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/keys", self._keys)
        return app

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(60)
            for provider in self.runtime.providers.values():
                provider.health.sweep()
                provider.capacity.sweep(provider.health.settings.idle_expiry)

    # -- admin endpoints -------------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "version": __version__})

    async def _readyz(self, request: web.Request) -> web.Response:
        if self.draining:
            return web.json_response({"status": "draining"}, status=503)
        usable = self.runtime.usable_keys()
        if usable == 0:
            return web.json_response({"status": "no usable key"}, status=503)
        return web.json_response({"status": "ready", "usable_keys": usable})

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _keys(self, request: web.Request) -> web.Response:
        return web.json_response({"keys": self.key_table()})

    def key_table(self) -> list[dict[str, Any]]:
        """The health table: names, states and times only, never a secret."""
        now_mono, now_wall = self.clock(), time.time()
        rows = []
        for provider in self.runtime.providers.values():
            for status in provider.statuses():
                until = None if status.until is None else now_wall + (status.until - now_mono)
                rows.append(
                    {
                        "provider": provider.name,
                        "key": status.key,
                        "model": scope_label(status),
                        "state": status.state.value,
                        "until": None if until is None else _iso(until),
                        "consecutive_failures": status.failures,
                        "last_failure": None if status.last_outcome is None else status.last_outcome.value,
                        "limit": status.limit,
                    }
                )
        return rows

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the app listener, then the admin one: /healthz answering means both are up,
        which is what a startupProbe waits for before the app container starts."""
        config = self.runtime.config
        if self.fleet is not None:  # the fleet's state first: a pod is ready knowing what the others know
            await self.fleet.start()
        await self.proxy.start()
        self._sweeper = asyncio.create_task(self._sweep_forever())
        # The app listener is a bare aiohttp server with one handler, no router: every request,
        # whatever its method or target, reaches the proxy, which answers in the provider's shape.
        # auto_decompress off: a request body with a Content-Encoding is forwarded byte for byte.
        proxy_server = web.Server(
            self.proxy.handle, handler_cancellation=True, access_log=None, auto_decompress=False
        )
        for name, runner, (host, port) in (
            ("app", web.ServerRunner(proxy_server, shutdown_timeout=STOP_GRACE), config.listen),
            ("admin", web.AppRunner(self.admin, access_log=None, shutdown_timeout=STOP_GRACE), config.admin_listen),
        ):
            # Closing a runner cuts what is still in flight after this grace; drain() is the
            # path that waits for in-flight work, up to shutdown.drain_timeout.
            await runner.setup()
            self._runners[name] = runner
            site = web.TCPSite(runner, host, port, reuse_address=True)
            await site.start()
            self._sites[name] = site
        where = {name: _where(site) for name, site in self._sites.items()}
        log.info("listening", extra={"fields": where})

    def port(self, name: str) -> int:
        """The bound port of a listener (for port 0 in tests)."""
        return int(self._runners[name].addresses[0][1])

    async def drain(self) -> None:
        """Graceful stop: unready at once, accept for drain_delay, finish in-flight work.

        An old-style sidecar gets SIGTERM together with the app, which keeps sending requests
        for a while, hence drain_delay; then the app listener closes, idle keep-alive
        connections close, and requests and streams in flight get up to drain_timeout.
        """
        shutdown = self.runtime.config.shutdown
        self.draining = True
        timing = {"drain_delay_s": shutdown.drain_delay, "drain_timeout_s": shutdown.drain_timeout}
        log.info("draining", extra={"fields": timing})
        await asyncio.sleep(shutdown.drain_delay)
        loop = asyncio.get_running_loop()
        started = loop.time()
        site, runner = self._sites.pop("app", None), self._runners.get("app")
        if site is not None and runner is not None:
            server = runner.server
            await site.stop()
            await asyncio.sleep(0)  # let connections accepted just before the close start their request
            if server is not None:
                server.pre_shutdown()  # idle keep-alive connections close; busy ones after their answer
                await server.shutdown(shutdown.drain_timeout)  # then what is left is cancelled
        waited = loop.time() - started
        if waited >= shutdown.drain_timeout:
            log.warning("drain_timeout reached; requests still in flight were cut", extra={"fields": timing})
        await self.stop()
        log.info("stopped", extra={"fields": {"drain_s": round(waited, 3)}})

    async def stop(self) -> None:
        """Close both listeners now; anything still in flight gets STOP_GRACE, then is cut."""
        for runner in self._runners.values():  # the app listener first, the admin one last
            await runner.cleanup()
        self._runners.clear()
        self._sites.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self.fleet is not None:
            await self.fleet.close()
        await self.proxy.close()

    def reload(self, text: str | None = None) -> bool:
        """Swap in a new config if it is valid; the old one keeps serving otherwise.

        Requests in flight keep the Runtime they started with. The new Runtime adopts the
        health of every key whose provider, name and value are unchanged.
        """
        old = self.runtime.config
        try:
            raw = text if text is not None else (self.config_text() if self.config_text else None)
            if raw is None:
                return False
            config = load_config(raw, self.env, read_text)
            runtime = Runtime(config, self.clock, previous=self.runtime)
        except Exception as exc:  # a bad file must never stop the old config serving
            self.metrics.reloads("failure").inc()
            reason = str(exc) if isinstance(exc, ConfigError | OSError) else f"{type(exc).__name__}: {exc}"
            log.error("config reload rejected; the previous config keeps serving", extra={"fields": {"reason": reason}})
            return False
        self.proxy.runtime = runtime
        if self.fleet is not None:
            self.fleet.bind(runtime)
        self.metrics.models.known |= runtime.known_models
        self.metrics.forget_keys({(p.name, k.name) for p in runtime.providers.values() for k in p.config.keys})
        self.metrics.reloads("success").inc()
        if config.log_level != old.log_level:
            logging.getLogger().setLevel(config.log_level.upper())
            self.proxy.access.enabled = _access_enabled(config)
        for field in RESTART_ONLY:
            if getattr(config, field) != getattr(old, field):
                log.warning("this change needs a restart; the old value stays", extra={"fields": {"field": field}})
        for warning in config.warnings:
            log.warning("config warning", extra={"fields": {"reason": warning}})
        changes = {"providers": sorted(config.providers), **key_changes(old, config)}
        log.info("config reloaded", extra={"fields": changes})
        return True


STOP_GRACE = 1.0  # seconds stop() lets in-flight work finish before cutting it
RESTART_ONLY = ("listen", "admin_listen", "shared")  # bound sockets stay as they are until a restart


def key_changes(old: Config, new: Config) -> dict[str, list[str]]:
    """provider/key names a reload adds, removes or gives a new value (whose health resets)."""

    def secrets(config: Config) -> dict[str, str]:
        return {f"{p.name}/{k.name}": k.secret for p in config.providers.values() for k in p.keys}

    before, after = secrets(old), secrets(new)
    return {
        "keys_added": sorted(after.keys() - before.keys()),
        "keys_removed": sorted(before.keys() - after.keys()),
        "keys_changed": sorted(name for name in before.keys() & after.keys() if before[name] != after[name]),
    }


def _access_enabled(config: Config) -> bool:
    """One access line per request at `info` and `debug`."""
    return config.log_level in ("debug", "info")


def _where(site: web.TCPSite) -> str:
    return site.name


def _iso(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))


async def serve(sidecar: Sidecar, watch: Callable[[Sidecar], Any] | None = None) -> int:
    """Run until SIGTERM or SIGINT, then drain and return 0. SIGHUP reloads."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_stop(signum: signal.Signals) -> None:
        if not stop.is_set():
            log.info("stop signal received", extra={"fields": {"signal": signum.name}})
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop, signum)
    loop.add_signal_handler(signal.SIGHUP, sidecar.reload)
    try:
        await sidecar.start()
    except OSError as exc:
        log.error("cannot listen", extra={"fields": {"reason": str(exc)}})
        await sidecar.stop()
        return 1
    watcher = asyncio.create_task(watch(sidecar)) if watch is not None else None
    await stop.wait()
    if watcher is not None:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    await sidecar.drain()
    return 0


def configure_logging(config: Config, sidecar: Sidecar | None = None) -> None:
    redact = (lambda text: sidecar.runtime.redact.text(text)) if sidecar is not None else None
    setup_logging(config.log_level, redact)
