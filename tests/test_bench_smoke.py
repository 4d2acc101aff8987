"""The benchmark runs end to end in its quick mode and prints a row for every scenario.

A smoke test of the tool, not of performance: no figure is asserted, since timings on a shared
CI machine mean nothing. The quick run takes about 15 s (it starts the fake provider, the bare
pass-through and keymux as real subprocesses on loopback).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the benchmark reads /proc (Linux)")


def test_quick_benchmark_prints_every_scenario(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(report)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    scenarios = {int(m.group(1)) for line in lines if (m := re.match(r"(\d) {2}\S", line))}
    assert scenarios == {1, 2, 3, 4, 5, 6, 7}, done.stdout
    for column in ("direct", "bare", "keymux", "keymux/bare", "target", "result"):
        assert column in lines[1]
    assert "failed requests" not in done.stdout  # every request through each proxy got a 2xx

    figures = json.loads(report.read_text())
    assert {row["scenario"] for row in figures["rows"]} == {1, 2, 3, 4, 5, 6, 7}
    assert figures["meta"]["quick"] is True
    assert all(row["passed"] in (True, False, None) for row in figures["rows"])
