"""The two aiohttp internals keymux relies on (`sidecar/_aiohttp.py`): a new aiohttp release that
renames or removes one fails here, loudly, rather than silently changing keymux's behaviour."""

from __future__ import annotations

import aiohttp
from aiohttp import client_proto

from sidecar._aiohttp import disable_connection_retry, stop_read_timeout
from tests.conftest import FakeServer


async def test_the_silent_resend_of_idempotent_requests_can_be_switched_off() -> None:
    async with aiohttp.ClientSession() as session:
        assert session._retry_connection is True, "aiohttp no longer re-sends on a dropped pooled connection?"
        disable_connection_retry(session)
        assert session._retry_connection is False


def test_a_session_without_the_switch_is_refused_loudly() -> None:
    class Renamed:
        pass

    try:
        disable_connection_retry(Renamed())  # type: ignore[arg-type]
    except RuntimeError as exc:
        assert "_retry_connection is gone" in str(exc)
    else:
        raise AssertionError("a missing internal must raise")


def test_the_response_protocol_still_has_a_settable_read_timeout() -> None:
    prop = getattr(client_proto.ResponseHandler, "read_timeout", None)
    assert isinstance(prop, property) and prop.fset is not None, "ResponseHandler.read_timeout changed"


async def test_a_streamed_response_stops_its_read_timer(fake: FakeServer) -> None:
    fake.provider.script(events=3, event_delay=0.05)  # still streaming while it is looked at
    timeout = aiohttp.ClientTimeout(sock_read=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        body = {"model": "gpt-4o", "messages": [], "stream": True}
        headers = {"Authorization": "Bearer sk-internals-0000000000"}
        async with session.post(fake.url + "/v1/chat/completions", json=body, headers=headers) as response:
            protocol = response.connection.protocol
            assert protocol.read_timeout == 300
            stop_read_timeout(response)
            assert protocol.read_timeout is None
            assert (await response.read()).endswith(b"data: [DONE]\n\n")
