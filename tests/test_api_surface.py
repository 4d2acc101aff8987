"""Provider calls beyond a JSON chat body, through real sockets: Expect: 100-continue, request
bodies with a Content-Encoding, multipart uploads and Azure's v1 path, with the model found
for each (its health and its metrics label depend on it)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import anthropic
import brotli
import openai
import pytest
from google import genai
from google.genai import types as genai_types

from tests.conftest import FakeServer, Running, StartKeymux, openai_config, provider_config
from tests.test_accesslog import REPO, free_port
from tests.test_metrics import family, labels, settle

A, B = "sk-surface-a-000000000000", "sk-surface-b-000000000000"
MESSAGES = [{"role": "user", "content": "hi"}]


async def raw_exchange(km: Running, head: bytes, body: bytes, wait_for_continue: bool) -> tuple[bytes, bytes]:
    """(what came back before the body was sent, the final answer's head) over one raw connection."""
    port = km.sidecar.port("app")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        interim = b""
        if wait_for_continue:
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            if not interim.startswith(b"HTTP/1.1 100"):
                return interim, b""
        writer.write(body)
        await writer.drain()
        final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        return interim, final
    finally:
        writer.close()


def post_head(body: bytes, extra: str = "") -> bytes:
    return (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n{extra}\r\n"
    ).encode()


async def test_expect_100_continue_is_answered_before_the_body_and_not_forwarded(
    fake: FakeServer, keymux: StartKeymux
) -> None:
    fake.provider.revoked.add(A)
    km = await keymux(openai_config(fake.url, {"a": A, "b": B}))
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 4096}]}).encode()

    interim, final = await raw_exchange(km, post_head(body), body, wait_for_continue=True)

    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert final.startswith(b"HTTP/1.1 200 ")
    assert [(s.key, s.model) for s in fake.provider.seen] == [(A, "gpt-4o"), (B, "gpt-4o")]  # past the revoked key
    assert all("Expect" not in s.headers for s in fake.provider.seen)


async def test_a_body_over_the_limit_gets_413_instead_of_100_continue(fake: FakeServer, keymux: StartKeymux) -> None:
    km = await keymux(openai_config(fake.url, {"a": A}, "limits:\n  max_body_bytes: 1000\n"))
    body = b"{" + b" " * 2000 + b"}"

    interim, _ = await raw_exchange(km, post_head(body), body, wait_for_continue=True)

    assert interim.startswith(b"HTTP/1.1 413 ")
    assert list(fake.provider.seen) == []


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [("gzip", gzip.compress), ("deflate", zlib.compress), ("br", brotli.compress)],
)
async def test_an_encoded_request_body_is_forwarded_byte_for_byte_and_its_model_is_found(
    fake: FakeServer, keymux: StartKeymux, encoding: str, compress
) -> None:
    fake.provider.revoked.add(A)
    km = await keymux(openai_config(fake.url, {"a": A, "b": B}))
    plain = json.dumps({"messages": [{"role": "user", "content": "hi " * 5000}], "model": "gpt-4o"}).encode()
    body = compress(plain)
    headers = {"Content-Type": "application/json", "Content-Encoding": encoding, "Authorization": "Bearer placeholder"}

    async with km.session.post(km.url + "/v1/chat/completions", data=body, headers=headers) as response:
        assert response.status == 200, await response.text()

    # The provider inflated what keymux passed on unchanged, to a and then to b.
    assert [(s.key, s.model) for s in fake.provider.seen] == [(A, "gpt-4o"), (B, "gpt-4o")]
    for seen in fake.provider.seen:
        assert (seen.headers["Content-Encoding"], int(seen.headers["Content-Length"])) == (encoding, len(body))
    samples = await settle(km)
    assert family(samples, "keymux_upstream_attempts_total") == {
        labels(provider="openai", key="a", model="gpt-4o", outcome="credential_error"): 1,
        labels(provider="openai", key="b", model="gpt-4o", outcome="success"): 1,
    }


