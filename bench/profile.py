"""Optional: py-spy samples of keymux under load, summarised as the top frames by CPU share."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def start(pid: int, output: Path) -> subprocess.Popen[bytes]:
    """Sample `pid` into a collapsed-stack file, without pausing it, until `stop()`."""
    path = py_spy()
    if path is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    command = [path, "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
               "--output", str(output), "--nonblocking"]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop(spy: subprocess.Popen[bytes]) -> str:
    """End the sampling (py-spy writes its file on SIGINT); its stderr, for errors."""
    if spy.poll() is None:
        spy.send_signal(signal.SIGINT)
    try:
        _, err = spy.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        spy.kill()
        _, err = spy.communicate()
    return err.decode(errors="replace")


_ENTRY_POINTS = ("sidecar/cli.py", "sidecar/__main__.py", "bench/passthrough.py:main")


def summarize(collapsed: Path, top: int = 20) -> str:
    """Self and inclusive shares of the sampled CPU time, by function (file:function)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        names = [_name(frame) for frame in stack.split(";")]
        own[names[-1]] += count
        for name in set(names):
            inclusive[name] += count
    if total == 0:
        return "py-spy: no samples (was the process busy?)"
    lines = [f"py-spy: {total} samples on CPU", "  self %  incl %  function"]
    for name, count in own.most_common(top):
        lines.append(f"  {100 * count / total:6.1f}  {100 * inclusive[name] / total:6.1f}  {name}")
    lines.append("  heaviest frames of the proxy's own code (inclusive %):")
    ours = [
        (n, c)
        for n, c in inclusive.most_common()
        if n.startswith(("sidecar/", "bench/")) and not n.startswith(_ENTRY_POINTS)
    ][:top]
    lines += [f"          {100 * c / total:6.1f}  {n}" for n, c in ours]
    return "\n".join(lines)


def _name(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    file = match.group("file")
    for marker in ("/site-packages/", "/lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    else:
        for package in ("sidecar", "bench"):
            if f"/{package}/" in file:
                file = f"{package}/" + file.rsplit(f"/{package}/", 1)[1]
    return f"{file}:{match.group('func')}"
