"""The service's log lines, captured as they are written: `configure_logging` pointed at a
buffer, each JSON line read back as a dict."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from whop_autocancel.logs import configure_logging


class LogLines:
    def __init__(self) -> None:
        self.stream = io.StringIO()

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        """Every line written so far (only those of `event`, when given), as dicts."""
        lines = [json.loads(line) for line in self.text.splitlines() if line.startswith("{")]
        return [line for line in lines if event is None or line.get("event") == event]


@contextmanager
def captured_logs(level: str = "INFO") -> Iterator[LogLines]:
    """Log as `serve` does (JSON lines) into a buffer; afterwards, back to stderr."""
    root = logging.getLogger()
    handlers, root_level = root.handlers[:], root.level
    lines = LogLines()
    configure_logging(level, "json", stream=lines.stream)
    try:
        yield lines
    finally:
        configure_logging("INFO", "json")
        root.handlers[:] = handlers
        root.setLevel(root_level)