async def test_a_transcription_upload_is_counted_under_its_model_from_the_form(
    fake: FakeServer, keymux: StartKeymux
) -> None:
    fake.provider.revoked.add(A)
    km = await keymux(openai_config(fake.url, {"a": A, "b": B}))
    client = sdk(km)
    audio = io.BytesIO(b"RIFF" + b"\x00" * 50_000)
    audio.name = "hello.wav"
    try:
        transcript = await client.audio.transcriptions.create(model="whisper-1", file=audio)
    finally:
        await client.close()

    assert transcript.text == "Hello from the fake provider."
    assert [(s.key, s.model) for s in fake.provider.seen] == [(A, "whisper-1"), (B, "whisper-1")]
    assert all("placeholder-key" not in str(s.headers) for s in fake.provider.seen)
    samples = await settle(km)
    assert family(samples, "keymux_upstream_attempts_total") == {
        labels(provider="openai", key="a", model="whisper-1", outcome="credential_error"): 1,
        labels(provider="openai", key="b", model="whisper-1", outcome="success"): 1,
    }


def azure_config(fake: FakeServer) -> str:
    return provider_config("azure", fake.url, {"a": A, "b": B})


async def test_a_deployment_missing_on_azures_v1_path_cools_the_key_for_that_model_only(
    fake: FakeServer, keymux: StartKeymux
) -> None:
    km = await keymux(azure_config(fake))
    fake.provider.script(key=A, model="gpt-4o", status=404, kind="model_access")
    url = km.url + "/openai/v1/chat/completions"

    async def chat(model: str) -> int:
        async with km.session.post(url, json={"model": model, "messages": []}) as response:
            return response.status

    assert await chat("gpt-4o") == 200  # a: DeploymentNotFound, b answers
    assert [await chat("gpt-4o-mini") for _ in range(4)] == [200] * 4
    assert [await chat("gpt-4o") for _ in range(2)] == [200] * 2

    # a served gpt-4o-mini as usual (its 404 was for gpt-4o only); gpt-4o went to b alone.
    assert fake.provider.keys_seen() == [A, B, A, B, A, B, B, B]  # gpt-4o: a, b; mini: a, b, a, b; gpt-4o: b, b
    samples = await settle(km)
    assert samples[("keymux_key_state", labels(provider="azure", key="a", model="gpt-4o"))] == 1
    assert ("keymux_key_state", labels(provider="azure", key="a", model="gpt-4o-mini")) not in samples


# -- large uploads ----------------------------------------------------------------------------


def upload_form(size: int, seed: int = 7) -> tuple[aiohttp.FormData, str]:
    """A files.create form with `size` bytes of file content, and the content's sha256."""
    content = random.Random(seed).randbytes(size)
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", content, filename="data.jsonl", content_type="application/octet-stream")
    return form, hashlib.sha256(content).hexdigest()


async def test_a_spooled_upload_is_re_sent_whole_to_the_next_key(fake: FakeServer, keymux: StartKeymux) -> None:
    km = await keymux(openai_config(fake.url, {"a": A, "b": B}, "limits:\n  memory_body_bytes: 65536\n"))
    fake.provider.script(key=A, status=500)
    form, digest = upload_form(3 * 1024 * 1024)

    async with km.session.post(km.url + "/v1/files", data=form) as response:
        answer = await response.json()

    assert response.status == 200, answer
    assert (answer["bytes"], answer["sha256"], answer["purpose"]) == (3 * 1024 * 1024, digest, "batch")
    assert fake.provider.keys_seen() == [A, B]


