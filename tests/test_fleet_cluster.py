"""The shared store on a Redis Cluster: every key's data in one slot (its fingerprint is the hash
tag), no multi-key command across slots. Three `redis-server` cluster nodes of the test's own on
loopback, nothing on disk, stopped at the end."""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from tests.conftest import FakeServer, Running, StartKeymux, openai_config

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")

REVOKED, GOOD = "sk-cluster-revoked-0000000000", "sk-cluster-good-00000000000000"


def _free_port() -> int:
    """A free port whose cluster bus port (10000 higher) is free too: below 55536."""
    for port in random.sample(range(20000, 45000), 200):
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


async def _run(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    return process.returncode or 0, out.decode(errors="replace")


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[str]:
    ports = [_free_port() for _ in range(3)]
    nodes = []
    try:
        for port in ports:
            args = ["--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes", "--save", ""]
            args += ["--cluster-config-file", f"nodes-{port}.conf", "--appendonly", "no", "--dir", str(tmp_path)]
            quiet = asyncio.subprocess.DEVNULL
            nodes.append(await asyncio.create_subprocess_exec("redis-server", *args, stdout=quiet, stderr=quiet))
        for port in ports:
            for _ in range(200):
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
                    break
                await asyncio.sleep(0.025)
        code, out = await _run(
            "redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-replicas", "0",
            "--cluster-yes",
        )  # fmt: skip
        assert code == 0, out
        probe = aioredis.Redis(port=ports[0])
        for _ in range(200):
            if b"cluster_state:ok" in await probe.execute_command("CLUSTER", "INFO"):
                break
            await asyncio.sleep(0.05)
        await probe.aclose()
        yield f"redis://127.0.0.1:{ports[0]}/0"
    finally:
        for node in nodes:
            if node.returncode is None:
                node.kill()
                await node.wait()


async def test_two_pods_share_a_revoked_key_through_a_redis_cluster(
    cluster: str, fake: FakeServer, keymux: StartKeymux
) -> None:
    fake.provider.revoked.add(REVOKED)
    shared = f"shared:\n  redis_url: {cluster}\n  namespace: cluster-test\n  cluster: true\n"
    pods = [
        await keymux(openai_config(fake.url, {f"{name}-bad": REVOKED, f"{name}-good": GOOD}, shared))
        for name in ("one", "two")
    ]
    for pod in pods:
        assert await pod.value("keymux_shared_store_up") == 1

    async def ask(pod: Running) -> None:
        async with pod.session.post(pod.url + "/v1/chat/completions", json={"model": "gpt-4o", "messages": []}) as r:
            assert r.status == 200

    def disabled(pod: Running) -> set[str]:
        return {row["key"] for row in pod.sidecar.key_table() if row["model"] == "*" and row["state"] == "disabled"}

    await ask(pods[0])  # one-bad: 401, disabled; one-good serves
    for _ in range(100):  # the fact reaches the other pod through the cluster (bounded wait)
        if disabled(pods[1]):
            break
        await asyncio.sleep(0.02)
    assert disabled(pods[1]) == {"two-bad"}
    for _ in range(3):
        for pod in pods:
            await ask(pod)

    assert fake.provider.keys_seen().count(REVOKED) == 1  # once across the two pods, named differently

    store = RedisCluster.from_url(cluster)
    try:
        names = [name async for name in store.scan_iter(match="cluster-test:*")]
        values = [await store.get(name) for name in names if not name.startswith(b"cluster-test:c:")]
    finally:
        await store.aclose()
    assert any(name.startswith(b"cluster-test:h:{") for name in names)
    for blob in [*names, *(v for v in values if v)]:
        assert REVOKED.encode() not in blob and GOOD.encode() not in blob
