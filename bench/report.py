"""The one table: each figure for every target, keymux's ratio to a base (bare unless a row
names another) and the target."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# keymux-quiet: keymux with log_level: warning, measured only where the access log's cost shows.
TARGETS = ("direct", "bare", "keymux", "keymux-quiet")


@dataclass
class Row:
    scenario: int  # 1..7, the numbering of issue 5
    figure: str
    values: dict[str, float | None]  # by target name
    target: str = ""  # what must hold, in words
    passed: bool | None = None  # None: no target for this figure
    show_ratio: bool = True
    digits: int | None = None  # decimals; None picks by magnitude
    base: str = "bare"  # the target keymux is compared with

    @property
    def ratio(self) -> float | None:
        """keymux / base, when both are there and the base is positive."""
        if not self.show_ratio:
            return None
        base, keymux = self.values.get(self.base), self.values.get("keymux")
        if base is None or keymux is None or base <= 0:
            return None
        return keymux / base


@dataclass
class Report:
    meta: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def ratio_target(self, row: Row, limit: float, at_least: bool = False) -> Row:
        """Mark a row against 'keymux/base ≤ limit' (or ≥ with at_least)."""
        sign = "≥" if at_least else "≤"
        row.target = f"{sign} {limit:g} × {row.base}"
        ratio = row.ratio
        row.passed = None if ratio is None else (ratio >= limit if at_least else ratio <= limit)
        if ratio is None:
            row.target += " (n/a)"
        return self.add(row)

    def to_json(self) -> dict[str, Any]:
        rows = []
        for row in self.rows:
            data = asdict(row)
            data["ratio"] = row.ratio
            del data["digits"], data["show_ratio"]
            rows.append(data)
        return {"meta": self.meta, "rows": rows, "notes": self.notes, "raw": self.raw}

    def table(self) -> str:
        shown = [t for t in TARGETS if any(t in row.values for row in self.rows)]
        header = ("#", "figure", *shown, "keymux/base", "target", "result")
        body = [
            (
                str(row.scenario),
                row.figure,
                *(_number(row.values.get(t), row.digits) for t in shown),
                "—" if row.ratio is None else f"{row.ratio:.2f}",
                row.target,
                {True: "PASS", False: "FAIL", None: ""}[row.passed],
            )
            for row in self.rows
        ]
        widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]
        right = set(range(2, 3 + len(shown)))  # numbers are right-aligned

        def render(line: tuple[str, ...]) -> str:
            cells = [
                cell.rjust(w) if i in right else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(line, widths, strict=True))
            ]
            return "  ".join(cells).rstrip()

        rule = "  ".join("-" * w for w in widths)
        meta = self.meta
        title = (
            f"keymux benchmark · {meta['date']} · nproc {meta['nproc']} · {meta['machine']} · "
            f"Python {meta['python']} · load: {meta['load']}{' · QUICK' if meta.get('quick') else ''}"
        )
        lines = [title, render(header), rule, *(render(line) for line in body), rule]
        if "keymux-quiet" in shown:
            lines += [
                "keymux: the default config, access log on (one JSON line per request to its log); "
                "keymux-quiet: the same with log_level: warning",
                "keymux/base: keymux ÷ bare, or ÷ the base its target names",
            ]
        passed = [r.passed for r in self.rows if r.passed is not None]
        lines.append(f"targets: {sum(passed)} of {len(passed)} pass")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _number(value: float | None, digits: int | None) -> str:
    if value is None:
        return "—"
    if digits is None:
        size = abs(value)
        digits = 0 if size >= 1000 else 1 if size >= 100 else 2 if size >= 1 else 3
    return f"{value:,.{digits}f}"
