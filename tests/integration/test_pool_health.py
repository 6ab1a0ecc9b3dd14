"""Pooled connections to PostgreSQL and MariaDB (db/engine.py): a connection that lay idle is
pinged before it is handed out, and one the server closed is replaced before any work meets
it; a connection in steady use is not pinged (SQLAlchemy's `pool_pre_ping` pinged at every
transaction: a round trip in each); work whose connection the server closed just after its
last use runs again on a new one. The connections are closed for real, by the server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from support import backends
from whop_autocancel.db.engine import CONFLICTS, Database


@pytest.fixture
def server_url(database_url: str) -> str:
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite has no server connection to lose")
    return database_url


class Pings:
    """Counts the pings SQLAlchemy's dialect sends (each still goes to the server)."""

    def __init__(self, database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        dialect = database.engine.dialect
        ping: Callable[[Any], bool] = dialect.do_ping

        def counted(dbapi_connection: Any) -> bool:
            self.count += 1
            return ping(dbapi_connection)

        monkeypatch.setattr(dialect, "do_ping", counted)


def open_database(url: str, **options: float) -> Iterator[Database]:
    database = Database(url, **options)
    try:
        yield database
    finally:
        database.dispose()


@pytest.fixture
def busy(server_url: str) -> Iterator[Database]:
    """A database whose connections are pinged only after the default idle time (10 s)."""
    yield from open_database(server_url)


@pytest.fixture
def idle(server_url: str) -> Iterator[Database]:
    """A database whose every checked-in connection counts as idle."""
    yield from open_database(server_url, ping_idle_after=0.0)


def backend_id(session: Session) -> int:
    backend = session.get_bind().dialect.name
    statement = "SELECT pg_backend_pid()" if backend == "postgresql" else "SELECT CONNECTION_ID()"
    return int(session.execute(text(statement)).scalar_one())


def test_a_connection_in_steady_use_is_not_pinged(
    busy: Database, idle: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    pings = Pings(busy, monkeypatch)
    ids = {busy.run(backend_id) for _ in range(20)}
    assert pings.count == 0
    assert len(ids) == 1  # one connection, handed out again and again (last in, first out)
    # The same with every connection taken as idle: pinged at each transaction but the first
    # (connected just now).
    idle_pings = Pings(idle, monkeypatch)
    for _ in range(20):
        idle.run(backend_id)
    assert idle_pings.count == 19


def test_a_connection_the_server_closed_while_idle_is_replaced_before_use(
    idle: Database, server_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = idle.run(backend_id)
    assert backends.drop_connections(server_url) >= 1
    pings = Pings(idle, monkeypatch)
    retried = CONFLICTS.count
    assert idle.run(backend_id) != first  # a new connection
    assert pings.count == 1
    assert CONFLICTS.count == retried  # the ping found it: no work met the closed connection


def test_work_whose_connection_the_server_closed_just_after_use_runs_again(
    busy: Database, server_url: str
) -> None:
    first = busy.run(backend_id)
    assert backends.drop_connections(server_url) >= 1
    retried = CONFLICTS.count
    runs: list[int] = []

    def work(session: Session) -> int:
        runs.append(1)
        return backend_id(session)

    assert busy.run(work) != first
    assert len(runs) == 2  # the first met the closed connection, the second a new one
    assert CONFLICTS.count == retried + 1
