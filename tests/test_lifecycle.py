"""Kubernetes operation: hot reload and graceful drain, proven on keymux as a real subprocess.

Every test runs `python -m sidecar --config FILE` against the in-process fake provider, talks
to it over loopback sockets and sends it real signals. The tests assert what happened and in
which order, never how long it took; every wait has a generous deadline only so that a broken
run fails instead of hanging, and the fixture kills whatever is still running at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import aiohttp
import pytest

from sidecar.watch import watch_files
from tests.conftest import read_json_log

REPO = Path(__file__).resolve().parent.parent
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True}
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def config_yaml(base_url: str, keys: dict[str, str], *, drain_delay: float = 0.3, drain_timeout: float = 10) -> str:
    """A one-provider config; a key value starting with '/' is a key_file."""
    lines = []
    for name, value in keys.items():
        kind = "key_file" if value.startswith("/") else "key"
        lines.append(f"      - name: {name}\n        {kind}: {value}")
    return (
        f"providers:\n  openai:\n    type: openai\n    base_url: {base_url}\n    keys:\n"
        + "\n".join(lines)
        + f"\nshutdown:\n  drain_delay: {drain_delay}\n  drain_timeout: {drain_timeout}\n"
    )


class AtomicVolume:
    """A directory laid out and updated the way the kubelet updates a ConfigMap or Secret volume:
    files live in a timestamped directory, `..data` links to it, each visible name links to
    `..data/NAME`, and an update renames a fresh `..data` symlink over the old one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0
        root.mkdir(parents=True, exist_ok=True)

    def write(self, files: dict[str, str]) -> None:
        self.generation += 1
        stamp = time.strftime("..%Y_%m_%d_%H_%M_%S", time.gmtime()) + f".{self.generation:09d}"
        data = self.root / stamp
        data.mkdir()
        for name, text in files.items():
            (data / name).write_text(text)
        link = self.root / "..data"
        old = os.readlink(link) if link.is_symlink() else None
        tmp = self.root / "..data_tmp"
        os.symlink(stamp, tmp)
        os.replace(tmp, link)  # the atomic swap
        for name in files:
            visible = self.root / name
            if not visible.is_symlink():
                os.symlink(f"..data/{name}", visible)
        if old is not None:
            for stale in (self.root / old).iterdir():
                stale.unlink()
            (self.root / old).rmdir()

    def path(self, name: str) -> str:
        return str(self.root / name)


@dataclass
class Keymux:
    """One keymux process and a client session for it."""

    process: asyncio.subprocess.Process
    url: str
    admin: str
    session: aiohttp.ClientSession
    log: list[dict[str, object]] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def exit_code(self, timeout: float) -> int:
        """The exit code, once the process has exited and its whole log has been read."""
        async with asyncio.timeout(timeout):
            code = await self.process.wait()
            if self.reader is not None:
                await self.reader
        return code

    async def get_json(self, url: str) -> tuple[int, dict[str, object]]:
        async with asyncio.timeout(5), self.session.get(url) as response:
            return response.status, await response.json()

    async def chat(self, body: dict[str, object] = CHAT) -> tuple[int, str]:
        async with asyncio.timeout(10), self.session.post(self.url + "/v1/chat/completions", json=body) as response:
            return response.status, await response.text()

    async def keys(self) -> dict[str, str]:
        """The key-wide state of each key, from the admin /keys endpoint."""
        _, body = await self.get_json(self.admin + "/keys")
        return {row["key"]: row["state"] for row in body["keys"] if row["model"] == "*"}  # type: ignore[index,union-attr]

    async def reloads(self, result: str) -> float:
        async with asyncio.timeout(5), self.session.get(self.admin + "/metrics") as response:
            text = await response.text()
        for line in text.splitlines():
            if line.startswith(f'keymux_config_reloads_total{{result="{result}"}}'):
                return float(line.split()[-1])
        return 0.0

    def logged(self, msg: str) -> list[dict[str, object]]:
        return [line for line in self.log if line.get("msg") == msg]

    async def log_lines(self, msg: str, count: int = 1) -> list[dict[str, object]]:
        """The lines logged with `msg` once there are `count` of them: the log comes through a
        pipe, so it can trail what the admin endpoints already show."""
        await eventually(lambda: _true(len(self.logged(msg)) >= count), 5, f"{count} log line(s) {msg!r}")
        return self.logged(msg)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


