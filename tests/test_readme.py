"""The README is the user's contract: its commands and tables must match the code."""

from __future__ import annotations

import re
from pathlib import Path

from sidecar.health import HealthSettings
from sidecar.outcome import Outcome

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def fenced_commands(section: str) -> list[str]:
    body = README.split(section, 1)[1].split("\n## ", 1)[0]
    return [
        line.strip()
        for block in re.findall(r"```(?:sh|bash)\n(.*?)```", body, re.S)
        for line in block.splitlines()
        if line.strip()
    ]


def test_ci_runs_the_readme_test_command():
    (test_command,) = [c for c in fenced_commands("## Quick start") if "pytest" in c]
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_failure_table_names_every_outcome():
    for outcome in Outcome:
        assert f"`{outcome.value}`" in README, outcome


def test_health_defaults_in_the_readme_match_the_code():
    defaults = HealthSettings()
    for field in defaults.__dataclass_fields__:
        assert f"`health.{field}`" in README, field