def memory_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def spool_files(pid: int, directory: Path) -> list[str]:
    """The spool files keymux still holds open (they are unlinked as soon as they are made)."""
    held = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(directory)):
            held.append(target)
    return held


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
async def test_a_200_mib_upload_through_a_real_keymux_keeps_its_memory_flat(fake: FakeServer, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    port, admin = free_port(), free_port()
    config = tmp_path / "keymux.yaml"
    config.write_text(
        f"listen: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:{admin}\nlog_level: warning\n"
        f"limits:\n  spool_dir: {spool}\n" + openai_config(fake.url, {"a": A})
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "--config", str(config)],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    size = 200 * 1024 * 1024
    block = random.Random(3).randbytes(1024 * 1024)

    async def content() -> AsyncIterator[bytes]:
        for _ in range(size // len(block)):
            yield block

    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(200):  # bounded wait for the listener
                try:
                    async with session.get(f"http://127.0.0.1:{admin}/readyz") as ready:
                        if ready.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            small, _ = upload_form(4 * 1024 * 1024)  # warm up the spool path once
            async with session.post(f"http://127.0.0.1:{port}/v1/files", data=small) as response:
                assert response.status == 200
            before = memory_kb(process.pid, "VmHWM")
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", content(), filename="big.jsonl", content_type="application/octet-stream")
            async with session.post(f"http://127.0.0.1:{port}/v1/files", data=form) as response:
                answer = await response.json()
            peak = memory_kb(process.pid, "VmHWM")
            for _ in range(200):  # the answer reached us; the request is over once keymux reports it
                async with session.get(f"http://127.0.0.1:{admin}/metrics") as scraped:
                    if "\nkeymux_inflight_requests 0.0\n" in await scraped.text():
                        break
                await asyncio.sleep(0.02)
            held = spool_files(process.pid, spool)
    finally:
        process.terminate()
        process.wait(30)

    assert response.status == 200, answer
    expected = hashlib.sha256()
    for _ in range(size // len(block)):
        expected.update(block)
    assert (answer["bytes"], answer["sha256"]) == (size, expected.hexdigest())
    assert peak - before <= 32 * 1024, f"resident memory peak grew {(peak - before) / 1024:.0f} MiB"
    assert held == []  # the spooled body went with its request
    assert list(spool.iterdir()) == []


# -- resource affinity ------------------------------------------------------------------------


def sdk(km: Running) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=km.url + "/v1", api_key="placeholder-key", max_retries=0)


def jsonl() -> io.BytesIO:
    data = io.BytesIO(b'{"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n')
    data.name = "batch.jsonl"
    return data


async def test_a_file_and_what_uses_it_go_to_the_key_that_uploaded_it(fake: FakeServer, keymux: StartKeymux) -> None:
    km = await keymux(openai_config(fake.url, {"a": A, "b": B}))
    client = sdk(km)
    try:
        uploaded = await client.files.create(file=jsonl(), purpose="batch")
        retrieved = [await client.files.retrieve(uploaded.id) for _ in range(3)]
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        for _ in range(2):
            await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    finally:
        await client.close()

    assert [f.id for f in retrieved] == [uploaded.id] * 3
    assert batch.input_file_id == uploaded.id
    # Round-robin would have sent the second and fourth requests to b, which answers 404 for a's file;
    # chat completions, naming no resource, rotate as ever.
    assert fake.provider.keys_seen() == [A, A, A, A, A, A, B]
    assert "placeholder-key" not in {s.headers.get("Authorization", "") for s in fake.provider.seen}


async def test_a_stored_response_is_continued_on_the_key_that_stored_it(fake: FakeServer, keymux: StartKeymux) -> None:
    km = await keymux(openai_config(fake.url, {"a": A, "b": B}))
    client = sdk(km)
    try:
        first = await client.responses.create(model="gpt-4o", input="hi")
        second = await client.responses.create(model="gpt-4o", input="and?", previous_response_id=first.id)
        third = await client.responses.create(model="gpt-4o", input="so?", previous_response_id=second.id)
    finally:
        await client.close()

    assert third.output_text == "Hello from the fake provider."
    assert fake.provider.keys_seen() == [A, A, A]


async def test_when_the_creator_key_is_revoked_the_app_is_told_which_key_and_resource(
    fake: FakeServer, keymux: StartKeymux
) -> None:
    km = await keymux(openai_config(fake.url, {"a": A, "b": B}))
    client = sdk(km)
    try:
        uploaded = await client.files.create(file=jsonl(), purpose="batch")
        fake.provider.revoked.add(A)
        with pytest.raises(openai.AuthenticationError):  # the provider's own 401, from a
            await client.files.retrieve(uploaded.id)
        with pytest.raises(openai.APIStatusError) as caught:  # a is disabled now: keymux says so
            await client.files.retrieve(uploaded.id)
    finally:
        await client.close()

    error = caught.value
    assert error.status_code == 503
    assert error.body["code"] == "resource_key_unavailable"
    assert error.body["message"].startswith(
        f"keymux: {uploaded.id} was created with key openai/a, which cannot serve it now: "
        "openai/a disabled for every model after credential_error for 600 s"
    )
    assert fake.provider.keys_seen() == [A, A]  # never b, which would have answered a confusing 404


async def test_affinity_off_keeps_round_robin_for_keys_of_one_project(fake: FakeServer, keymux: StartKeymux) -> None:
    config = openai_config(fake.url, {"a": A, "b": B}).replace("type: openai\n", "type: openai\n    affinity: false\n")
    km = await keymux(config)
    client = sdk(km)
    try:
        uploaded = await client.files.create(file=jsonl(), purpose="batch")
        with pytest.raises(openai.NotFoundError):  # b cannot see a's file here (a fake with one project per key)
            await client.files.retrieve(uploaded.id)
    finally:
        await client.close()

    assert fake.provider.keys_seen() == [A, B]


# -- WebSockets -------------------------------------------------------------------------------


async def test_a_realtime_session_through_the_official_sdk_uses_a_real_key_and_relays_both_ways(
    fake: FakeServer, keymux: StartKeymux
) -> None:
    fake.provider.revoked.add(A)  # the handshake with a is refused: b is tried before the app sees anything
    km = await keymux(openai_config(fake.url, {"a": A, "b": B}))
    client = sdk(km)
    try:
        async with client.realtime.connect(model="gpt-realtime") as connection:
            created = json.loads(await connection.recv_bytes())
            await connection.send({"type": "session.update", "session": {"type": "realtime", "instructions": "hi"}})
            echoed = json.loads(await connection.recv_bytes())
    finally:
        await client.close()

    assert created["type"] == "session.created" and created["session"]["model"] == "gpt-realtime"
    assert echoed == {"type": "echo", "event": {"type": "session.update", "session": {"type": "realtime", "instructions": "hi"}}}
    assert [(s.key, s.model) for s in fake.provider.seen] == [(A, "gpt-realtime"), (B, "gpt-realtime")]
    assert all("placeholder-key" not in str(s.headers) for s in fake.provider.seen)
    samples = await settle(km)
    assert family(samples, "keymux_upstream_attempts_total") == {
        labels(provider="openai", key="a", model="gpt-realtime", outcome="credential_error"): 1,
        labels(provider="openai", key="b", model="gpt-realtime", outcome="success"): 1,
    }
    assert family(samples, "keymux_requests_total") == {
        labels(route="/", provider="openai", model="gpt-realtime", outcome="success"): 1
    }


async def test_frames_close_codes_and_subprotocols_pass_through_and_a_credential_subprotocol_does_not(
    fake: FakeServer, keymux: StartKeymux
) -> None:
    km = await keymux(openai_config(fake.url, {"a": A}))
    protocols = ("realtime", "openai-insecure-api-key.sk-app-own-key-0000", "openai-beta.realtime-v1")
    async with km.session.ws_connect(km.url + "/v1/realtime?model=gpt-realtime", protocols=protocols) as ws:
        created = json.loads((await ws.receive()).data)
        await ws.send_bytes(b"\x01\x02\x03")
        reversed_back = (await ws.receive()).data
        await ws.send_str(json.dumps({"type": "close", "code": 4001, "reason": "session over"}))
        closing = await ws.receive()

    assert ws.protocol == "realtime"
    assert created["protocols"] == ["realtime", "openai-beta.realtime-v1"]  # the app's key never went up
    assert reversed_back == b"\x03\x02\x01"
    assert (closing.type, closing.data, closing.extra) == (aiohttp.WSMsgType.CLOSE, 4001, "session over")
    [seen] = fake.provider.seen
    assert seen.key == A


async def test_a_handshake_every_key_refuses_is_answered_with_the_providers_status(
    fake: FakeServer, keymux: StartKeymux
) -> None:
    km = await keymux(openai_config(fake.url, {"a": A, "b": B}))
    fake.provider.script(status=429, headers={"retry-after": "7"})

    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await km.session.ws_connect(km.url + "/v1/realtime?model=gpt-realtime")

    assert caught.value.status == 429
    assert fake.provider.keys_seen() == [A, B]
    rows = {(r["key"], r["model"]): r["state"] for r in km.sidecar.key_table()}
    assert rows[("a", "gpt-realtime")] == rows[("b", "gpt-realtime")] == "cooling"


# -- Gemini through google-genai --------------------------------------------------------------


def gemini_config(fake: FakeServer) -> str:
    return provider_config("gemini", fake.url, {"a": A, "b": B})


def genai_client(km: Running) -> genai.Client:
    return genai.Client(api_key="placeholder-key", http_options={"base_url": km.url, "api_version": "v1beta"})


async def test_a_gemini_file_upload_and_its_use_stay_on_the_uploading_key(fake: FakeServer, keymux: StartKeymux) -> None:
    km = await keymux(gemini_config(fake))
    client = genai_client(km)
    try:
        uploaded = await client.aio.files.upload(file=io.BytesIO(b"hello " * 1000), config={"mime_type": "text/plain"})
        fetched = await client.aio.files.get(name=uploaded.name)
        answer = await client.aio.models.generate_content(
            model="gemini-2.0-flash",
            contents=[genai_types.Part.from_uri(file_uri=uploaded.uri, mime_type="text/plain"), "Summarise it."],
        )
    finally:
        await client.aio.aclose()

    assert (fetched.name, int(uploaded.size_bytes)) == (uploaded.name, 6000)
    assert answer.text == "Hello from the fake provider."
    # Start, the upload at the URL it answered, get, generate: all with a (round-robin would alternate).
    assert fake.provider.keys_seen() == [A, A, A, A]
    assert all("placeholder-key" not in str(s.headers) for s in fake.provider.seen)
    samples = await settle(km)
    assert samples[("keymux_upstream_attempts_total", labels(provider="gemini", key="a", model="gemini-2.0-flash", outcome="success"))] == 1


async def test_a_gemini_live_session_gets_a_real_key_past_a_revoked_one(fake: FakeServer, keymux: StartKeymux) -> None:
    """google-genai dials Live over wss:// whenever it has an API key, so this drives the same
    handshake and messages with aiohttp over plain ws:// (the sidecar listens on loopback HTTP)."""
    fake.provider.revoked.add(A)
    km = await keymux(gemini_config(fake))
    path = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent?key=placeholder-key"

    async with km.session.ws_connect(km.url + path) as ws:
        await ws.send_str(json.dumps({"setup": {"model": "models/gemini-live-2.5-flash"}}))
        setup = json.loads((await ws.receive()).data)
        await ws.send_str(json.dumps({"clientContent": {"turns": [{"role": "user", "parts": [{"text": "hi"}]}]}}))
        turn = json.loads((await ws.receive()).data)

    assert setup == {"setupComplete": {}}
    assert turn["serverContent"]["modelTurn"]["parts"] == [{"text": "echo from the fake provider"}]
    assert fake.provider.keys_seen() == [A, B]  # a's handshake refused: b, before the app saw anything
    assert all("placeholder-key" not in str(s.headers) + s.query for s in fake.provider.seen)


async def test_an_azure_realtime_session_is_counted_under_its_deployment(fake: FakeServer, keymux: StartKeymux) -> None:
    fake.provider.revoked.add(A)
    km = await keymux(azure_config(fake))
    url = km.url + "/openai/realtime?api-version=2025-04-01-preview&deployment=gpt-4o-realtime"

    async with km.session.ws_connect(url, headers={"api-key": "placeholder-key"}) as ws:
        created = json.loads((await ws.receive()).data)

    assert created["session"]["model"] == "gpt-4o-realtime"
    assert [(s.key, s.model) for s in fake.provider.seen] == [(A, "gpt-4o-realtime"), (B, "gpt-4o-realtime")]
    assert all(s.headers.get("api-key") in (A, B) for s in fake.provider.seen)  # the app's never went up
    samples = await settle(km)
    assert family(samples, "keymux_requests_total") == {
        labels(route="/", provider="azure", model="gpt-4o-realtime", outcome="success"): 1
    }


async def test_a_websocket_session_with_nothing_moving_is_closed_after_the_idle_timeout(
    fake: FakeServer, keymux: StartKeymux
) -> None:
    km = await keymux(openai_config(fake.url, {"a": A}, "timeouts:\n  idle: 300ms\n"))

    async with km.session.ws_connect(km.url + "/v1/realtime?model=gpt-realtime") as ws:
        await ws.receive()  # session.created
        closing = await ws.receive()  # then nothing moves either way

    assert (closing.type, closing.data, closing.extra) == (aiohttp.WSMsgType.CLOSE, 1001, "keymux: idle")
    samples = await settle(km)
    assert family(samples, "keymux_requests_total") == {
        labels(route="/", provider="openai", model="gpt-realtime", outcome="success"): 1
    }


async def test_an_anthropic_message_batch_is_followed_up_on_the_key_that_created_it(
    fake: FakeServer, keymux: StartKeymux
) -> None:
    km = await keymux(provider_config("anthropic", fake.url, {"a": A, "b": B}))
    client = anthropic.AsyncAnthropic(base_url=km.url, api_key="placeholder-key", max_retries=0)
    request = {"custom_id": "1", "params": {"model": "claude-3-5-haiku", "max_tokens": 16, "messages": MESSAGES}}
    try:
        created = await client.messages.batches.create(requests=[request])
        followed = [await client.messages.batches.retrieve(created.id) for _ in range(3)]
    finally:
        await client.close()

    assert {batch.id for batch in followed} == {created.id}
    assert fake.provider.keys_seen() == [A, A, A, A]