async def run_keymux(config_path: str) -> asyncio.subprocess.Process:
    """`keymux --config FILE` as a real process, its JSON log on a pipe."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "--config", config_path,
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


class Launcher:
    """Starts keymux processes on ports chosen up front, so configs can name them."""

    def __init__(self) -> None:
        self.app_port, self.admin_port = free_port(), free_port()
        self.started: list[Keymux] = []

    def listen(self, text: str) -> str:
        return f"listen: 127.0.0.1:{self.app_port}\nadmin_listen: 127.0.0.1:{self.admin_port}\n" + text

    async def start(self, config_path: str) -> Keymux:
        """Run keymux on `config_path` and wait until /readyz says ready."""
        process = await run_keymux(config_path)
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        km = Keymux(process, f"http://127.0.0.1:{self.app_port}", f"http://127.0.0.1:{self.admin_port}", session)
        km.reader = asyncio.create_task(read_json_log(process, km.log))
        self.started.append(km)

        async def ready() -> bool:
            if process.returncode is not None:
                raise AssertionError(f"keymux exited with {process.returncode}: {km.log}")
            try:
                async with session.get(km.admin + "/readyz") as response:
                    return response.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await eventually(ready, 10, "keymux to be ready")
        return km

    async def close(self) -> None:
        for km in self.started:
            await km.session.close()
            if km.process.returncode is None:
                km.process.kill()
            async with asyncio.timeout(10):
                await km.process.wait()
            if km.reader is not None:
                async with asyncio.timeout(5):
                    await km.reader


@pytest.fixture
async def launcher() -> AsyncIterator[Launcher]:
    launcher = Launcher()
    yield launcher
    await launcher.close()


async def start_with_file(launcher: Launcher, tmp_path: Path, text: str) -> Keymux:
    path = tmp_path / "config.yaml"
    path.write_text(launcher.listen(text))
    return await launcher.start(str(path))


# -- graceful drain ----------------------------------------------------------------------------


def streamed_text(body: bytes) -> str:
    """The text of an OpenAI SSE body that ended with [DONE] (AssertionError otherwise)."""
    events = [event.strip().removeprefix(b"data: ") for event in body.split(b"\n\n") if event.strip()]
    assert events[-1] == b"[DONE]", events[-1:]
    chunks = [json.loads(event) for event in events[:-1]]
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


async def became_unready(km: Keymux) -> None:
    """Poll /readyz until it answers 503 draining."""
    async with asyncio.timeout(10):
        while True:
            status, body = await km.get_json(km.admin + "/readyz")
            if status == 503:
                assert body == {"status": "draining"}
                return
            await asyncio.sleep(0.01)


async def noted(seen: list[str], what: str, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, then append `what` to `seen`: tasks side by side record the order in
    which things happened, which is what the drain tests assert (never how long they took)."""
    result = await awaitable
    seen.append(what)
    return result


async def served_until_refused(km: Keymux) -> list[int]:
    """Send a request on a new connection every 50 ms until one fails to connect; the statuses
    of those that got through."""
    statuses: list[int] = []

    async def refused() -> bool:
        try:
            statuses.append((await km.chat())[0])
        except aiohttp.ClientConnectionError:
            return True
        return False

    await eventually(refused, 30, "the app listener to close")
    return statuses


async def connection_refused(km: Keymux) -> bool:
    try:
        await km.chat()
    except aiohttp.ClientConnectorError as exc:
        return isinstance(exc.os_error, ConnectionRefusedError)
    return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_stream_in_flight_survives_the_stop_signal_to_its_end(fake, launcher, tmp_path, signum):
    fake.provider.script(events=8, event_delay=0.25)  # still streaming well after the signal
    km = await start_with_file(launcher, tmp_path, config_yaml(fake.url, {"a": "sk-aaaaaaaaaaaa"}, drain_delay=0.3))
    seen: list[str] = []
    async with asyncio.timeout(30), km.session.post(km.url + "/v1/chat/completions", json=STREAM) as response:
        assert response.status == 200
        first = await response.content.readline()
        assert first.startswith(b"data: ")
        rest = asyncio.create_task(noted(seen, "stream ended", response.content.read()))
        exited = asyncio.create_task(noted(seen, "exited", km.process.wait()))
        km.signal(signum)
        await noted(seen, "unready", became_unready(km))
        body = first + await rest
    assert streamed_text(body) == "".join(f"tok{i} " for i in range(8))  # every event, then [DONE]
    assert await km.exit_code(timeout=30) == 0
    await exited
    assert seen == ["unready", "stream ended", "exited"]
    assert km.logged("stop signal received")[0]["signal"] == signum.name
    assert not km.logged("drain_timeout reached; requests still in flight were cut")


