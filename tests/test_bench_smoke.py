"""The benchmark runs end to end in its quick mode, and its figures agree with each other.

A test of the tool, not of performance: no timing and no target's pass or fail is asserted,
since timings on a shared CI machine mean nothing. What is asserted holds on any machine: every
request got a 2xx, every ratio is the quotient of the figures it stands next to, and keymux
really ran the default config (it wrote an access line per request) while keymux-quiet wrote
none. The quick run takes about 20 s (it starts the fake provider, the bare pass-through and
two keymux processes as real subprocesses on loopback), so it runs once for the whole module.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.run import QUICK

REPO = Path(__file__).resolve().parent.parent
TARGETS = ("direct", "bare", "keymux", "keymux-quiet")

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the benchmark reads /proc (Linux)")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    """(the printed table, the --json figures) of one quick run."""
    report = tmp_path_factory.mktemp("bench") / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(report)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, json.loads(report.read_text())


def row(figures: dict[str, Any], scenario: int, figure: str) -> dict[str, Any]:
    found = [r for r in figures["rows"] if r["scenario"] == scenario and r["figure"] == figure]
    assert len(found) == 1, [r["figure"] for r in figures["rows"]]
    return found[0]


def test_the_table_has_a_row_for_every_scenario_and_a_column_for_every_target(
    quick_run: tuple[str, dict[str, Any]],
) -> None:
    table, figures = quick_run
    lines = table.splitlines()
    scenarios = {int(m.group(1)) for line in lines if (m := re.match(r"(\d) {2}\S", line))}
    assert scenarios == {1, 2, 3, 4, 5, 6, 7}, table
    for column in (*TARGETS, "keymux/base", "target", "result"):
        assert column in lines[1].split()
    assert {r["scenario"] for r in figures["rows"]} == {1, 2, 3, 4, 5, 6, 7}
    assert figures["meta"]["quick"] is True
    assert all(r["passed"] in (True, False, None) for r in figures["rows"])


def test_every_request_got_a_2xx(quick_run: tuple[str, dict[str, Any]]) -> None:
    table, figures = quick_run
    assert "failed requests" not in table
    raw = figures["raw"]
    for scenario in (1, 2, 3, 4, 7):
        for name, result in raw[f"scenario {scenario}"].items():
            if isinstance(result, dict):
                assert result["requests"] > 0, (scenario, name, result)
                assert result["errors"] == 0, (scenario, name, result)
    assert set(raw["scenario 2"]) >= set(TARGETS)


def test_every_stream_carried_every_event(quick_run: tuple[str, dict[str, Any]]) -> None:
    _, figures = quick_run
    for name in ("direct", "bare", "keymux"):
        result = figures["raw"]["scenario 4"][name]
        assert result["requests"] == QUICK.streams * QUICK.rounds
        assert result["events"] == result["requests"] * (QUICK.events + 2)  # the events, the finish chunk and [DONE]


def test_every_ratio_is_keymux_over_its_base(quick_run: tuple[str, dict[str, Any]]) -> None:
    _, figures = quick_run
    with_ratio = [r for r in figures["rows"] if r["ratio"] is not None]
    assert len(with_ratio) >= 5
    for r in with_ratio:
        expected = r["values"]["keymux"] / r["values"][r["base"]]
        assert math.isclose(r["ratio"], expected, rel_tol=1e-9), r
        if r["target"]:
            assert f"× {r['base']}" in r["target"], r


def test_the_access_log_row_compares_keymux_with_keymux_quiet(quick_run: tuple[str, dict[str, Any]]) -> None:
    _, figures = quick_run
    access = row(figures, 2, f"requests/s, {QUICK.connections} connections, access log on vs off")
    throughput = row(figures, 2, f"requests/s, {QUICK.connections} connections")  # the same requests/s
    assert access["base"] == "keymux-quiet"
    assert access["values"] == {name: throughput["values"][name] for name in ("keymux", "keymux-quiet")}
    assert math.isclose(access["ratio"], access["values"]["keymux"] / access["values"]["keymux-quiet"])
    for name in ("keymux", "keymux-quiet"):
        assert access["values"][name] == pytest.approx(figures["raw"]["scenario 2"][name]["rps"], abs=0.06)
    assert access["target"].startswith("≥ 0.95 ×")


def test_keymux_runs_the_default_config_and_logs_every_request(quick_run: tuple[str, dict[str, Any]]) -> None:
    _, figures = quick_run
    raw = figures["raw"]
    assert "log_level" not in raw["configs"]["keymux"]
    assert "log_level: warning" in raw["configs"]["keymux-quiet"]
    for scenario in (1, 2):
        keymux, quiet = raw[f"scenario {scenario}"]["keymux"], raw[f"scenario {scenario}"]["keymux-quiet"]
        # At least one line per measured request (unmeasured ones may add a few): false if keymux ran quiet.
        assert keymux["access_lines"] >= keymux["requests"] > 0, keymux
        assert quiet["access_lines"] == 0, quiet
    streams = raw["scenario 4"]["keymux"]
    assert streams["access_lines"] >= QUICK.streams
