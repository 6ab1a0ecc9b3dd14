"""`not_searched`: a column hidden from the planner, as each database's SQL writes it (compiled,
not run: the query-plan tests run it on SQLite and PostgreSQL)."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Dialect

from whop_autocancel.db.base import not_searched
from whop_autocancel.mail.models import Email


def where_clause(dialect: Dialect) -> str:
    statement = select(Email.id).where(not_searched(Email.kind) == "delivery")
    compiled = str(statement.compile(dialect=dialect))
    return compiled.split("WHERE ", 1)[1]


def test_each_database_gets_the_column_in_a_form_no_index_answers() -> None:
    assert where_clause(sqlite.dialect()).startswith("+emails.kind = ")
    assert where_clause(postgresql.dialect()).startswith("(emails.kind || '') = ")
    assert where_clause(mysql.dialect()).startswith("emails.kind = ")  # (InnoDB's statistics)


def test_a_column_that_is_not_text_is_refused() -> None:
    with pytest.raises(TypeError, match="text column"):
        not_searched(Email.id)
