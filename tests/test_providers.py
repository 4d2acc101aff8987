"""The provider table: where each provider's model is found."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.providers import PROVIDERS, model_from_json


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
