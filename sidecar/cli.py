"""The command line: run the sidecar, check a config, or run the demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from sidecar import __version__
from sidecar.config import Config, ConfigError
from sidecar.server import Sidecar, configure_logging, load_file, read_text, serve
from sidecar.watch import watch_files

DEFAULT_CONFIG = "/etc/keymux/config.yaml"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return check_config(args.file, args.strict)
    if args.command == "demo":
        from sidecar.demo import run_demo

        return _run(run_demo(args.port, args.admin_port, args.exit_after_showing))
    return run(args.config or os.environ.get("KEYMUX_CONFIG", DEFAULT_CONFIG))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keymux", description="LLM API key rotation sidecar")
    parser.add_argument("--version", action="version", version=f"keymux {__version__}")
    parser.add_argument("--config", help=f"config file (default: $KEYMUX_CONFIG or {DEFAULT_CONFIG})")
    sub = parser.add_subparsers(dest="command")
    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file")
    check.add_argument("--strict", action="store_true", help="treat warnings as errors")
    demo = sub.add_parser("demo", help="run against a built-in fake provider, no real keys needed")
    demo.add_argument("--port", type=int, default=4000)
    demo.add_argument("--admin-port", type=int, default=9464)
    demo.add_argument("--exit-after-showing", action="store_true", help="stop after the rotation walk-through")
    run = sub.add_parser("run", help="run the sidecar (the default)")
    run.add_argument("--config", dest="config")
    return parser


def check_config(path: str, strict: bool = False) -> int:
    try:
        config = load_file(path, os.environ)
    except ConfigError as exc:
        print(f"{path}: error: {exc}", file=sys.stderr)
        return 1
    for warning in config.warnings:
        print(f"{path}: warning: {warning}", file=sys.stderr)
    if strict and config.warnings:
        return 1
    print(_summary(path, config))
    return 0


def _summary(path: str, config: Config) -> str:
    lines = [f"{path}: ok"]
    for provider in config.providers.values():
        names = ", ".join(k.name for k in provider.keys) or "no keys"
        lines.append(f"  provider {provider.name} ({provider.type}) {provider.base_url}: {names}")
    for route in config.routes:
        lines.append(f"  route {route.prefix or '/'} -> {', '.join(route.providers)}")
    return "\n".join(lines)


def run(path: str) -> int:
    try:
        config = load_file(path, os.environ)
    except ConfigError as exc:
        print(f"{path}: error: {exc}", file=sys.stderr)
        return 1
    env = dict(os.environ)
    sidecar = Sidecar(config, config_text=lambda: read_text(path), env=env)
    configure_logging(config, sidecar)
    for warning in config.warnings:
        logging.getLogger("keymux").warning("config warning", extra={"fields": {"reason": warning}})

    async def watch(sc: Sidecar) -> None:
        await watch_files(lambda: [path, *sc.runtime.config.key_files()], sc.reload)

    return _run(serve(sidecar, watch))


def _run(main: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop  # optional: a faster event loop when installed
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
