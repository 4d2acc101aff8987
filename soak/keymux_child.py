"""keymux as the soak runs it: the real Sidecar and serve() loop (SIGHUP reloads the config file,
SIGTERM drains), plus one extra admin route, /_soak/stats, reporting what the process holds:
resident memory, asyncio tasks, file descriptors, requests in flight and connections.

    python -m soak.keymux_child CONFIG_FILE
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys

from aiohttp import web

from sidecar.server import Sidecar, configure_logging, load_file, read_text, serve
from soak.stack import keymux_busy, open_fds, rss_bytes


def main(path: str) -> int:
    config = load_file(path, os.environ)
    sidecar = Sidecar(config, config_text=lambda: read_text(path), env=dict(os.environ))
    configure_logging(config, sidecar)

    async def stats(request: web.Request) -> web.Response:
        if request.query.get("collect"):
            gc.collect()
        return web.json_response(
            {
                "rss": rss_bytes(),
                "tasks": len(asyncio.all_tasks()),
                "fds": open_fds(),
                "app_port": sidecar.port("app"),
                "entries": sum(p.health.entry_count() for p in sidecar.runtime.providers.values()),
                **keymux_busy(sidecar),
            }
        )

    sidecar.admin.router.add_get("/_soak/stats", stats)
    return asyncio.run(serve(sidecar))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