async def test_requests_sent_during_drain_delay_succeed_and_new_ones_are_refused_after_it(fake, launcher, tmp_path):
    fake.provider.script(model="gpt-4o-long", events=12, event_delay=0.3)  # in flight well past drain_delay
    km = await start_with_file(launcher, tmp_path, config_yaml(fake.url, {"a": "sk-aaaaaaaaaaaa"}, drain_delay=1.5))
    seen: list[str] = []
    async with (
        asyncio.timeout(30),
        km.session.post(km.url + "/v1/chat/completions", json={**STREAM, "model": "gpt-4o-long"}) as long_stream,
    ):
        await long_stream.content.readline()
        rest = asyncio.create_task(noted(seen, "long stream ended", long_stream.content.read()))
        km.signal(signal.SIGTERM)
        await noted(seen, "unready", became_unready(km))
        statuses = await noted(seen, "app listener closed", served_until_refused(km))
        assert await connection_refused(km)
        status, _ = await km.get_json(km.admin + "/readyz")  # the admin listener stays open
        assert status == 503
        assert streamed_text(await rest).endswith("tok11 ")
    assert statuses and set(statuses) == {200}, f"statuses of the requests sent during drain_delay: {statuses}"
    assert seen == ["unready", "app listener closed", "long stream ended"]
    assert await km.exit_code(timeout=30) == 0


async def test_drain_timeout_cuts_a_stream_that_outlasts_it_and_keymux_still_exits_0(fake, launcher, tmp_path):
    fake.provider.script(events=1000, event_delay=0.3)  # far longer than any wait below
    config = config_yaml(fake.url, {"a": "sk-aaaaaaaaaaaa"}, drain_delay=0.2, drain_timeout=1)
    km = await start_with_file(launcher, tmp_path, config)
    seen: list[str] = []
    async with asyncio.timeout(30), km.session.post(km.url + "/v1/chat/completions", json=STREAM) as response:
        await response.content.readline()
        exited = asyncio.create_task(noted(seen, "exited", km.process.wait()))
        km.signal(signal.SIGTERM)
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.content.read()  # cut: the chunked body never terminates
        seen.append("stream cut")
    assert await km.exit_code(timeout=30) == 0
    await exited
    assert seen == ["stream cut", "exited"]
    assert km.logged("drain_timeout reached; requests still in flight were cut")
    await eventually(lambda: _true(fake.provider.cancelled == 1), 5, "keymux to hang up on the upstream stream")


async def test_an_idle_keymux_serves_through_drain_delay_then_exits_0_without_waiting_for_drain_timeout(
    fake, launcher, tmp_path
):
    km = await start_with_file(launcher, tmp_path, config_yaml(fake.url, {"a": "sk-aaaaaaaaaaaa"}, drain_delay=1))
    async with aiohttp.ClientSession() as app:  # keeps its connection to keymux alive and idle
        async with app.post(km.url + "/v1/chat/completions", json=CHAT) as response:
            assert response.status == 200
            await response.read()
        seen: list[str] = []
        exited = asyncio.create_task(noted(seen, "exited", km.process.wait()))
        km.signal(signal.SIGTERM)
        await noted(seen, "unready", became_unready(km))
        status, _ = await km.chat()
        seen.append(f"served {status}")
        assert await km.exit_code(timeout=30) == 0
        await exited
    assert seen == ["unready", "served 200", "exited"]
    assert not km.logged("drain_timeout reached; requests still in flight were cut")


