"""What one transaction costs the engine on SQLite, the embedded default (issue 12). A purchase
runs about a dozen transactions and fifty statements through SQLAlchemy, whose own Python work
around each was most of a purchase's CPU. One listener on the engine's connection events
(`db/engine.py` began SQLite's transactions from a `begin` listener) makes SQLAlchemy dispatch
every event of every statement and transaction: a tenth of a purchase's function calls.

Counted, not timed: the function calls the profiler hook sees (Python's and C's), the same on any
machine. The bounds leave room for a newer SQLAlchemy; with a listener on the service's engine
each of them fails (a transaction of one statement: 465 to 537 calls before, 355 to 369 after; a
statement: 155 before, 127 after)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from support.calls import python_calls
from support.harness import make_runtime, make_settings
from whop_autocancel.db.engine import Database
from whop_autocancel.db.leases import Lease
from whop_autocancel.runtime import Runtime


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    """The service's runtime as `serve` builds it (every module that could listen on its
    engine imported and set up), on SQLite."""
    built = make_runtime(make_settings(tmp_path))
    yield built
    built.close()


LEASE = select(Lease.until).where(Lease.key == "nobody")


def test_a_transaction_of_one_statement_costs_the_engine_a_few_hundred_calls(
    runtime: Runtime,
) -> None:
    database: Database = runtime.database

    def write() -> None:
        database.run(lambda session: session.execute(LEASE).first(), durable=False)

    def flushed() -> None:
        database.run(lambda session: session.execute(LEASE).first())

    def read() -> None:
        database.read(lambda session: session.execute(LEASE).first())

    for work in (write, flushed, read):
        work()  # the statement compiled, the connection made and its level set
        work()
    assert python_calls(write) <= 400
    assert python_calls(flushed) <= 400
    assert python_calls(read) <= 400


def test_a_statement_costs_the_engine_tens_of_calls(runtime: Runtime) -> None:
    database: Database = runtime.database

    def statements(count: int) -> Callable[[], None]:
        def work() -> None:
            def run(session: Any) -> None:
                for _ in range(count):
                    session.execute(LEASE).first()

            database.run(run, durable=False)

        return work

    one, eleven = statements(1), statements(11)
    for work in (one, eleven):
        work()
        work()
    per_statement = (python_calls(eleven) - python_calls(one)) / 10
    assert per_statement <= 140
