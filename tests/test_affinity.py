"""Resource affinity, pure: which ids a create answer makes, which a request names, and a map
that is bounded and forgets."""

from __future__ import annotations

import pytest

from sidecar.affinity import Affinity, Owner, created_id, creates_resource, referenced_ids


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("head", "resource"),
    [
        (b'{"id": "file-abc123", "object": "file", "bytes": 120}', "file-abc123"),
        (b'{"id": "batch_abc", "object": "batch", "input_file_id": "file-x"}', "batch_abc"),
        (b'event: response.created\ndata: {"type":"response.created","response":{"id":"resp_68a"}}', "resp_68a"),
        (b'{"id": "vs_abc", "object": "vector_store"}', "vs_abc"),
        (b'{"id": "asst_abc", "object": "assistant"}', "asst_abc"),
        (b'{"id": "thread_abc", "object": "thread"}', "thread_abc"),
        (b'{"id": "upload_abc", "object": "upload"}', "upload_abc"),
        (b'{"id": "msgbatch_01HkcTjaV5uDC8jWR4ZsDV8d", "type": "message_batch"}', "msgbatch_01HkcTjaV5uDC8jWR4ZsDV8d"),
        (b'{"file": {"name": "files/abc-123", "mimeType": "text/plain"}}', "files/abc-123"),
        (b'{"id": "chatcmpl-1", "object": "chat.completion"}', None),
    ],
)
def test_a_create_answer_names_the_resource_it_made(head: bytes, resource: str | None) -> None:
    assert created_id(head) == resource


@pytest.mark.parametrize(
    ("path", "body", "named"),
    [
        ("/v1/files/file-abc123/content", b"", ["file-abc123"]),
        ("/v1/batches/batch_abc/cancel", b"", ["batch_abc"]),
        ("/v1/batches", b'{"input_file_id": "file-abc", "endpoint": "/v1/chat/completions"}', ["file-abc"]),
        ("/v1/responses", b'{"previous_response_id": "resp_1", "tools": [{"vector_store_ids": ["vs_1", "vs_2"]}]}',
         ["resp_1", "vs_1", "vs_2"]),
        ("/v1/threads/thread_abc/runs", b'{"assistant_id": "asst_1"}', ["thread_abc", "asst_1"]),
        ("/v1/messages/batches/msgbatch_01abc/results", b"", ["msgbatch_01abc"]),
        ("/v1beta/files/abc-123", b"", ["files/abc-123"]),
        ("/v1beta/models/gemini-1.5-pro:generateContent",
         b'{"contents": [{"parts": [{"fileData": {"fileUri": "https://x/v1beta/files/abc-123"}}]}]}', ["files/abc-123"]),
        ("/v1/files", b"", []),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "see file-abc and resp_1"}]}', []),
    ],
)  # fmt: skip
def test_a_request_names_resources_in_its_path_and_its_reference_fields(path: str, body: bytes, named: list[str]) -> None:
    assert referenced_ids(path, body) == named


def test_only_posts_to_a_collection_create_resources() -> None:
    assert creates_resource("POST", "/v1/files") and creates_resource("POST", "/v1/responses")
    assert not creates_resource("GET", "/v1/files") and not creates_resource("POST", "/v1/chat/completions")
    assert not creates_resource("POST", "/v1/files/file-1/content")


def test_the_map_is_bounded_least_recently_named_first() -> None:
    clock = Clock()
    affinity = Affinity(clock, capacity=3)
    for name in ("file-1", "file-2", "file-3"):
        affinity.learn(name, Owner("openai", "a"))
    assert affinity.owner("file-1") == Owner("openai", "a")  # named again: now the most recent
    affinity.learn("file-4", Owner("openai", "b"))

    assert len(affinity) == 3
    assert [affinity.owner(f"file-{i}") for i in range(1, 5)] == [
        Owner("openai", "a"), None, Owner("openai", "a"), Owner("openai", "b"),
    ]  # fmt: skip


def test_an_entry_unused_for_its_ttl_is_forgotten_and_use_keeps_it() -> None:
    clock = Clock()
    affinity = Affinity(clock, ttl=100)
    affinity.learn("resp_1", Owner("openai", "a"))
    affinity.learn("resp_2", Owner("openai", "a"))
    clock.now += 60
    assert affinity.owner("resp_1") is not None  # named again: its 100 s start over
    clock.now += 60

    assert affinity.owner("resp_1") == Owner("openai", "a")
    assert affinity.owner("resp_2") is None
    assert len(affinity) == 1


def test_pin_takes_the_first_named_resource_with_a_known_creator() -> None:
    affinity = Affinity(Clock())
    assert affinity.pin("/v1/files/file-9", b"") is None  # nothing learned yet
    affinity.learn("file-2", Owner("openai", "b"))

    assert affinity.pin("/v1/batches", b'{"input_file_id": "file-2"}') == ("file-2", Owner("openai", "b"))
    assert affinity.pin("/v1/files/file-9", b"") is None
