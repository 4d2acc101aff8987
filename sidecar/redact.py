"""Redaction of echoed secrets: providers sometimes quote the key back in an error message."""

from __future__ import annotations

from collections.abc import Iterable

PIECE = 8  # any run of this many characters of a secret counts as a leak
MASK = b"[redacted]"


class Redactor:
    """Replaces every run of PIECE or more characters of any secret with a mask."""

    def __init__(self, secrets: Iterable[str]) -> None:
        pieces: dict[bytes, int] = {}
        for secret in secrets:
            raw = secret.encode()
            for start in range(0, max(len(raw) - PIECE + 1, 0)):
                pieces[raw[start : start + PIECE]] = 1
        self._pieces = tuple(pieces)

    def __call__(self, data: bytes) -> bytes:
        if not self._pieces:
            return data
        spans = self._spans(data)
        if not spans:
            return data
        out = bytearray()
        last = 0
        for start, end in spans:
            out += data[last:start] + MASK
            last = end
        out += data[last:]
        return bytes(out)

    def _spans(self, data: bytes) -> list[tuple[int, int]]:
        hits = []
        for piece in self._pieces:
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
