"""Redaction of echoed secrets: providers sometimes quote the key back in an error message."""

from __future__ import annotations

from collections.abc import Iterable

PIECE = 8  # any run of this many characters of a secret counts as a leak
MASK = b"[redacted]"


MAX_LEARNED = 256  # secrets learned at run time (signatures, refreshed tokens), newest kept


class Redactor:
    """Replaces every run of PIECE or more characters of any secret with a mask."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._configured = set(secrets)
        self._learned: dict[str, None] = {}  # insertion-ordered: the oldest is dropped first
        self._counts: dict[bytes, int] = {}  # piece -> how many secrets hold it
        for secret in self._configured:
            self._count(secret, 1)
        self._pieces: tuple[bytes, ...] | None = tuple(self._counts)  # None: to rebuild

    def learn(self, secret: str) -> None:
        """Mask `secret` too from now on: a value a credential step produced."""
        if secret in self._configured or secret in self._learned:
            return
        self._learned[secret] = None
        self._count(secret, 1)
        if len(self._learned) > MAX_LEARNED:
            oldest = next(iter(self._learned))
            del self._learned[oldest]
            self._count(oldest, -1)
        self._pieces = None

    def _count(self, secret: str, step: int) -> None:
        counts = self._counts
        for piece in _pieces(secret):
            left = counts.get(piece, 0) + step
            if left > 0:
                counts[piece] = left
            else:
                counts.pop(piece, None)

    def __call__(self, data: bytes) -> bytes:
        if not self._counts:
            return data
        return self.mask(data, self.spans(data))

    def mask(self, data: bytes, spans: list[tuple[int, int]]) -> bytes:
        if not spans:
            return data
        out = bytearray()
        last = 0
        for start, end in spans:
            out += data[last:start] + MASK
            last = end
        out += data[last:]
        return bytes(out)

    def spans(self, data: bytes) -> list[tuple[int, int]]:
        pieces = self._pieces
        if pieces is None:
            pieces = self._pieces = tuple(self._counts)
        hits = []
        for piece in pieces:
            at = data.find(piece)
            while at != -1:
                hits.append(at)
                at = data.find(piece, at + 1)
        spans: list[tuple[int, int]] = []
        for at in sorted(hits):
            if spans and at <= spans[-1][1]:
                spans[-1] = (spans[-1][0], max(spans[-1][1], at + PIECE))
            else:
                spans.append((at, at + PIECE))
        return spans

    def text(self, value: str) -> str:
        return self(value.encode()).decode("utf-8", "replace")


def _pieces(secret: str) -> set[bytes]:
    raw = secret.encode()
    return {raw[start : start + PIECE] for start in range(0, max(len(raw) - PIECE + 1, 0))}


class BodyScrubber:
    """Redacts a body that arrives in chunks, holding back just enough to catch a secret that
    straddles two chunks. For error bodies, whose timing does not matter."""

    def __init__(self, redact: Redactor) -> None:
        self.redact = redact
        self.held = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self.held + chunk if self.held else chunk
        spans = self.redact.spans(data)
        cut = max(len(data) - (PIECE - 1), 0)
        for start, end in spans:
            if start < cut < end:
                cut = end  # never split a found secret between what is sent and what is held
        self.held = data[cut:]
        return self.redact.mask(data[:cut], [(s, e) for s, e in spans if e <= cut])

    def flush(self) -> bytes:
        data, self.held = self.held, b""
        return self.redact(data)


class EventScrubber:
    """Redacts the events of a success stream that report an error (Anthropic's `event: error`
    can quote the key). Other events pass untouched and undelayed."""

    def __init__(self, redact: Redactor) -> None:
        self.redact = redact

    def feed(self, chunk: bytes) -> bytes:
        return self.redact(chunk) if b"error" in chunk else chunk

    def flush(self) -> bytes:
        return b""
