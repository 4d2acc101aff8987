"""Request bodies too large to keep in memory: spooled to disk, re-read for each attempt.

The file is an unlinked temporary file, so it is gone whatever way the request ends (a closed
connection, a cancelled handler, a killed process). Its first and last bytes are also kept in
memory, which is where a body names its model.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator

CHUNK = 256 * 1024  # read back in slices: memory stays flat whatever the body's size
EDGE = 64 * 1024  # bytes kept from each end, to find the model


class SpooledBody:
    def __init__(self, directory: str | None) -> None:
        self._file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 (closed by close())
        self.size = 0
        self.head = b""
        self._tail = bytearray()

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self.size += len(chunk)
        if len(self.head) < EDGE:
            self.head += chunk[: EDGE - len(self.head)]
        self._tail += chunk
        if len(self._tail) > 2 * EDGE:
            del self._tail[: len(self._tail) - EDGE]

    @property
    def tail(self) -> bytes:
        return bytes(self._tail[-EDGE:])

    def finish(self) -> None:
        """Everything is written: make it readable by position for every attempt."""
        self._file.flush()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body from its first byte, for one attempt (each attempt reads its own way through)."""
        fd = self._file.fileno()
        position = 0
        while position < self.size:
            data = os.pread(fd, min(CHUNK, self.size - position), position)
            if not data:
                raise OSError(f"the spooled request body ended at {position} of {self.size} bytes")
            position += len(data)
            yield data

    def close(self) -> None:
        self._file.close()
