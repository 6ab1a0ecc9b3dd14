"""What the database was sent: the statements an engine runs inside a block, and how SQLite
plans one. For tests that pin how much database work a path does."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Index, event, text
from sqlalchemy.engine import Engine


@contextmanager
def recorded(engine: Engine) -> Iterator[list[tuple[str, Any]]]:
    """Every statement `engine` sends while the block runs, with its parameters, in order."""
    sent: list[tuple[str, Any]] = []

    def record(conn: object, cursor: object, statement: str, parameters: Any, *_: object) -> None:
        sent.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", record)


def verbs(sent: list[tuple[str, Any]], words: int = 1) -> list[str]:
    """Each statement's first `words` words, upper-cased: `SELECT`, `INSERT INTO EMAILS`."""
    return [" ".join(statement.split()[:words]).upper() for statement, _ in sent]


def sqlite_plan(engine: Engine, statement: str, parameters: Any) -> list[str]:
    """SQLite's `EXPLAIN QUERY PLAN` of `statement`: one line per step."""
    with engine.connect() as connection:
        return [
            str(step[-1])
            for step in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)
        ]


class Steps:
    """The count `sqlite_steps` keeps; `paused()` leaves out what runs inside it."""

    def __init__(self) -> None:
        self.count = 0
        self.counting = True

    def tick(self) -> int:
        if self.counting:
            self.count += 1
        return 0  # go on

    @contextmanager
    def paused(self) -> Iterator[None]:
        self.counting = False
        try:
            yield
        finally:
            self.counting = True


@contextmanager
def sqlite_steps(engine: Engine) -> Iterator[Steps]:
    """The work SQLite does for `engine` while the block runs, counted, not timed: the
    virtual machine's instructions (its progress handler, called at each one: SQLite counts
    them per statement, so a coarser count would miss short statements), summed over every
    connection the block checks out. The same statements over the same rows always take the
    same steps, so a path that reads rows it does not need shows as a count that grows with
    them."""
    steps = Steps()

    def checked_out(dbapi_connection: Any, *_: object) -> None:
        dbapi_connection.set_progress_handler(steps.tick, 1)

    def checked_in(dbapi_connection: Any, *_: object) -> None:
        dbapi_connection.set_progress_handler(None, 0)

    event.listen(engine, "checkout", checked_out)
    event.listen(engine, "checkin", checked_in)
    try:
        yield steps
    finally:
        event.remove(engine, "checkout", checked_out)
        event.remove(engine, "checkin", checked_in)


def create_last(engine: Engine, indexes: dict[str, Index]) -> None:
    """Drop each index and create it again, so that the planner's ties go to it."""
    with engine.begin() as connection:
        for name, index in indexes.items():
            table = index.table
            assert table is not None
            columns = ", ".join(column.name for column in index.columns)
            connection.execute(text(f"DROP INDEX {name}"))
            connection.execute(text(f"CREATE INDEX {name} ON {table.name} ({columns})"))
