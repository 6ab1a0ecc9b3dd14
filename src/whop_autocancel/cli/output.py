"""How every command prints, so that its output survives a terminal and a pipe.

A listing is a list of columns, each with a priority. Ids are never cut or wrapped: when the
width is short, columns are kept by priority while they fit and the others are hidden whole,
named in one footer line (`--wide` or `--json` shows everything). Only free text (an error, a
subject) is shortened, with `…`.

The table is plain aligned text, on a terminal and through a pipe alike: cells are separated
by two spaces (`awk -F'  +'` splits them even where a cell holds one space), there is no
box-drawing (it costs the width of a column and breaks `cut`), and the only styling, a bold
header, is dropped by rich when stdout is not a terminal (or NO_COLOR is set). What grep sees is
what the admin saw.

Times are UTC, ISO 8601 with their zone, to the second: `2026-12-05T06:12:03Z`, in tables, in
messages and in JSON (one token for awk; jq's `fromdateiso8601` and Python's `fromisoformat`
read it; sorting the text sorts the times).

`--json`: a listing prints JSON lines (one object per row, nothing else on stdout; no row, no
line); any other read command prints one JSON object.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.cells import cell_len
from rich.console import Console
from rich.text import Text

from whop_autocancel.clock import format_utc

GAP = "  "
FREE_TEXT_MAX = 80  # a free-text cell is cut here in any table (--json has the whole text)
FREE_TEXT_MIN = 12  # and may be shortened down to this to keep other columns
PIPE_WIDTH = 80  # through a pipe without COLUMNS

JsonOption = Annotated[
    bool,
    typer.Option("--json", help="Print JSON (JSON lines for a listing) instead of text."),
]
WideOption = Annotated[
    bool,
    typer.Option("--wide", help="Show every column, however wide the lines get."),
]

Row = Mapping[str, Any]

# Styles (the bold header) only on a terminal; rich drops them through a pipe or with NO_COLOR.
# Text is printed as it is: rich reads no markup (`[plans.…]` in an error stays) and no emoji
# codes (`:cd:` in a file name stays); a style is given with `Text`, never inside a string.
out = Console(highlight=False, markup=False, emoji=False)


@dataclass(frozen=True)
class Column:
    """One column of a listing: `key` names the row's field (the JSON key)."""

    header: str
    key: str
    priority: int = 50  # when the width is short, higher priorities are kept first
    identifier: bool = False  # an id: never cut, never wrapped (hidden whole, if at all)
    keep: bool = False  # never hidden (the id a follow-up command takes)
    free_text: bool = False  # may be shortened with an ellipsis
    right: bool = False  # numbers
    cell: Callable[[Row], str] | None = None  # the text, when it is not the field itself

    def __post_init__(self) -> None:
        if self.identifier and self.free_text:
            raise ValueError(f"column {self.header}: an id is never shortened")

    def text(self, row: Row) -> str:
        value = self.cell(row) if self.cell is not None else cell_text(row.get(self.key))
        line = " ".join(value.split()) if self.free_text else value.replace("\n", " ")
        if self.free_text:
            line = ellipsis(line, FREE_TEXT_MAX)
        return line or "-"


def cell_text(value: Any) -> str:
    """A JSON value as a table shows it: `-` for nothing, lists joined by commas."""
    if value is None or value == "" or value == []:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ", ".join(cell_text(item) for item in value)
    return str(value)


def ellipsis(text: str, width: int) -> str:
    """`text` cut to `width` terminal cells, ending in `…` when it was cut."""
    if cell_len(text) <= width:
        return text
    while text and cell_len(text) > width - 1:
        text = text[:-1]
    return text + "…"


def iso(moment: datetime | None) -> str | None:
    """A time for JSON and tables: `2026-12-05T06:12:03Z`; None stays None."""
    return format_utc(moment) if moment is not None else None


