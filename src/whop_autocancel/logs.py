"""Structured logs (structlog): one JSON line per step, with ids, never secrets; always on
stderr, so a command's stdout holds only its output."""

from __future__ import annotations

import logging
import sys

import structlog


def log_format(explicit: str | None, *, service: bool, terminal: bool) -> str:
    """The format to log in: LOG_FORMAT when it was set; otherwise JSON for the services
    (`serve`, `worker`: their logs go to a journal or a collector) and for a command whose
    stderr is not a terminal, and console lines for a command run at a terminal (a JSON line
    in the middle of a table is noise)."""
    if explicit is not None:
        return explicit
    return "console" if terminal and not service else "json"


def configure_logging(level: str = "INFO", fmt: str = "json", *, colors: bool = False) -> None:
    """Log to stderr in `fmt` (`json` or `console`; `colors` only for a console on a
    terminal)."""
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=colors)
    )
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Third-party chatter stays at warnings unless we debug.
    quiet = logging.DEBUG if level == "DEBUG" else logging.WARNING
    for name in ("huey", "huey.consumer", "uvicorn.access", "httpx", "alembic", "mail.log"):
        logging.getLogger(name).setLevel(quiet)
