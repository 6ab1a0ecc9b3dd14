"""Which log format a process writes, and what goes into it (logs.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import structlog

from whop_autocancel.logs import configure_logging, log_format


@pytest.mark.parametrize(
    ("explicit", "service", "terminal", "expected"),
    [
        (None, False, True, "console"),  # a command at a terminal
        (None, False, False, "json"),  # a command through a pipe or into a file
        (None, True, True, "json"),  # serve/worker keep JSON
        (None, True, False, "json"),
        ("json", False, True, "json"),  # LOG_FORMAT set: always honoured
        ("console", True, False, "console"),
    ],
)
def test_log_format(explicit: str | None, service: bool, terminal: bool, expected: str) -> None:
    assert log_format(explicit, service=service, terminal=terminal) == expected


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging sets the process's logging up: put it back as it was afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_uvicorns_color_message_is_not_logged(
    fmt: str,
    restore_logging: None,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    """uvicorn logs its message a second time, with ANSI colour codes, in the `color_message`
    field of the record (issue 13, item 6): neither format shows it; the message is kept."""
    # As in `serve` (uvicorn run with log_config=None): its loggers pass records to the root.
    # An in-process uvicorn of an earlier test (the simulator's) may have configured them.
    uvicorn_logger, error_logger = logging.getLogger("uvicorn"), logging.getLogger("uvicorn.error")
    monkeypatch.setattr(uvicorn_logger, "propagate", True)
    monkeypatch.setattr(uvicorn_logger, "handlers", [])
    levels = uvicorn_logger.level, error_logger.level
    uvicorn_logger.setLevel(logging.NOTSET)
    error_logger.setLevel(logging.NOTSET)
    request.addfinalizer(
        lambda: (uvicorn_logger.setLevel(levels[0]), error_logger.setLevel(levels[1]))
    )
    configure_logging("INFO", fmt)
    logging.getLogger("uvicorn.error").info(
        "Started server process [%d]",
        4242,
        extra={"color_message": "Started server process [\x1b[36m%d\x1b[0m]"},
    )
    logged = capsys.readouterr().err
    assert "Started server process [4242]" in logged
    assert "color_message" not in logged
    for escape_code in ("\x1b", "\\x1b", "\\u001b"):  # as written, by repr() or by JSON
        assert escape_code not in logged
