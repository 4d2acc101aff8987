"""Resource affinity: a resource made with one key exists only for that key's project or account.

An uploaded file, a batch, a stored Responses answer, a vector store, an assistant or thread, an
Anthropic message batch or a Gemini file is visible to the key that created it. keymux learns the
creator from the create answer and sends every later request naming the resource to that key,
rather than letting round-robin hand it to another key that would answer 404.

Pure: the ids are read from bytes the shell passes in, and the clock is injected.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

from sidecar.health import Clock

# The id prefixes of the resources that belong to one key, by provider family.
_PREFIXES = r"(?:file-|file_|upload_|batch_|resp_|vs_|asst_|thread_|msgbatch_)"
_ID_CHARS = r"[A-Za-z0-9._\-]{1,200}"
# A create answer names its resource first: OpenAI's and Anthropic's `id`, Gemini's file `name`.
_CREATED = re.compile(rb'"(?:id|name)"\s*:\s*"(' + (_PREFIXES + _ID_CHARS + "|files/" + _ID_CHARS).encode() + rb')"')
# Gemini names a file `files/{id}`; OpenAI's `/v1/files/file-…` is its own id, not a Gemini name.
_IN_PATH = re.compile(
    r"(?<![A-Za-z0-9])(" + _PREFIXES + _ID_CHARS + r"|files/(?!" + _PREFIXES + r")[a-z0-9][a-z0-9\-]{0,63})(?=$|[/:?])"
)
_FIELDS = (
    b"previous_response_id|file_id|input_file_id|assistant_id|thread_id|vector_store_id|batch_id|upload_id"
)
_IN_FIELD = re.compile(rb'"(?:' + _FIELDS + rb')"\s*:\s*"([^"\\]{1,256})"')
_IN_LIST = re.compile(rb'"(?:file_ids|vector_store_ids)"\s*:\s*\[([^\]]{0,65536})\]')
_STRING = re.compile(rb'"([^"\\]{1,256})"')
_GEMINI_URI = re.compile(rb'"fileUri"\s*:\s*"[^"]*/(files/[a-z0-9][a-z0-9\-]{0,63})"')
# A Gemini resumable upload goes on at the URL its start answered with: the session is its upload_id.
_UPLOAD_ID = re.compile(r"[?&]upload_id=([A-Za-z0-9._\-]{1,512})")

CAPACITY = 100_000  # resources remembered, least recently used forgotten first
TTL = 30 * 86400.0  # seconds a resource is remembered after it was last named (Responses keep 30 days)


class Owner(NamedTuple):
    provider: str
    key: str


_CREATES = re.compile(r"/(?:files|uploads|batches|responses|vector_stores|assistants|threads)$")


def creates_resource(method: str, path: str) -> bool:
    """Whether a request is one whose answer names a resource it made (a POST to a collection)."""
    return method == "POST" and _CREATES.search(path) is not None


def created_id(answer_head: bytes) -> str | None:
    """The resource a create answer made, from the first bytes of the answer (or its first event)."""
    match = _CREATED.search(answer_head)
    return match.group(1).decode() if match else None


def upload_session(url: str) -> str | None:
    """The resumable upload a URL belongs to (Gemini's `X-Goog-Upload-URL`), as a resource name."""
    match = _UPLOAD_ID.search(url)
    return f"upload_id={match.group(1)}" if match else None


def referenced_ids(path: str, body: bytes) -> list[str]:
    """The resources a request names: in its path (query included), or in the body fields that
    refer to one."""
    route, _, query = path.partition("?")
    found = [m.group(1) for m in _IN_PATH.finditer(route)]
    if query and (session := upload_session("?" + query)) is not None:
        found.append(session)
    if body:
        found += [m.group(1).decode("utf-8", "replace") for m in _IN_FIELD.finditer(body)]
        for listed in _IN_LIST.finditer(body):
            found += [m.group(1).decode("utf-8", "replace") for m in _STRING.finditer(listed.group(1))]
        found += [m.group(1).decode() for m in _GEMINI_URI.finditer(body)]
    return found


class Affinity:
    """Which key created each resource: bounded in count, and forgotten when unused for `ttl`."""

    def __init__(self, clock: Clock, capacity: int = CAPACITY, ttl: float = TTL) -> None:
        self._clock = clock
        self.capacity = capacity
        self.ttl = ttl
        self._owners: OrderedDict[str, tuple[Owner, float]] = OrderedDict()  # id -> (owner, last named)
        self.watcher: Callable[[str, Owner], None] | None = None  # told what this pod learned (the fleet)

    def learn(self, resource: str, owner: Owner, announce: bool = True) -> None:
        """`owner` created `resource`; `announce`: this pod learned it (not the fleet's message)."""
        if announce and self.watcher is not None:
            self.watcher(resource, owner)
        owners = self._owners
        owners[resource] = (owner, self._clock())
        owners.move_to_end(resource)
        while len(owners) > self.capacity:
            owners.popitem(last=False)

    def owner(self, resource: str) -> Owner | None:
        """The key that created `resource`, or None when it is not known (or forgotten)."""
        entry = self._owners.get(resource)
        if entry is None:
            return None
        now = self._clock()
        owner, named = entry
        if now - named > self.ttl:
            del self._owners[resource]
            return None
        self._owners[resource] = (owner, now)
        self._owners.move_to_end(resource)
        return owner

    def pin(self, path: str, body: bytes) -> tuple[str, Owner] | None:
        """The first resource a request names whose creator is known, with that creator."""
        if not self._owners:
            return None  # the usual case for chat traffic: nothing was ever created
        if b"_id" not in body and b"fileUri" not in body:
            body = b""  # no field that can name a resource: only the path is read
        for resource in referenced_ids(path, body):
            owner = self.owner(resource)
            if owner is not None:
                return resource, owner
        return None

    def __len__(self) -> int:
        return len(self._owners)
