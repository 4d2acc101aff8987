"""Redis for the fleet tests: the machine's shared Redis under a namespace of one's own, or a
`redis-server` of the test's own (on a free loopback port, nothing kept on disk) to kill, restart
or put to sleep. Everything a helper starts it stops, and every key it wrote it deletes."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
from pathlib import Path

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

HOST = "127.0.0.1"
SHARED_PORT = 6379  # the machine's Redis (shared with other suites: stay inside your namespace)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def unique_namespace(tag: str) -> str:
    return f"kmx-test-{tag}-{secrets.token_hex(4)}"


class RedisServer:
    """A `redis-server` subprocess of the test's own, on a fixed port so it can be restarted there."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    async def start(self, timeout: float = 5.0) -> None:
        assert self.process is None or self.process.returncode is not None
        self.process = await asyncio.create_subprocess_exec(
            "redis-server", "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no",
            "--dir", str(self.workdir), "--enable-debug-command", "local", "--loglevel", "warning",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        client = self.client(timeout=0.5)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if self.process.returncode is not None:
                        raise AssertionError(f"redis-server exited with {self.process.returncode}")
                    with contextlib.suppress(OSError, aioredis.RedisError):
                        if await client.ping():
                            return
                    await asyncio.sleep(0.02)
        finally:
            await client.aclose()

    async def kill(self) -> None:
        """SIGKILL: the pods see their connections reset, with no goodbye."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            async with asyncio.timeout(5):
                await self.process.wait()

    def client(self, timeout: float = 2.0) -> aioredis.Redis:
        """A client whose calls fail after `timeout`, never retried (redis-py retries by default)."""
        return aioredis.Redis(
            host=HOST,
            port=self.port,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )


class Namespace:
    """One test's namespace in a Redis: a client, a capture of every message on its channel,
    a dump of every key and value, and the cleanup of them all."""

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.name = name
        self.channel = f"{name}:facts"
        self.redis = aioredis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self.captured: list[bytes] = []  # every message seen on the channel
        self._capture: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    async def start_capture(self) -> None:
        """SUBSCRIBE to the namespace's channel (reconnecting when a test's own Redis restarts)."""
        self._capture = asyncio.create_task(self._listen())
        async with asyncio.timeout(5):
            await self._subscribed.wait()

    async def _listen(self) -> None:
        while True:
            client = aioredis.from_url(self.url, socket_connect_timeout=1.0)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self._subscribed.set()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
                    if message is not None and message.get("type") == "message":
                        self.captured.append(message["data"])
            except (OSError, aioredis.RedisError):
                await asyncio.sleep(0.1)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                with contextlib.suppress(Exception):
                    await client.aclose()

    async def names(self, pattern: str = "*") -> list[bytes]:
        return sorted([name async for name in self.redis.scan_iter(match=f"{self.name}:{pattern}", count=500)])

    async def dump(self) -> dict[bytes, bytes]:
        """Every key of the namespace with its value, whatever its type, as bytes."""
        found: dict[bytes, bytes] = {}
        for name in await self.names():
            kind = (await self.redis.type(name)).decode()
            if kind == "string":
                value = await self.redis.get(name) or b""
            elif kind == "hash":
                value = repr(await self.redis.hgetall(name)).encode()
            elif kind == "list":
                value = repr(await self.redis.lrange(name, 0, -1)).encode()
            elif kind == "set":
                value = repr(await self.redis.smembers(name)).encode()
            elif kind == "zset":
                value = repr(await self.redis.zrange(name, 0, -1, withscores=True)).encode()
            else:
                value = repr(await self.redis.dump(name)).encode()
            found[name] = value
        return found

    async def close(self) -> None:
        if self._capture is not None:
            self._capture.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._capture
        with contextlib.suppress(OSError, aioredis.RedisError):
            names = await self.names()
            if names:
                await self.redis.delete(*names)
        with contextlib.suppress(Exception):
            await self.redis.aclose()
