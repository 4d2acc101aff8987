"""Config errors name the field path and the fix; valid configs load into frozen dataclasses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


def load(text: str, env: dict[str, str] | None = None, files: dict[str, str] | None = None):
    def read(path: str) -> str:
        if files and path in files:
            return files[path]
        raise FileNotFoundError(2, "No such file or directory")

    return load_config(text, env or {}, read)


BASE = """
providers:
  openai:
    type: openai
    base_url: https://api.openai.com
    keys:
      - name: primary
        key: ${OPENAI_KEY_PRIMARY}
      - name: batch
        key: ${OPENAI_KEY_BATCH:-}
        models: [gpt-4o-mini]
"""


def error_of(text: str, env=None, files=None) -> str:
    with pytest.raises(ConfigError) as caught:
        load(text, env, files)
    return str(caught.value)


def test_missing_variable_names_the_field_and_the_variable():
    assert error_of(BASE) == "providers.openai.keys[0].key: environment variable OPENAI_KEY_PRIMARY is not set"


def test_optional_key_with_empty_default_is_skipped_with_a_warning():
    config = load(BASE, {"OPENAI_KEY_PRIMARY": "sk-primary-123"})
    assert [k.name for k in config.providers["openai"].keys] == ["primary"]
    assert config.warnings == ("providers.openai.keys[1]: skipped, its ${VAR:-} is empty",)


def test_keys_from_env_files_and_allow_lists():
    text = """
providers:
  openai:
    base_url: https://api.openai.com
    keys:
      - name: mounted
        key_file: /secrets/openai-3
        models: [gpt-4o]
    keys_from_env: OPENAI_API_KEYS
"""
    config = load(text, {"OPENAI_API_KEYS": "sk-one, sk-two"}, {"/secrets/openai-3": "sk-three\n"})
    keys = config.providers["openai"].keys
    assert [(k.name, k.secret, k.models) for k in keys] == [
        ("mounted", "sk-three", frozenset({"gpt-4o"})),
        ("openai-2", "sk-one", None),
        ("openai-3", "sk-two", None),
    ]
    assert config.providers["openai"].key_files == ("/secrets/openai-3",)


def test_single_provider_without_routes_serves_the_root():
    config = load(BASE, {"OPENAI_KEY_PRIMARY": "sk-x"})
    assert [(r.prefix, r.providers) for r in config.routes] == [("", ("openai",))]


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        (BASE.replace("${OPENAI_KEY_PRIMARY}", '""'), {}, "providers.openai.keys[0].key: is empty"),
        (
            BASE.replace("name: batch", "name: primary").replace("${OPENAI_KEY_BATCH:-}", "sk-2"),
            {"OPENAI_KEY_PRIMARY": "sk-1"},
            "providers.openai.keys: duplicate key name 'primary'",
        ),
        (
            BASE + "routes:\n  - prefix: /openai\n    providers: [openai, openai-backup]\n",
            {"OPENAI_KEY_PRIMARY": "k"},
            "routes[0].providers[1]: unknown provider 'openai-backup' (known: openai)",
        ),
        (
            BASE + "retries: {}\n",
            {"OPENAI_KEY_PRIMARY": "k"},
            "retries: unknown field (expected one of: listen, admin_listen, log_level, providers, routes, health, retry, timeouts, limits, metrics, shutdown, shared, security)",
        ),
        (
            BASE.replace("type: openai", "type: openia"),
            {"OPENAI_KEY_PRIMARY": "k"},
            "providers.openai.type: 'openia' is not one of: openai, openai-compatible, anthropic, gemini, azure",
        ),
        (
            BASE.replace("models: [gpt-4o-mini]", "modles: [gpt-4o-mini]"),
            {"OPENAI_KEY_PRIMARY": "k"},
            "providers.openai.keys[1].modles: unknown field (expected one of: name, key, key_file, models, headers, weight, rpm, tpm)",
        ),
        (
            BASE + "health:\n  failure_threshold: 0\n",
            {"OPENAI_KEY_PRIMARY": "k"},
            "health.failure_threshold: must be a whole number of at least 1",
        ),
        (
            BASE + "timeouts:\n  connect: soon\n",
            {"OPENAI_KEY_PRIMARY": "k"},
            "timeouts.connect: 'soon' is not a duration (seconds, or like 500ms, 30s, 10m, 1h)",
        ),
        (
            BASE.replace("https://api.openai.com", "ftp://x"),
            {"OPENAI_KEY_PRIMARY": "k"},
            "providers.openai.base_url: 'ftp://x' is not an http(s) URL",
        ),
        (BASE + "listen: localhost\n", {"OPENAI_KEY_PRIMARY": "k"}, "listen: 'localhost' is not HOST:PORT"),
        ("providers: {}\n", {}, "providers: at least one provider is required"),
        ("providers: [\n", {}, "not valid YAML at line 2, column 1"),
        (
            BASE.replace("key: ${OPENAI_KEY_PRIMARY}", "key_file: /nope"),
            {},
            "providers.openai.keys[0].key_file: cannot read /nope: No such file or directory",
        ),
        (
            BASE,
            {"OPENAI_KEY_PRIMARY": "sk has spaces"},
            "providers.openai.keys[0].key: contains whitespace or control characters",
        ),
    ],
)
def test_errors_name_the_field(text, env, message):
    assert error_of(text, env) == message


def test_a_route_listing_something_other_than_names_is_an_error():
    text = BASE + "routes:\n  - prefix: /a\n    providers: [[openai]]\n"
    assert (
        error_of(text, {"OPENAI_KEY_PRIMARY": "k"}) == "routes[0].providers: must be a non-empty list of provider names"
    )


def test_drain_delay_may_be_zero_but_cooldowns_may_not():
    config = load(BASE + "shutdown:\n  drain_delay: 0\n", {"OPENAI_KEY_PRIMARY": "k"})
    assert config.shutdown.drain_delay == 0
    assert error_of(BASE + "health:\n  failure_cooldown: 0\n", {"OPENAI_KEY_PRIMARY": "k"}) == (
        "health.failure_cooldown: must be a positive number of seconds"
    )


def test_durations_accept_units():
    config = load(
        BASE + "health:\n  credential_cooldown: 10m\n  failure_cooldown: 500ms\n", {"OPENAI_KEY_PRIMARY": "k"}
    )
    assert (config.health.credential_cooldown, config.health.failure_cooldown) == (600.0, 0.5)


def test_error_messages_never_quote_a_secret():
    message = error_of(
        BASE.replace("https://api.openai.com", "not a url"), {"OPENAI_KEY_PRIMARY": "sk-very-secret-value"}
    )
    assert "sk-very-secret-value" not in message


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, timeout=30, cwd=ROOT, env=env
    )


def test_check_config_accepts_the_example():
    result = cli("check-config", "config.example.yaml", env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("config.example.yaml: ok")


def test_check_config_exits_non_zero_naming_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BASE)
    result = cli("check-config", str(path), env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == f"{path}: error: providers.openai.keys[0].key: environment variable OPENAI_KEY_PRIMARY is not set"
    )


def test_check_config_strict_fails_on_warnings(tmp_path):
    path = tmp_path / "warn.yaml"
    path.write_text(BASE)
    result = cli("check-config", "--strict", str(path), env={"PATH": "/usr/bin:/bin", "OPENAI_KEY_PRIMARY": "sk-1"})
    assert result.returncode == 1
    assert "warning: providers.openai.keys[1]: skipped" in result.stderr
