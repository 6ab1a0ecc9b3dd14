"""Which log format a process writes (logs.py)."""

from __future__ import annotations

import pytest

from whop_autocancel.logs import log_format


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
