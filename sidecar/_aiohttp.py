"""The few places keymux reaches past aiohttp's public API, each behind one small function.

`tests/test_aiohttp_internals.py` fails loudly when an aiohttp release changes one of them.
"""

from __future__ import annotations

import aiohttp


def disable_connection_retry(session: aiohttp.ClientSession) -> None:
    """aiohttp silently re-sends an idempotent request once when a pooled connection drops.

    keymux makes that decision itself (on another key), so each attempt is one request. There
    is no public switch: this sets `ClientSession._retry_connection`.
    """
    if not hasattr(session, "_retry_connection"):
        raise RuntimeError("aiohttp.ClientSession._retry_connection is gone: see sidecar/_aiohttp.py")
    session._retry_connection = False


def stop_read_timeout(response: aiohttp.ClientResponse) -> None:
    """Stop the socket read timer of a response whose body keymux streams.

    The idle gap between chunks is watched by one watchdog per process; aiohttp's `sock_read`
    would re-arm a timer for every chunk of every stream. The public `ClientTimeout` is per
    request and fixed when it starts, so this sets the connection protocol's `read_timeout`.
    """
    connection = response.connection
    if connection is not None and connection.protocol is not None:
        connection.protocol.read_timeout = None
