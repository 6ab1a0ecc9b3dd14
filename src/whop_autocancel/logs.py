"""Structured logs (structlog): one JSON line per step, with ids, never secrets; always on
stderr, so a command's stdout holds only its output."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TextIO

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


# Our own lines go through structlog alone, straight to the stream: through the standard
# library's logging (a LogRecord, its handler's lock, a ProcessorFormatter) one cost 50 µs of
# CPU, this way 15 µs, and a purchase writes about fifteen. What configure_logging chose is
# read on every line (the level, the renderer, the stream), so configuring again, as every
# command does, takes effect on loggers already in use.
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}


class _Output:
    """Where our lines go, as configure_logging left it."""

    level = logging.INFO
    renderer: structlog.types.Processor = structlog.processors.JSONRenderer()
    stream: TextIO | None = None  # None: the process's stderr at the time of each line
    lock = threading.Lock()


def _at_level(
    _logger: object, method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    if _LEVELS.get(method, logging.INFO) < _Output.level:
        raise structlog.DropEvent
    if method == "exception":
        event.setdefault("exc_info", True)
    return event


def _render(logger: object, method: str, event: MutableMapping[str, Any]) -> Any:
    return _Output.renderer(logger, method, event)


class _LineWriter:
    """structlog's logger: writes each rendered line whole, one thread at a time. A stream
    that is gone (closed, a broken pipe) loses the line, as the standard library's handlers
    do, rather than failing the work that logged it."""

    def _write(self, message: str) -> None:
        stream = _Output.stream or sys.stderr
        with _Output.lock:
            try:
                stream.write(message + "\n")
                stream.flush()
            except (OSError, ValueError):
                pass

    debug = info = warning = warn = error = exception = critical = fatal = msg = _write


def configure_logging(
    level: str = "INFO",
    fmt: str = "json",
    *,
    colors: bool = False,
    stream: TextIO | None = None,
) -> None:
    """Log to stderr in `fmt` (`json` or `console`; `colors` only for a console on a
    terminal). `stream`: another place for the lines (the tests, a benchmark)."""
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=colors)
    )
    _Output.level = logging.getLevelNamesMapping()[level.upper()]
    _Output.renderer = renderer
    _Output.stream = stream
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[_at_level, *shared, structlog.processors.format_exc_info, _render],
        logger_factory=lambda *_: _LineWriter(),
        wrapper_class=structlog.BoundLogger,
        cache_logger_on_first_use=True,
    )
    # Other libraries' lines (uvicorn, huey, alembic) come through the standard library.
    handler = logging.StreamHandler(stream or sys.stderr)
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
