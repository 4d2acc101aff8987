"""Reload on change: the config file and the key files of Secret volumes.

Kubernetes updates a ConfigMap or Secret volume by writing a new timestamped directory and
renaming a `..data` symlink over the old one; the user-visible `config.yaml` is a symlink to
`..data/config.yaml`, so its own inode never changes. Each file is therefore identified by
where it resolves to and what it holds, which catches that swap as well as an edit in place.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Callable, Iterable

log = logging.getLogger("keymux")

Snapshot = dict[str, str]  # path -> digest of its resolved path and content


def file_digest(path: str) -> str:
    """A digest of where `path` resolves to and what it holds; a missing file has one too."""
    digest = hashlib.sha256()
    digest.update(os.path.realpath(path).encode() + b"\0")
    try:
        with open(path, "rb") as handle:
            digest.update(hashlib.sha256(handle.read()).digest())
    except OSError as exc:
        digest.update(f"missing:{exc.errno}".encode())
    return digest.hexdigest()


def snapshot(paths: Iterable[str]) -> Snapshot:
    return {path: file_digest(path) for path in set(paths)}


async def watch_files(
    paths: Callable[[], Iterable[str]], on_change: Callable[[], object], interval: float = 1.0
) -> None:
    """Poll the files `paths()` names; call `on_change` when any resolves or reads differently.

    Polling a handful of small files once a second costs nothing measurable and needs no
    inotify, which misses the symlink swap unless the directory itself is watched.
    """
    last = snapshot(paths())
    while True:
        await asyncio.sleep(interval)
        current = snapshot(paths())
        if current == last:
            continue
        changed = sorted(path for path in current.keys() | last.keys() if current.get(path) != last.get(path))
        log.info("config or key file changed; reloading", extra={"fields": {"files": changed}})
        try:
            on_change()
        except Exception:  # the watcher must outlive any one reload
            log.exception("reload failed")
        last = _after_reload(current, paths())


def _after_reload(before: Snapshot, paths: Iterable[str]) -> Snapshot:
    """What the next poll compares with: files already watched keep the state read *before*
    the reload, so a change that lands while it runs triggers another; files the new config
    added are read now."""
    return {path: before[path] if path in before else file_digest(path) for path in set(paths)}
