"""The root of every exception the service raises on purpose, with an actionable message."""

from __future__ import annotations

# Where a driver's message stops telling a merchant anything: SQLAlchemy appends the
# statement, its parameters (which may hold data) and a link to its own documentation.
_TRAILERS = ("[SQL: ", "[parameters: ", "(Background on this error at: ")
_MAX_ERROR_LINE = 300


class WhopAutocancelError(Exception):
    """Base class of the service's own errors."""


class ConfigurationError(WhopAutocancelError):
    """A setting or the catalog is missing or invalid: start-up stops with this one line."""


def one_line(text: str) -> str:
    """`text` on one line, for output that is one line per item (`check`): its lines joined
    with `; ` (a space after one that ends in punctuation), so that a driver's hint on its
    second line or a list of settings stays; SQLAlchemy's trailers (above) dropped."""
    joined = ""
    for raw in text.strip().splitlines():
        line = raw.strip()
        if line.startswith(_TRAILERS):
            break
        if line:
            joined += ("" if not joined else " " if joined[-1] in ":;,." else "; ") + line
    return joined


def error_line(error: BaseException) -> str:
    """`Type: message` on one line, for a driver's or a library's error shown to a person
    (a long one is cut with `…`)."""
    line = f"{type(error).__name__}: {one_line(str(error))}"
    return line if len(line) <= _MAX_ERROR_LINE else line[: _MAX_ERROR_LINE - 1] + "…"
