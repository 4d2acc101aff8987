"""The provider table: where each provider's model is found, and the credential step."""

from __future__ import annotations

import gzip
import hashlib
import hmac
import json
import zlib
from dataclasses import replace

import brotli
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar import runtime
from sidecar.providers import PROVIDERS, decoded_prefix, model_from_json
from sidecar.redact import MASK, MAX_LEARNED, PIECE, Redactor
from tests.conftest import FakeServer, StartKeymux, openai_config


@pytest.mark.parametrize(
    ("body", "model"),
    [
        (b'{"model":"gpt-4o","messages":[]}', "gpt-4o"),
        (b'{"messages":[{"role":"user","content":"model"}],"model":"x"}', "x"),
        (b'{"model": "a\\"b"}', 'a"b'),
        (b'{"model":"caf\\u00e9"}', "caf\u00e9"),
        (b'{"messages": "\\"model\\": \\"evil\\"", "model": "real"}', "real"),
        (b'{"model": 5}', None),
        (b"not json", None),
        (b"", None),
        (b"[1, 2]", None),
    ],
)
def test_model_from_json(body, model):
    assert model_from_json("/v1/chat/completions", body) == model


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(model=st.text(max_size=30), extra=st.dictionaries(st.text(max_size=8), json_values, max_size=5))
def test_the_fast_scan_agrees_with_a_full_parse(model, extra):
    body = {**extra, "model": model}
    assert model_from_json("/v1", json.dumps(body).encode()) == model
    assert model_from_json("/v1", json.dumps(body, ensure_ascii=False).encode()) == model


def test_gemini_and_azure_take_the_model_from_the_path():
    assert (
        PROVIDERS["gemini"].find_model("/v1beta/models/gemini-1.5-pro:streamGenerateContent", b"") == "gemini-1.5-pro"
    )
    assert PROVIDERS["gemini"].find_model("/v1beta/models", b"") is None
    assert PROVIDERS["azure"].find_model("/openai/deployments/gpt4o-prod/chat/completions", b"") == "gpt4o-prod"


# -- the credential step ------------------------------------------------------------------------


class Signing:
    """A credential of the shape a request signer has (AWS SigV4): a value per request,
    computed from the key, the method, the URL and the body."""

    def __init__(self, keys, learn) -> None:
        self.learn = learn

    def headers(self, key, method, url, body):
        digest = hmac.new(key.secret.encode(), f"{method} {url}\n".encode() + body, hashlib.sha256).hexdigest()
        signature = f"sig-{digest}"
        self.learn(signature)
        return (("authorization", f"Bearer {signature}"),)


async def test_the_credential_step_signs_each_request_and_its_output_is_redacted(
    fake: FakeServer, keymux: StartKeymux, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(runtime.PROVIDERS, "openai", replace(PROVIDERS["openai"], credential=Signing))
    km = await keymux(openai_config(fake.url, {"a": "sk-signing-key-000000000000"}))
    fake.provider.script(status=500, echo_key=True)  # the provider quotes the credential it got
    body = json.dumps({"model": "gpt-4o", "messages": []}).encode()

    async with km.session.post(km.url + "/v1/chat/completions", data=body) as response:
        answer = await response.read()

    digest = hmac.new(b"sk-signing-key-000000000000", f"POST {fake.url}/v1/chat/completions\n".encode() + body, "sha256")
    signature = f"sig-{digest.hexdigest()}"
    assert fake.provider.keys_seen() == [signature]
    assert response.status == 500
    assert b"Key used: [redacted]" in answer
    assert signature[:PIECE].encode() not in answer and signature[-PIECE:].encode() not in answer


def test_the_redactor_remembers_a_bounded_number_of_learned_secrets() -> None:
    def learned(i: int) -> str:
        return hashlib.sha256(str(i).encode()).hexdigest()[:24]

    redactor = Redactor(["sk-configured-0000"])
    for i in range(MAX_LEARNED + 10):
        redactor.learn(learned(i))

    assert redactor(b"sk-configured-0000") == MASK  # configured secrets are never forgotten
    assert redactor(learned(MAX_LEARNED + 9).encode()) == MASK
    assert redactor(learned(0).encode()) == learned(0).encode()  # the oldest learned ones made room


@pytest.mark.parametrize(
    ("type_", "tail", "ends"),
    [
        ("openai", b'data: {"choices":[]}\n\ndata: [DONE]\n\n', True),
        ("openai", b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n', False),
        ("openai", b'event: response.completed\ndata: {"type":"response.completed"}\n\n', True),
        ("azure", b"data: [DONE]\n\n", True),
        ("openai-compatible", b"data: [DONE]\n\n", True),
        ("anthropic", b'event: message_stop\ndata: {"type":"message_stop"}\n\n', True),
        ("anthropic", b'event: message_delta\ndata: {"type":"message_delta"}\n\n', False),
        ("gemini", b'data: {"candidates":[{"finishReason":"STOP"}]}\r\n\r\n', True),
        ("gemini", b'data: {"candidates":[{"content":{}}]}\r\n\r\n', False),
    ],
)
def test_each_provider_knows_the_terminal_event_of_its_streams(type_: str, tail: bytes, ends: bool) -> None:
    assert PROVIDERS[type_].ends_stream(tail) is ends


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda data: zlib.compressobj(wbits=-zlib.MAX_WBITS).compress(data) + zlib.compressobj(wbits=-zlib.MAX_WBITS).flush()),
        ("br", brotli.compress),
    ],
)
def test_an_encoded_body_is_read_only_up_to_its_bound_however_far_it_inflates(encoding: str, compress) -> None:
    bomb = compress(b'{"model": "gpt-4o", "messages": "' + b"0" * (64 * 1024 * 1024) + b'"}')

    prefix = decoded_prefix(encoding, bomb, limit=1024)

    assert prefix.startswith(b'{"model": "gpt-4o"') and len(prefix) == 1024


def test_a_body_in_an_unknown_or_broken_encoding_yields_nothing_to_read() -> None:
    assert decoded_prefix("zstd", b"\x28\xb5\x2f\xfd") == b""
    assert decoded_prefix("gzip", b"not gzip at all") == b""
    assert decoded_prefix("br", b"not brotli") == b""
