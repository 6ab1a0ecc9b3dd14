"""`insert_once`: a row inserted once whatever the race, on every backend. On SQLite and
PostgreSQL one `INSERT … ON CONFLICT DO NOTHING RETURNING` (no savepoint, no flush of its
own), on MariaDB a savepoint: the same answers, the same session afterwards."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from support.calls import python_calls
from support.statements import recorded, verbs
from whop_autocancel.cancellation.models import Cancellation
from whop_autocancel.db.engine import Database, insert_once
from whop_autocancel.orders.models import Order
from whop_autocancel.schema.migrate import upgrade


def cancellation(order_id: str, now: datetime, token: str) -> Cancellation:
    return Cancellation(
        order_id=order_id,
        status="scheduled",
        idempotency_token=token,
        generation_started_at=now,
        next_attempt_at=now,
        created_at=now,
        updated_at=now,
    )


def test_a_row_goes_in_once_and_joins_the_session_as_stored(database_url: str) -> None:
    database = Database(database_url)
    upgrade(database)  # (the server databases are migrated already: a no-op there)
    now = datetime.now(UTC).replace(microsecond=0)
    try:
        with database.transaction() as session:
            # Not flushed yet: the row inserted next refers to it (a foreign key).
            session.add(Order(id="ord_Once1", status="pending", created_at=now, order_metadata={}))
            first = cancellation("ord_Once1", now, "token-1")
            assert insert_once(session, first)
            # Every column as the database stored it, its defaults and its new id included.
            assert first.id is not None
            assert (first.attempts, first.generation, first.lease_until) == (0, 1, None)
            assert session.get(Cancellation, first.id) is first
            # The same unique key again: a plain False, nothing changed, the transaction usable.
            assert not insert_once(session, cancellation("ord_Once1", now, "token-2"))
            first.attempts = 3  # tracked like any row the session read
        with database.transaction() as session:
            rows = session.scalars(select(Cancellation)).all()
            assert [(row.order_id, row.idempotency_token, row.attempts) for row in rows] == [
                ("ord_Once1", "token-1", 3)
            ]
    finally:
        database.dispose()


def test_sqlite_and_postgresql_insert_in_one_statement(database_url: str) -> None:
    """What every delivery pays three times (its two emails, its cancellation): one INSERT,
    no savepoint around it."""
    database = Database(database_url)
    upgrade(database)
    if database.backend not in ("sqlite", "postgresql"):
        database.dispose()
        pytest.skip("MariaDB has no ON CONFLICT DO NOTHING: a savepoint there")
    now = datetime.now(UTC).replace(microsecond=0)
    try:
        with database.transaction() as session:
            session.add(Order(id="ord_Once2", status="pending", created_at=now, order_metadata={}))
            session.flush()
            with recorded(database.engine) as sent:
                assert insert_once(session, cancellation("ord_Once2", now, "token-1"))
                assert not insert_once(session, cancellation("ord_Once2", now, "token-2"))
        assert verbs(sent, 3) == ["INSERT INTO CANCELLATIONS", "INSERT INTO CANCELLATIONS"]
    finally:
        database.dispose()


def test_a_row_inserted_once_costs_about_what_a_read_of_it_costs(tmp_path: Path) -> None:
    """Each delivery inserts three rows this way (its two emails, its cancellation): the row
    joins the session with every column as stored without an attribute event for each
    column, and its statement and where each column goes are worked out once. Counted in
    function calls (the profiler hook), beyond a transaction that reads one row instead:
    92 before, 51 after, for this table of fourteen columns."""
    database = Database(f"sqlite:///{tmp_path / 'service.db'}")
    upgrade(database)
    now = datetime.now(UTC).replace(microsecond=0)
    database.run(
        lambda s: s.add(Order(id="ord_Once3", status="pending", created_at=now, order_metadata={}))
    )
    tokens = iter(range(1_000))
    read = select(Order.id).where(Order.id == "ord_Once3")

    def insert() -> None:
        row = cancellation("ord_Once3", now, f"token-{next(tokens)}")
        database.run(lambda session: insert_once(session, row), durable=False)

    def read_one() -> None:
        database.run(lambda session: session.execute(read).first(), durable=False)

    try:
        for work in (insert, read_one):
            work()
            work()
        assert python_calls(insert) - python_calls(read_one) <= 70
    finally:
        database.dispose()