def output_width() -> int:
    """The width to fit: COLUMNS when set, else the terminal's, else (a pipe) 80."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if sys.stdout.isatty():
        return shutil.get_terminal_size((PIPE_WIDTH, 24)).columns
    return PIPE_WIDTH


@dataclass(frozen=True)
class Table:
    """A laid-out listing: the lines to print and the headers of the hidden columns."""

    lines: list[str]
    hidden: list[str]


def lay_out(
    columns: Sequence[Column], rows: Sequence[Row], *, width: int, wide: bool = False
) -> Table:
    """Fit `rows` into `width` cells: the `keep` columns, then each other column by priority
    (highest first) if it still fits with free text at its shortest, else it is hidden; then
    free text gets back the room left. `wide`: every column, at its full width. Ids are never
    cut, so a terminal narrower than the kept columns gets longer lines, never a cut id."""
    cells = [[column.text(row) for column in columns] for row in rows]
    natural = [
        max([cell_len(column.header), *(cell_len(line[i]) for line in cells)])
        for i, column in enumerate(columns)
    ]
    floor = [
        min(natural[i], max(FREE_TEXT_MIN, cell_len(column.header)))
        if column.free_text
        else natural[i]
        for i, column in enumerate(columns)
    ]
    shown = [i for i, column in enumerate(columns) if wide or column.keep]

    def needed(widths: Sequence[int]) -> int:
        return sum(widths[i] for i in shown) + len(GAP) * max(len(shown) - 1, 0)

    if not wide:
        others = [i for i, column in enumerate(columns) if not column.keep]
        for i in sorted(others, key=lambda i: (-columns[i].priority, i)):
            shown.append(i)
            if needed(floor) > width:
                shown.remove(i)
        shown.sort()
    widths = list(natural)
    excess = needed(widths) - width
    if not wide and excess > 0:
        for i in sorted(shown, key=lambda i: -natural[i]):
            if columns[i].free_text and excess > 0:
                cut = min(excess, widths[i] - floor[i])
                widths[i] -= cut
                excess -= cut

    def line(texts: Sequence[str]) -> str:
        parts = []
        for i in shown:
            text = texts[i]
            if columns[i].free_text:
                text = ellipsis(text, widths[i])
            pad = " " * (widths[i] - cell_len(text))
            parts.append(pad + text if columns[i].right else text + pad)
        return GAP.join(parts).rstrip()

    header = line([column.header for column in columns])
    return Table(
        lines=[header, *(line(texts) for texts in cells)],
        hidden=[columns[i].header for i in range(len(columns)) if i not in shown],
    )


def hidden_note(hidden: Sequence[str], width: int) -> str:
    """One line naming the hidden columns (the last ones counted, if all do not fit)."""
    for named in range(len(hidden), 0, -1):
        names = ", ".join(hidden[:named])
        if named < len(hidden):
            names += f" and {len(hidden) - named} more"
        note = f"Hidden: {names} (see --wide or --json)."
        if cell_len(note) <= width:
            return note
    return note


def prose(text: str, width: int) -> list[str]:
    """A sentence wrapped to `width` at spaces only: an id or address in it stays whole."""
    return textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False) or [""]


def print_table(
    columns: Sequence[Column],
    rows: Sequence[Row],
    *,
    title: str | None = None,
    wide: bool = False,
) -> Table:
    """Print a listing (its title, header, rows and, when columns were hidden, the footer)."""
    width = output_width()
    table = lay_out(columns, rows, width=width, wide=wide)
    for text in prose(title, width) if title else []:
        out.print(Text(text), soft_wrap=True)
    out.print(Text(table.lines[0], style="bold"), soft_wrap=True)
    for text in table.lines[1:]:
        out.print(Text(text), soft_wrap=True)
    if table.hidden:
        out.print(Text(hidden_note(table.hidden, width)), soft_wrap=True)
    return table


def say(text: str) -> None:
    """A sentence under a listing, wrapped to the listing's width at spaces only."""
    for line in prose(text, output_width()):
        out.print(Text(line), soft_wrap=True)


def print_json_lines(rows: Iterable[Row]) -> None:
    """One JSON object per line: what `jq -c`, `grep` and a loop of `json.loads` read."""
    for row in rows:
        sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def print_json(document: Row) -> None:
    sys.stdout.write(json.dumps(document, ensure_ascii=False, indent=2) + "\n")
    sys.stdout.flush()
