"""Declarative base and the column types every table shares."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, DateTime, Dialect, MetaData, String, Text
from sqlalchemy.dialects import mysql
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, QueryableAttribute
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.visitors import InternalTraversal
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Stored as naive UTC (every backend can), returned as aware UTC (what the code compares)."""

    impl = DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime())

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC)


# Webhook bodies reach 1 MiB and emails can be long: MariaDB's TEXT stops at 64 KiB.
LongText = Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class _NotSearched(ColumnElement[Any]):
    """A column that SQLite's planner may not look up in an index: `+column` (the documented
    way to take a term out of its choice), the column as it is elsewhere."""

    inherit_cache = True
    _traverse_internals = [("column", InternalTraversal.dp_clauseelement)]

    def __init__(self, column: ColumnElement[Any]) -> None:
        self.column = column
        self.type = column.type


@compiles(_NotSearched)
def _column(element: _NotSearched, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.column, **kw)


@compiles(_NotSearched, "sqlite")
def _column_not_searched(element: _NotSearched, compiler: SQLCompiler, **kw: Any) -> str:
    return "+" + compiler.process(element.column, **kw)


@compiles(_NotSearched, "postgresql")
def _text_not_searched(element: _NotSearched, compiler: SQLCompiler, **kw: Any) -> str:
    # The same value, as an expression no index is built on.
    return "(" + compiler.process(element.column, **kw) + " || '')"


def not_searched(column: ColumnElement[Any] | QueryableAttribute[Any]) -> ColumnElement[Any]:
    """`column` in a condition that SQLite must not answer from an index on it. Without
    statistics (nobody runs ANALYZE) its planner takes `column IS NULL` on a unique index for
    a lookup of one row, where it is every row without a value (every order not paid: all the
    checkouts nobody paid, for ever), and prefers it to the index of the key the statement
    names. Where two columns of few values are both tested (a status and a plan), it leaves
    SQLite the index meant (the status's: the few rows in that state), not a tie it breaks by
    whichever index was created last (the plan's: every row of the plan ever). In a `GROUP
    BY` of a kind, it keeps SQLite from walking that column's whole index for its order
    instead of the few rows the condition finds.

    PostgreSQL has the same blind spot until its statistics arrive (autovacuum's first round
    after a table grew, or never where it is off): it guesses one row in two hundred for
    `kind = 'delivery'` and ANDs that whole index into a lookup by key. There the column is
    `(column || '')`: a text column only (every one given here is). MariaDB keeps statistics
    of its own (InnoDB's, recomputed as the rows change) and sees the column as it is."""
    element = column.__clause_element__() if isinstance(column, QueryableAttribute) else column
    if not isinstance(element.type, String):  # (PostgreSQL's form appends a text)
        raise TypeError(f"not_searched takes a text column, not {element.type!r}")
    return _NotSearched(element)
