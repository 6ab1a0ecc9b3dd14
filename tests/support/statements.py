"""What the database was sent: the statements an engine runs inside a block, and how SQLite
plans one. For tests that pin how much database work a path does."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event
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
