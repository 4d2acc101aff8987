"""Reload on change: the config file (Kubernetes ConfigMap volumes swap a `..data` symlink, so
the file's own inode never changes in place) and the key files of Secret volumes."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Callable, Iterable

log = logging.getLogger("keymux")


def fingerprint(paths: Iterable[str]) -> str:
    """A digest of where each path resolves to and what it holds; missing files count too."""
    digest = hashlib.sha256()
    for path in sorted(set(paths)):
        digest.update(path.encode() + b"\0")
        try:
            digest.update(os.path.realpath(path).encode() + b"\0")
            with open(path, "rb") as handle:
                digest.update(hashlib.sha256(handle.read()).digest())
        except OSError as exc:
            digest.update(f"missing:{exc.errno}".encode())
    return digest.hexdigest()


async def watch_files(
    paths: Callable[[], Iterable[str]], on_change: Callable[[], object], interval: float = 1.0
) -> None:
    """Poll the files `paths()` names; call `on_change` when any resolves or reads differently.

    Polling a handful of small files once a second costs nothing measurable and needs no
    inotify, which misses the symlink swap unless the directory itself is watched.
    """
    last = fingerprint(paths())
    while True:
        await asyncio.sleep(interval)
        current = fingerprint(paths())
        if current != last:
            last = current
            log.info("config or key file changed; reloading")
            on_change()
            last = fingerprint(paths())
