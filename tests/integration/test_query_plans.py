"""Every statement a purchase makes finds its rows by their key on SQLite, however its indexes
happen to be ordered.

Without statistics (nobody runs ANALYZE) SQLite's planner cannot tell a key from a status:
for `WHERE order_id = ? AND kind = 'delivery'` an index on `order_id` and one on `kind` look
equally good, and the tie goes to the index created last. Which one that is differs between
installs (a batch migration re-creates a table's indexes in the order of a Python set), and
where it is the status (or kind) index, the statement walks every row of that status: every
delivery email, every scheduled cancellation, every waiting webhook (eight lookups by id lose
to it too). A flash sale then costs each purchase more than the one before it.

So this test puts the worst order in place (each low-cardinality index dropped and created
again, last), runs purchases of a message and of a stock item from payment to the webhook of
the cancelled membership, and asks SQLite for the plan of every statement that was sent: none
that names a key of a table may walk that table's status or kind index instead.

Real parts: SQLite (the planner under test), the Whop simulator over HTTP, an aiosmtpd sink."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, Index, Table, select, text

from support.harness import (
    MESSAGE_PLAN,
    STOCK_CATALOG,
    STOCK_PLAN,
    STOCK_POOL,
    drain,
    wait_for,
)
from support.shop import Shop, open_shop
from support.statements import recorded, sqlite_plan
from whop_autocancel.admin.stock import import_stock
from whop_autocancel.cancellation.models import Cancellation
from whop_autocancel.clock import FrozenClock
from whop_autocancel.db.base import Base
from whop_autocancel.delivery.stock import items_for
from whop_autocancel.simulator import SimulatorServer

# Columns that hold one of a handful of values (a status, a kind, a plan, a stock pool): an
# index on them finds a backlog, not a row.
LOW_CARDINALITY = frozenset({"status", "kind", "plan_id", "pool", "waiting_for_stock"})
# A message and a stock item each, their webhooks stored before any is applied: one apply
# chunk of eight events.
PLANS = (MESSAGE_PLAN, STOCK_PLAN, MESSAGE_PLAN, STOCK_PLAN)
# `table.column = ?` or `table.column IN (` in a statement's text (SQLAlchemy qualifies
# every column of a one-table statement with its table's name).
TERM = re.compile(r"\b(\w+)\.(\w+) (?:= \?|IN \()")


@pytest.fixture
def shop(tmp_path: Path, clock: FrozenClock, simulator: SimulatorServer) -> Iterator[Shop]:
    (tmp_path / "catalog.toml").write_text(STOCK_CATALOG)
    yield from open_shop(tmp_path, clock, simulator)  # (SQLite: the default)


def low_cardinality_indexes() -> dict[str, Index]:
    """Every index whose first column is a status or a kind, by name."""
    return {
        str(index.name): index
        for table in Base.metadata.tables.values()
        for index in table.indexes
        if index.columns.values()[0].name in LOW_CARDINALITY
    }


def key_columns(table: Table) -> set[str]:
    """The columns of `table` that find one row or a few: its primary key, a unique column,
    or the first column of an index that does not lead with a status."""
    keys = {column.name for column in table.primary_key.columns}
    keys |= {column.name for column in table.columns if column.unique}
    keys |= {index.columns.values()[0].name for index in table.indexes}
    return keys - LOW_CARDINALITY


def create_last(engine: Engine, indexes: dict[str, Index]) -> None:
    """Drop each index and create it again, so that the planner's ties go to it."""
    with engine.begin() as connection:
        for name, index in indexes.items():
            table = index.table
            assert table is not None
            columns = ", ".join(column.name for column in index.columns)
            connection.execute(text(f"DROP INDEX {name}"))
            connection.execute(text(f"CREATE INDEX {name} ON {table.name} ({columns})"))


def walks_a_backlog(engine: Engine, statement: str, parameters: object) -> str | None:
    """Why this statement's plan is wrong (None: it is not): it names a key of a table and
    still searches that table by a status or kind index."""
    named = TERM.findall(statement)
    indexes = low_cardinality_indexes()
    for step in sqlite_plan(engine, statement, parameters):
        for name, index in indexes.items():
            if f"INDEX {name} " not in f"{step} ":
                continue
            table = index.table
            assert isinstance(table, Table)
            keys = sorted({c for t, c in named if t == table.name} & key_columns(table))
            if keys:
                return f"{step}: though it names {table.name}.{', '.join(keys)}"
    return None


def cancellation_ids(shop: Shop) -> list[int]:
    with shop.runtime.database.transaction() as session:
        return list(session.scalars(select(Cancellation.id)))


def test_no_statement_of_a_purchase_walks_a_status_index_past_its_key(shop: Shop) -> None:
    engine = shop.runtime.database.engine
    indexes = low_cardinality_indexes()
    assert {"ix_emails_kind", "ix_cancellations_status", "ix_webhook_events_status"} <= set(indexes)
    create_last(engine, indexes)
    import_stock(shop.runtime, STOCK_POOL, items_for([f"user{n}:pass{n}" for n in range(3)]))
    shop.smtp_up()
    whop = shop.simulator.state
    with recorded(engine) as sent:
        purchases = [
            whop.create_purchase(plan, email=f"buyer{n}@example.com")
            for n, plan in enumerate(PLANS)
        ]
        wait_for(lambda: whop.pending_webhooks() == 0)
        drain(shop.runtime)  # apply, deliver, the emails
        shop.clock.advance(6.0)  # past CANCEL_DELAY
        for cancellation_id in cancellation_ids(shop):
            shop.runtime.cancellations.run(cancellation_id)  # Whop's answer, the stop's checks
        shop.time_passes(2.0)  # the sweeps
        wait_for(lambda: whop.pending_webhooks() == 0)
        drain(shop.runtime)  # the webhooks of the cancelled memberships
    assert [shop.membership_status(purchase) for purchase in purchases] == ["canceled"] * len(PLANS)
    statements = {
        statement: parameters
        for statement, parameters in sent
        if statement.lstrip().split()[0].upper() in ("SELECT", "UPDATE", "DELETE")
    }
    assert len(statements) > 20  # the whole purchase was recorded
    wrong = [
        f"{reason}\n    {' '.join(statement.split())[:300]}"
        for statement, parameters in statements.items()
        if (reason := walks_a_backlog(engine, statement, parameters)) is not None
    ]
    assert wrong == [], "\n".join(wrong)
