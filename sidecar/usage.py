"""Token usage read from an answer as it streams past, without buffering it.

The usage of JSON answers and of the final SSE events sits at the end of the stream (Anthropic
also reports input tokens in its first event), so only the first chunk and the last few are
kept, by reference, and searched once the stream is done.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Mapping

_COUNTS = re.compile(
    rb'"(prompt_tokens|completion_tokens|input_tokens|output_tokens|promptTokenCount|candidatesTokenCount)"\s*:\s*(\d+)'
)
_KIND = {
    b"prompt_tokens": "prompt",
    b"input_tokens": "prompt",
    b"promptTokenCount": "prompt",
    b"completion_tokens": "completion",
    b"output_tokens": "completion",
    b"candidatesTokenCount": "completion",
}
_TAIL_CHUNKS = 4
_TAIL_BYTES = 16384


class UsageTail:
    def __init__(self) -> None:
        self.head: bytes | None = None
        self.tail: deque[bytes] = deque(maxlen=_TAIL_CHUNKS)

    @classmethod
    def for_response(cls, headers: Mapping[str, str]) -> UsageTail | None:
        content_type = headers.get("content-type", "")
        if "json" in content_type or "event-stream" in content_type:
            return cls()
        return None

    def feed(self, chunk: bytes) -> None:
        if self.head is None:
            self.head = chunk
        self.tail.append(chunk)  # the first chunk too: a whole answer may come in one read

    def counts(self) -> dict[str, int]:
        """The last value reported for each kind (cumulative in every provider's stream)."""
        found: dict[str, int] = {}
        tail = self.tail
        if len(tail) == 1 and tail[0] is self.head:  # a one-chunk answer: search it once
            parts: tuple[bytes, ...] = (self.head[:_TAIL_BYTES], self.head[-_TAIL_BYTES:])
            if len(self.head) <= _TAIL_BYTES:
                parts = (self.head,)
        else:
            parts = ((self.head or b"")[:_TAIL_BYTES], b"".join(tail)[-_TAIL_BYTES:])
        for part in parts:
            for name, value in _COUNTS.findall(part):
                found[_KIND[name]] = int(value)
        return found
