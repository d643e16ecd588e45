"""The package logger. No handlers are attached here; the CLI configures output."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

logger = logging.getLogger("pollinate")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, logger, message, and any ``extra`` fields.

    Used by the long-running commands (``pollinate serve``, ``pollinate edge run``) when they
    configure the ``pollinate`` logger; nothing here is attached at import.
    """

    _PLAIN = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
    converter = staticmethod(time.gmtime)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in self._PLAIN:
                entry[key] = value
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def log_to_stderr(*, json_lines: bool = True, level: int = logging.INFO) -> None:
    """Send the ``pollinate`` logger to stderr, as JSON lines or plain text (long-running
    commands call this; nothing is configured at import)."""
    import sys

    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
