"""The servers under test as subprocesses: spawn, wait until ready, measure, always clean up.

CPU time and memory are read from /proc (Linux), so no extra dependency is needed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"  # loopback only, always
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1


class BenchError(RuntimeError):
    """The benchmark could not run as intended (a server did not start, a load failed)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def raise_fd_limit() -> None:
    """500 streams through a proxy hold 1000+ sockets; children inherit the raised soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


try:  # looked up here, not in the forked child
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None


def _die_with_parent() -> None:
    """In the child before exec: if the benchmark is killed outright, its servers get SIGTERM."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


def http_status(port: int, path: str, timeout: float = 1.0) -> int | None:
    """The status of one GET on a fresh connection, or None when nothing answers."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
            head = sock.recv(32)
    except OSError:
        return None
    parts = head.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


@dataclass
class Server:
    name: str
    popen: subprocess.Popen[bytes]
    port: int  # where the load goes
    ready_port: int  # where readiness is polled
    ready_path: str
    log: Path
    spawned: float  # time.perf_counter() just before the spawn
    ready_after: float | None = None  # seconds from spawn to the first 200 on ready_path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def cpu_seconds(self) -> float:
        """User plus system CPU time so far."""
        stat = self._proc("stat")
        fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime

    def rss_bytes(self) -> int:
        return self._status_kb("VmRSS") * 1024

    def peak_rss_bytes(self) -> int:
        """The high-water mark of resident memory since the process started."""
        return self._status_kb("VmHWM") * 1024

    def _status_kb(self, field: str) -> int:
        for line in self._proc("status").splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise BenchError(f"{self.name}: no {field} in /proc/{self.pid}/status")

    def _proc(self, name: str) -> str:
        try:
            if self.popen.poll() is None:
                return Path(f"/proc/{self.pid}/{name}").read_text()
        except OSError:
            pass
        raise BenchError(f"{self.name} exited with {self.popen.poll()}:\n{self.log_tail()}")

    def log_count(self, marker: bytes) -> int:
        """How many times `marker` occurs in everything the server wrote so far."""
        try:
            return self.log.read_bytes().count(marker)
        except OSError:
            return 0

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 15.0, poll: float = 0.002) -> float:
        """Poll every `poll` seconds until ready_path answers 200; the seconds since spawn."""
        deadline = self.spawned + timeout
        while time.perf_counter() < deadline:
            if self.popen.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}")
            if http_status(self.ready_port, self.ready_path) == 200:
                self.ready_after = time.perf_counter() - self.spawned
                return self.ready_after
            time.sleep(poll)
        raise BenchError(f"{self.name} was not ready within {timeout:.0f} s:\n{self.log_tail()}")


class Fleet:
    """Every process the benchmark started. `stop()` ends them all, whatever went wrong."""

    def __init__(self) -> None:
        self.servers: list[Server] = []
        self._tmp = tempfile.TemporaryDirectory(prefix="keymux-bench-")
        self.dir = Path(self._tmp.name)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def spawn(self, name: str, args: list[str], port: int, ready_port: int, ready_path: str) -> Server:
        log = self.dir / f"{name}-{len(self.servers)}.log"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        with log.open("wb") as out:
            spawned = time.perf_counter()
            popen = subprocess.Popen(
                [sys.executable, *args],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C reaches the benchmark, which then stops them
                preexec_fn=_die_with_parent,
            )
        server = Server(name, popen, port, ready_port, ready_path, log, spawned)
        self.servers.append(server)
        return server

    def write(self, name: str, text: str) -> Path:
        path = self.dir / name
        path.write_text(text)
        return path

    def stop(self, server: Server, grace: float = 5.0) -> None:
        popen = server.popen
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    popen.kill()
                popen.wait()
        if server in self.servers:
            self.servers.remove(server)

    def close(self) -> None:
        # Signal every server first, so their graceful stops overlap, then wait for each.
        for server in self.servers:
            if server.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    server.popen.send_signal(signal.SIGTERM)
        for server in list(self.servers):
            self.stop(server)
        self._tmp.cleanup()
