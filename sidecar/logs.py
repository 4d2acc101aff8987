"""One JSON object per log line; secrets that reach a message are redacted on the way out."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable

Redact = Callable[[str], str]


class JsonFormatter(logging.Formatter):
    def __init__(self, redact: Redact | None = None) -> None:
        super().__init__()
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            line.update(fields)
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        text = json.dumps(line, default=str)
        # Access lines are built from names and numbers only; anything else may quote an
        # upstream or a library message, so it is searched for secrets.
        if self.redact is not None and record.name != "keymux.access":
            text = self.redact(text)
        return text


def setup_logging(level: str, redact: Redact | None = None) -> JsonFormatter:
    formatter = JsonFormatter(redact)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").disabled = True
    return formatter
