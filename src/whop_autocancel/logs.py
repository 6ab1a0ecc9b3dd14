"""Structured logs (structlog): one JSON line per step, with ids, never secrets; always on
stderr, so a command's stdout holds only its output."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import structlog


def log_format(explicit: str | None, *, service: bool, terminal: bool) -> str:
    """The format to log in: LOG_FORMAT when it was set; otherwise JSON for the services
    (`serve`, `worker`: their logs go to a journal or a collector) and for a command whose
    stderr is not a terminal, and console lines for a command run at a terminal (a JSON line
    in the middle of a table is noise)."""
    if explicit is not None:
        return explicit
    return "console" if terminal and not service else "json"


def drop_color_message(
    _logger: object, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """uvicorn logs each of its lines a second time, with ANSI colour codes, in the record's
    `color_message` extra (for its own formatter): the line is already there as the event."""
    event.pop("color_message", None)
    return event


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
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder(), drop_color_message],
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


# The access log (ACCESS_LOG=true) ----------------------------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_LOGGED_PATH = 200  # a path longer than this is cut (a client chooses it)

access_log = structlog.get_logger("whop_autocancel.access")


class AccessLog:
    """ASGI middleware: one `http_request` line per HTTP request, once it is answered, with
    the method, the path (never the query string: it may hold a token), the status, the
    duration in milliseconds and the client's address (as the proxy headers give it)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500  # what the server answers if the app fails before it starts a response

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            client = scope.get("client")
            path = str(scope.get("path", ""))
            access_log.info(
                "http_request",
                method=scope.get("method"),
                path=path[:MAX_LOGGED_PATH],
                status=status,
                duration_ms=round((time.monotonic() - started) * 1000, 1),
                client=client[0] if client else None,
            )
