"""The dashboard and the docs agree with what keymux exports: every metric, label and legend in the
Grafana dashboard's PromQL, and every row of the metrics table in the docs, is checked against a
real scrape of a running keymux that has served traffic touching every metric family."""

from __future__ import annotations

import datetime
import json
import re
import shutil
import subprocess
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from sidecar.outcome import Outcome
from tests.conftest import FakeServer, StartKeymux

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "keymux-dashboard.json"

A = "sk-test-aaaaaaaaaaaaaaaaaaaa1111"
B = "sk-test-bbbbbbbbbbbbbbbbbbbb2222"
C = "sk-test-cccccccccccccccccccc3333"
CLAUDE = "sk-ant-test-dddddddddddddddd4444"

# -- reading PromQL --------------------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_RANGE = re.compile(r"\[[^\]]*\]")
_VARIABLE = re.compile(r"\$(?:\{[^}]*\}|\w+)")
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENTIFIER = re.compile(r"(?<![\w.:])[A-Za-z_:][\w:]*")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan", "group_left", "group_right"})
_LEGEND_LABEL = re.compile(r"\{\{\s*([A-Za-z_]\w*)\s*\}\}")
_LABEL_VALUES = re.compile(r"^label_values\((.+),\s*([A-Za-z_]\w*)\s*\)$")


@dataclass
class Query:
    """What one PromQL expression refers to."""

    metrics: set[str] = field(default_factory=set)
    matcher_labels: dict[str, set[str]] = field(default_factory=dict)  # metric -> labels it filters on
    grouping_labels: set[str] = field(default_factory=set)
    anonymous_selector: bool = False  # {__name__=~...}: names no metric the test could check


def parse_promql(expr: str) -> Query:
    query = Query()
    text = _STRING.sub('""', expr)
    text = _RANGE.sub("", text)
    text = _VARIABLE.sub("0", text)
    for match in _SELECTOR.finditer(text):
        metric, matchers = match.group(1), match.group(2)
        if metric is None:
            query.anonymous_selector = True
            continue
        query.matcher_labels.setdefault(metric, set()).update(_MATCHER_LABEL.findall(matchers))
    text = _SELECTOR.sub(lambda m: f" {m.group(1) or ''} ", text)
    for match in _GROUPING.finditer(text):
        query.grouping_labels.update(label.strip() for label in match.group(1).split(",") if label.strip())
    text = _GROUPING.sub(" ", text)
    for match in _IDENTIFIER.finditer(text):
        name = match.group(0)
        called = text[match.end() :].lstrip().startswith("(")
        if not called and name not in _KEYWORDS:
            query.metrics.add(name)
    return query


def test_the_promql_reader_finds_metrics_labels_and_groupings() -> None:
    query = parse_promql(
        'histogram_quantile(0.95, sum by (provider, le) (rate(keymux_upstream_ttfb_seconds_bucket{model=~"$model",'
        ' provider!="a}b"}[$__rate_interval]))) / on (provider) group_left sum(keymux_inflight_requests) or vector(1e3)'
    )
    assert query.metrics == {"keymux_upstream_ttfb_seconds_bucket", "keymux_inflight_requests"}
    assert query.matcher_labels == {"keymux_upstream_ttfb_seconds_bucket": {"model", "provider"}}
    assert query.grouping_labels == {"provider", "le"}
    assert parse_promql('count({__name__=~"keymux_.*"})').anonymous_selector


# -- the dashboard ---------------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


@dataclass(frozen=True)
class Expression:
    where: str  # panel title or variable name, for failure messages
    expr: str
    legend: str = ""


def expressions(dashboard: dict[str, Any]) -> list[Expression]:
    found = []
    for panel in all_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            found.append(Expression(panel["title"], target["expr"], target.get("legendFormat", "")))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable["type"] != "query":
            continue
        raw = variable["query"]
        raw = raw["query"] if isinstance(raw, dict) else raw
        match = _LABEL_VALUES.match(raw.strip())
        assert match is not None, f"variable {variable['name']}: expected label_values(metric, label), got {raw}"
        metric, label = match.groups()
        found.append(Expression(f"${variable['name']}", f"group by ({label}) ({metric})"))
    return found


