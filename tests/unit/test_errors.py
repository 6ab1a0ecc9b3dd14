"""A driver's error as the one line a person reads (issue 13, item 5)."""

from __future__ import annotations

from sqlalchemy.exc import OperationalError

from whop_autocancel.errors import error_line, one_line


def test_sqlalchemys_trailers_are_dropped_and_the_drivers_hint_kept() -> None:
    driver = Exception(
        'connection to server at "127.0.0.1", port 1 failed: Connection refused\n'
        "\tIs the server running on that host and accepting TCP/IP connections?\n"
    )
    error = OperationalError("SELECT secret\nFROM items", {"content": "KEY-1234"}, driver)
    assert "Background on this error" in str(error)  # what SQLAlchemy appends
    assert error_line(error) == (
        'OperationalError: (builtins.Exception) connection to server at "127.0.0.1", port 1 '
        "failed: Connection refused; Is the server running on that host and accepting "
        "TCP/IP connections?"
    )


def test_lines_are_joined_so_that_each_stays_readable() -> None:
    assert one_line("2 settings to fix:\n  A is not set\n  B: must be a number\n") == (
        "2 settings to fix: A is not set; B: must be a number"
    )
    assert one_line("Refused.\nTry again") == "Refused. Try again"
    assert one_line("one line") == "one line"


def test_a_long_error_is_cut() -> None:
    line = error_line(ValueError("x" * 1000))
    assert len(line) == 300
    assert line.endswith("…")
