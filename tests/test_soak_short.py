"""The soak in its shortened CI form: a few thousand requests through keymux as a real
subprocess, every failure class, reloads twice a second. The full soak is
`python -m soak.soak` (200,000 requests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_short_soak_loses_nothing_and_leaves_nothing_behind(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "soak.soak",
            "--requests",
            "3000",
            "--reload-every",
            "0.5",
            "--max-seconds",
            "60",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.exists(), run.stdout + run.stderr
    report = json.loads(out.read_text())
    assert report["failures"] == [], run.stdout
    assert report["completed"] == 3000
    assert report["lost"] == 0
    # Every class of the mix ran, so the figures above mean something.
    assert all(sum(counts.values()) > 0 for counts in report["by_case"].values()), report["by_case"]
    assert report["reloads_sent"] >= 2
    assert report["end"]["inflight"] == report["end"]["app_connections"] == report["end"]["upstream_in_use"] == 0
    assert report["end"]["tasks"] == report["baseline"]["tasks"]
    assert report["rss_growth"] < 0.10
    assert report["attempts_counted"] == report["upstream_requests"]
    assert run.returncode == 0, run.stdout