async def test_a_taken_port_is_a_clear_error_and_exit_code_1(fake, launcher, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(launcher.listen(config_yaml(fake.url, {"a": "sk-aaaaaaaaaaaa"})))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", launcher.app_port))
        taken.listen()
        process = await run_keymux(str(path))
        try:
            async with asyncio.timeout(10):
                _, stderr = await process.communicate()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert process.returncode == 1
    [line] = [json.loads(raw) for raw in stderr.decode().splitlines() if '"cannot listen"' in raw]
    assert str(launcher.app_port) in line["reason"]
    assert b"Traceback" not in stderr


# -- hot reload --------------------------------------------------------------------------------


async def test_a_configmap_update_swapping_the_data_symlink_is_picked_up(fake, launcher, tmp_path):
    volume = AtomicVolume(tmp_path / "configmap")
    volume.write({"config.yaml": launcher.listen(config_yaml(fake.url, {"a": "sk-aaaaaaaaaaaa"}))})
    config = volume.path("config.yaml")
    inode = os.lstat(config).st_ino
    km = await launcher.start(config)
    assert await km.keys() == {"a": "usable"}

    volume.write(
        {"config.yaml": launcher.listen(config_yaml(fake.url, {"a": "sk-aaaaaaaaaaaa", "b": "sk-bbbbbbbbbbbb"}))}
    )
    assert os.lstat(config).st_ino == inode  # the visible symlink itself never changed

    async def has_b() -> bool:
        return "b" in await km.keys()

    await eventually(has_b, 5, "the new key to appear in /keys")
    assert await km.reloads("success") == 1
    [reloaded] = await km.log_lines("config reloaded")
    assert reloaded["keys_added"] == ["openai/b"]
    assert reloaded["keys_removed"] == reloaded["keys_changed"] == []
    fake.provider.reset()
    assert [(await km.chat())[0] for _ in range(4)] == [200] * 4
    assert set(fake.provider.keys_seen()) == {"sk-aaaaaaaaaaaa", "sk-bbbbbbbbbbbb"}


async def test_a_rotated_secret_key_file_is_reread_and_health_follows_the_key_values(fake, launcher, tmp_path):
    """Key a keeps its value and its health; key b gets a new value and starts afresh."""
    secrets = AtomicVolume(tmp_path / "secret")
    secrets.write({"a": "sk-revoked-aaaa\n", "b": "sk-revoked-bbbb\n"})
    fake.provider.revoked |= {"sk-revoked-aaaa", "sk-revoked-bbbb"}
    km = await start_with_file(
        launcher, tmp_path, config_yaml(fake.url, {"a": secrets.path("a"), "b": secrets.path("b")})
    )
    status, _ = await km.chat()
    assert status == 401  # both keys tried, both revoked
    assert await km.keys() == {"a": "disabled", "b": "disabled"}

    secrets.write({"a": "sk-revoked-aaaa\n", "b": "sk-rotated-bbbb\n"})

    async def rotated() -> bool:
        return await km.reloads("success") == 1

    await eventually(rotated, 5, "the key file change to reload")
    assert await km.keys() == {"a": "disabled", "b": "usable"}
    [reloaded] = await km.log_lines("config reloaded")
    assert reloaded["keys_changed"] == ["openai/b"]
    fake.provider.reset()
    assert (await km.chat())[0] == 200
    assert fake.provider.keys_seen() == ["sk-rotated-bbbb"]  # a stays disabled, so not even tried


async def test_a_config_naming_a_key_file_the_secret_lacks_yet_loads_once_the_secret_lands(fake, launcher, tmp_path):
    """The kubelet refreshes the ConfigMap and the Secret volumes independently, in any order."""
    configmap, secrets = AtomicVolume(tmp_path / "configmap"), AtomicVolume(tmp_path / "secret")
    secrets.write({"a": "sk-aaaaaaaaaaaa"})
    configmap.write({"config.yaml": launcher.listen(config_yaml(fake.url, {"a": secrets.path("a")}))})
    km = await launcher.start(configmap.path("config.yaml"))

    both = {"a": secrets.path("a"), "c": secrets.path("c")}
    configmap.write({"config.yaml": launcher.listen(config_yaml(fake.url, both))})
    await eventually(lambda: _equals(km.reloads("failure"), 1), 5, "the config to be rejected")
    [rejected] = await km.log_lines("config reload rejected; the previous config keeps serving")
    assert "cannot read" in str(rejected["reason"])

    secrets.write({"a": "sk-aaaaaaaaaaaa", "c": "sk-cccccccccccc"})
    await eventually(lambda: _equals(km.reloads("success"), 1), 5, "the config to load with the new key")
    assert await km.keys() == {"a": "usable", "c": "usable"}


async def test_an_invalid_config_is_rejected_with_a_log_line_and_a_metric_while_the_old_one_serves(
    fake, launcher, tmp_path
):
    volume = AtomicVolume(tmp_path / "configmap")
    good = launcher.listen(config_yaml(fake.url, {"a": "sk-aaaaaaaaaaaa"}))
    volume.write({"config.yaml": good})
    km = await launcher.start(volume.path("config.yaml"))

    volume.write({"config.yaml": good.replace("type: openai", "type: opneai")})

    async def rejected() -> bool:
        return await km.reloads("failure") == 1

    await eventually(rejected, 5, "the reload to be rejected")
    assert await km.reloads("success") == 0
    [line] = await km.log_lines("config reload rejected; the previous config keeps serving")
    assert line["level"] == "error"
    assert "providers.openai.type" in str(line["reason"])
    assert (await km.chat())[0] == 200
    assert fake.provider.keys_seen()[-1] == "sk-aaaaaaaaaaaa"

    # A config the validator does not even expect (a list where a name belongs) is rejected too,
    # and the watcher keeps watching afterwards.
    volume.write({"config.yaml": good + "routes:\n  - prefix: /\n    providers: [[openai]]\n"})
    await eventually(lambda: _equals(km.reloads("failure"), 2), 5, "the second rejection")
    volume.write({"config.yaml": good.replace("sk-aaaaaaaaaaaa", "sk-cccccccccccc")})
    await eventually(lambda: _equals(km.reloads("success"), 1), 5, "the fixed config to load")
    fake.provider.reset()
    assert (await km.chat())[0] == 200
    assert fake.provider.keys_seen() == ["sk-cccccccccccc"]
    assert km.process.returncode is None


async def test_sighup_reloads_even_when_no_file_changed(fake, launcher, tmp_path):
    km = await start_with_file(launcher, tmp_path, config_yaml(fake.url, {"a": "sk-aaaaaaaaaaaa"}))
    km.signal(signal.SIGHUP)
    await eventually(lambda: _equals(km.reloads("success"), 1), 5, "the SIGHUP reload")
    assert (await km.chat())[0] == 200


async def _equals(value: Awaitable[float], expected: float) -> bool:
    return await value == expected


# -- the watcher on its own --------------------------------------------------------------------


class Watched:
    """The paths handed to a watcher, counting its looks: it asks for them once per poll (and
    once after a reload), so "nothing happened" is asserted after a number of polls, not a time."""

    def __init__(self, paths: Callable[[], list[str]]) -> None:
        self.paths = paths
        self.looks = 0

    def __call__(self) -> list[str]:
        self.looks += 1
        return self.paths()

    async def looked(self, times: int) -> None:
        """Wait until the watcher has looked `times` more times."""
        wanted = self.looks + times
        await eventually(lambda: _true(self.looks >= wanted), 5, f"the watcher to look {times} more times")


async def run_watcher(paths: Watched, on_change: Callable[[], object]) -> asyncio.Task[None]:
    """Start a watcher and wait for its first look, which is what later changes compare with."""
    task = asyncio.create_task(watch_files(paths, on_change, interval=0.02))
    await paths.looked(1)
    return task


async def stop_watcher(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_the_watcher_sees_a_data_symlink_swap_and_nothing_else(tmp_path):
    volume = AtomicVolume(tmp_path / "configmap")
    volume.write({"config.yaml": "one"})
    calls: list[str] = []
    paths = Watched(lambda: [volume.path("config.yaml")])
    task = await run_watcher(paths, lambda: calls.append("reload"))
    await paths.looked(3)
    assert calls == []
    volume.write({"config.yaml": "two"})
    await eventually(lambda: _true(calls == ["reload"]), 5, "one reload")
    volume.write({"config.yaml": "two"})  # same content, new directory: it resolves elsewhere
    await eventually(lambda: _true(len(calls) == 2), 5, "a second reload")
    await paths.looked(3)
    assert len(calls) == 2
    await stop_watcher(task)


async def test_a_change_landing_while_a_reload_runs_triggers_another_reload(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("one")
    calls: list[str] = []

    def reload() -> None:
        calls.append(config.read_text())
        if len(calls) == 1:
            config.write_text("three")  # the next update lands during the reload

    task = await run_watcher(Watched(lambda: [str(config)]), reload)
    config.write_text("two")
    await eventually(lambda: _true(len(calls) == 2), 5, "the second reload")
    assert calls == ["two", "three"]
    await stop_watcher(task)


async def test_the_watcher_outlives_a_reload_that_raises_and_follows_new_key_files(tmp_path):
    config, key = tmp_path / "config.yaml", tmp_path / "key"
    config.write_text("one")
    named = [str(config)]
    calls: list[int] = []

    def reload() -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("boom")
        named.append(str(key))  # the new config names a key file

    paths = Watched(lambda: list(named))
    task = await run_watcher(paths, reload)
    config.write_text("two")
    await eventually(lambda: _true(len(calls) == 1), 5, "the failing reload")
    config.write_text("three")
    await eventually(lambda: _true(len(calls) == 2), 5, "the next reload")
    await paths.looked(3)
    assert len(calls) == 2  # the key file is watched from now on, not taken for a change
    key.write_text("sk-new")
    await eventually(lambda: _true(len(calls) == 3), 5, "the key file reload")
    assert not task.done()
    await stop_watcher(task)


async def _true(value: bool) -> bool:
    return value
