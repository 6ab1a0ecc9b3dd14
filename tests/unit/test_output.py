"""The listing layout and the time format of the commands (cli/output.py), as pure functions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from whop_autocancel.cli.output import Column, hidden_note, iso, lay_out

COLUMNS = (
    Column("ID", "id", priority=100, identifier=True, keep=True),
    Column("Email", "email", priority=80),
    Column("Member", "member", priority=70, identifier=True),
    Column("Error", "error", priority=60, free_text=True),
    Column("N", "n", priority=10, right=True),
)
ROWS = [
    {
        "id": "ord_" + "A" * 24,
        "email": "a@example.com",
        "member": "mem_1",
        "error": "x" * 90,
        "n": 3,
    },
    {"id": "ord_" + "B" * 24, "email": None, "member": "mem_22", "error": None, "n": 12},
]


def test_everything_fits_when_there_is_room() -> None:
    table = lay_out(COLUMNS, ROWS, width=200)
    assert table.hidden == []
    header, first, second = table.lines
    assert header.split() == ["ID", "Email", "Member", "Error", "N"]
    assert first.split()[-1] == "3"
    assert second.split()[1:3] == ["-", "mem_22"]  # nothing is "-"
    assert len(first.split()[3]) == 80  # free text is cut at 80 cells even with room
    assert first.split()[3].endswith("…")


def test_a_narrow_width_hides_whole_columns_by_priority_and_cuts_only_free_text() -> None:
    table = lay_out(COLUMNS, ROWS, width=66)
    assert all(len(line) <= 66 for line in table.lines)
    assert table.hidden == ["N"]
    header, first, _ = table.lines
    assert header.split() == ["ID", "Email", "Member", "Error"]
    assert first.startswith("ord_" + "A" * 24 + "  ")
    assert first.endswith("…")


def test_a_column_that_does_not_fit_gives_way_to_later_ones_that_do() -> None:
    table = lay_out(COLUMNS, ROWS, width=47)
    assert table.hidden == ["Member", "Error"]
    assert table.lines[0].split() == ["ID", "Email", "N"]


def test_a_kept_id_is_never_cut_even_when_nothing_fits() -> None:
    table = lay_out(COLUMNS, ROWS, width=10)
    assert table.hidden == ["Email", "Member", "Error", "N"]
    assert [line.strip() for line in table.lines[1:]] == [row["id"] for row in ROWS]


def test_wide_shows_every_column_whole() -> None:
    table = lay_out(COLUMNS, ROWS, width=10, wide=True)
    assert table.hidden == []
    assert table.lines[0].split() == ["ID", "Email", "Member", "Error", "N"]


def test_the_hidden_note_is_one_line_within_the_width() -> None:
    names = ["Email", "Membership", "Cancellation", "Created", "Plan", "Payment", "Paid"]
    assert hidden_note(names[:2], 80) == "Hidden: Email, Membership (see --wide or --json)."
    note = hidden_note(names, 60)
    assert len(note) <= 60
    assert note.startswith("Hidden: Email, ")
    assert " more (see --wide or --json)." in note


def test_times_are_utc_iso_8601_with_their_zone() -> None:
    moment = datetime(2026, 12, 5, 7, 12, 3, 999999, tzinfo=timezone(timedelta(hours=1)))
    assert iso(moment) == "2026-12-05T06:12:03Z"
    assert datetime.fromisoformat(iso(moment) or "") == datetime(2026, 12, 5, 6, 12, 3, tzinfo=UTC)
    assert iso(None) is None