# -- what keymux exports ---------------------------------------------------------------------------


@dataclass
class Scrape:
    samples: dict[str, set[str]]  # sample name (keymux_x_total, keymux_y_bucket, …) -> label names
    families: dict[str, set[str]]  # the name the docs use (keymux_x_total, keymux_y) -> label names


@pytest.fixture
async def scrape(fake: FakeServer, keymux: StartKeymux) -> Scrape:
    """A real scrape after traffic that touches every metric family."""
    fake.provider.revoked.add(A)
    fake.provider.script(key=B, model="gpt-4o", status=500, times=1)
    namespace = f"dashboard-{uuid.uuid4().hex[:12]}"
    config = f"""
        providers:
          primary:
            type: openai
            base_url: {fake.url}
            keys:
              - name: p1
                key: {A}
              - name: p2
                key: {B}
          backup:
            type: openai
            base_url: {fake.url}
            keys:
              - name: b1
                key: {C}
          anthropic:
            type: anthropic
            base_url: {fake.url}
            keys:
              - name: claude
                key: {CLAUDE}
        routes:
          - prefix: /llm
            providers: [primary, backup]
          - prefix: /anthropic
            providers: [anthropic]
        shared:  # the machine's Redis, a namespace of this run's own: the shared-store series too
          redis_url: redis://127.0.0.1:6379/0
          namespace: {namespace}
        """
    km = await keymux(config)
    chat = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "stream_options": {"include_usage": True}}
    for model in ("gpt-4o-mini", "gpt-4o"):  # p1 revoked: a key retry; then p2 fails: a fallback
        async with km.session.post(km.url + "/llm/v1/chat/completions", json={"model": model, **chat}) as r:
            assert r.status == 200
            await r.read()
    message = {"model": "claude-3-5-haiku", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    # The only Anthropic key says it has no request left for a moment: the second request waits for it.
    reset = datetime.datetime.fromtimestamp(time.time() + 0.3, datetime.UTC).isoformat()
    limits = {"anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-requests-remaining": "0"}
    fake.provider.script(key=CLAUDE, headers={**limits, "anthropic-ratelimit-requests-reset": reset}, times=1)
    for _ in range(2):
        async with km.session.post(km.url + "/anthropic/v1/messages", json=message) as r:
            assert r.status == 200
            await r.read()
    assert km.sidecar.reload("listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n" + textwrap.dedent(config))

    async with km.session.get(km.admin + "/metrics") as r:
        text = await r.text()
    result = Scrape({}, {})
    for family in text_string_to_metric_families(text):
        assert family.samples, f"the traffic left {family.name} without a sample; extend it"
        name = family.name + "_total" if family.type == "counter" else family.name
        labels = result.families.setdefault(name, set())
        for sample in family.samples:
            result.samples.setdefault(sample.name, set()).update(sample.labels)
            labels.update(set(sample.labels) - {"le"})
    store = redis.Redis(host="127.0.0.1", port=6379)
    leftovers = list(store.scan_iter(match=f"{namespace}:*"))
    if leftovers:
        store.delete(*leftovers)
    store.close()
    return result


@pytest.fixture
def exported(scrape: Scrape) -> dict[str, set[str]]:
    return scrape.samples


# -- the checks ------------------------------------------------------------------------------------


async def test_every_dashboard_expression_names_only_metrics_keymux_exports(exported: dict[str, set[str]]) -> None:
    problems = []
    for e in expressions(load_dashboard()):
        query = parse_promql(e.expr)
        if query.anonymous_selector:
            problems.append(f"{e.where}: selects by __name__ instead of naming a metric: {e.expr}")
        if not query.metrics:
            problems.append(f"{e.where}: names no metric: {e.expr}")
        for metric in sorted(query.metrics - set(exported)):
            problems.append(f"{e.where}: {metric} is not exported (keymux exports {sorted(exported)})")
    assert problems == []


async def test_every_label_the_dashboard_filters_groups_or_shows_exists(exported: dict[str, set[str]]) -> None:
    problems = []
    for e in expressions(load_dashboard()):
        query = parse_promql(e.expr)
        available = set().union(*(exported.get(metric, set()) for metric in query.metrics))
        for metric, used in query.matcher_labels.items():
            for label in sorted(used - exported.get(metric, set())):
                problems.append(f"{e.where}: {metric} has no label {label!r}")
        for label in sorted(query.grouping_labels - available):
            problems.append(f"{e.where}: groups by {label!r}, a label none of {sorted(query.metrics)} has")
        # After an aggregation only its grouping labels remain to show in a legend.
        shown = (query.grouping_labels - {"le"}) if query.grouping_labels else available
        for label in sorted(set(_LEGEND_LABEL.findall(e.legend)) - shown):
            problems.append(f"{e.where}: the legend shows {{{{{label}}}}}, absent from the result of {e.expr}")
    assert problems == []


def test_the_dashboard_shows_what_the_issue_asks_for() -> None:
    """Requests by outcome, key state per key and model, retries and fallbacks, TTFB and overhead
    quantiles, tokens per key."""
    queries = [parse_promql(e.expr) for e in expressions(load_dashboard())]
    exprs = [e.expr for e in expressions(load_dashboard())]

    def grouped(metric: str, *labels: str) -> bool:
        return any(metric in q.metrics and set(labels) <= q.grouping_labels for q in queries)

    assert grouped("keymux_requests_total", "outcome")
    assert grouped("keymux_key_state", "provider", "key", "model")
    assert grouped("keymux_key_retries_total", "reason")
    assert grouped("keymux_provider_fallbacks_total", "from_provider", "to_provider")
    assert grouped("keymux_tokens_total", "key")
    for histogram in ("keymux_upstream_ttfb_seconds", "keymux_overhead_seconds"):
        quantiles = [x for x in exprs if x.startswith("histogram_quantile(") and f"{histogram}_bucket" in x]
        assert len(quantiles) >= 2, f"{histogram}: expected several quantiles"
        assert all(re.search(r"by \([^)]*\ble\b", x) for x in quantiles), "quantiles must keep 'le'"


def test_the_dashboard_is_well_formed_grafana_json() -> None:
    dashboard = load_dashboard()
    panels = list(all_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dashboard["uid"] == "keymux" and isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in panels:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        refs = [target["refId"] for target in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), f"{panel['title']}: refIds must be unique"
        for target in panel.get("targets", []):
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        if panel["type"] != "row":
            assert panel.get("targets"), f"{panel['title']}: no query"
            assert panel.get("description"), f"{panel['title']}: say what the panel shows"


_GRAFANA_VALUES = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m"}


def test_every_dashboard_expression_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each expression as a recording rule (Grafana's variables filled in)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (.ci/promtool-check.sh installs Debian's prometheus package)")
    rules = []
    for i, e in enumerate(expressions(load_dashboard())):
        expr = e.expr
        for variable, value in _GRAFANA_VALUES.items():
            expr = expr.replace(variable, value)
        expr = _VARIABLE.sub(".*", expr)  # $provider, $model: regex matchers
        rules.append({"record": f"dashboard:expr_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# -- the docs --------------------------------------------------------------------------------------


def metrics_docs() -> str:
    """The README's metrics section: the user's contract."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "| `keymux_upstream_attempts_total` |" in text, "README.md has no metrics table"
    return text


async def test_the_docs_list_every_metric_with_its_labels_and_every_outcome(scrape: Scrape) -> None:
    docs = metrics_docs()
    rows = {}
    for line in docs.splitlines():
        if match := re.match(r"^\| `(keymux_\w+)` \|([^|]*)\|([^|]*)\|", line):
            rows[match.group(1)] = set(re.findall(r"`(\w+)`", match.group(3)))
    assert rows == scrape.families
    for outcome in Outcome:
        assert f"| `{outcome.value}` |" in docs, f"outcome {outcome.value} is not documented"
