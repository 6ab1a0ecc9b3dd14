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

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from sqlalchemy import select

from support.harness import make_runtime, make_settings
from whop_autocancel.db.engine import Database
from whop_autocancel.db.leases import Lease
from whop_autocancel.runtime import Runtime


def python_calls(work: Callable[[], object]) -> int:
    """How many functions `work` calls, Python's and C's (the profiler hook)."""
    calls = 0

    def count(_frame: FrameType, event: str, _arg: Any) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(count)
    try:
        work()
    finally:
        sys.setprofile(None)
    return calls


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
