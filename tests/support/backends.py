"""The real database and queue servers the suites run against, each test run in its own
database (PostgreSQL, MariaDB) or under its own queue name (Redis, PostgreSQL queue).

Servers come from TEST_POSTGRES_URL, TEST_MARIADB_URL and TEST_REDIS_URL (defaults: the
machine's local services). A server that is down skips its tests locally, with the reason, and
fails them under CI (CI=true).
"""

from __future__ import annotations

import os
import socket
import uuid
from urllib.parse import urlsplit

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from whop_autocancel.db.engine import Database
from whop_autocancel.schema import Base
from whop_autocancel.schema.migrate import upgrade

POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
MARIADB_URL = os.environ.get("TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
SERVERS = {"postgresql": POSTGRES_URL, "mariadb": MARIADB_URL, "redis": REDIS_URL}
RUN_ID = f"wa{os.getpid()}{uuid.uuid4().hex[:6]}"


def require(kind: str) -> str:
    """The server URL of `kind`, or skip (fail under CI) when nothing answers there."""
    url = SERVERS[kind]
    parts = urlsplit(url.replace("+pymysql", "").replace("+psycopg", ""))
    default_port = {"postgresql": 5432, "mariadb": 3306, "redis": 6379}[kind]
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), timeout=2
        ):
            pass
    except OSError as error:
        message = f"{kind} is not reachable at {parts.hostname}:{parts.port} ({error})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}: CI needs every backend")
        pytest.skip(message)
    return url


def create_database(kind: str, suffix: str = "") -> str:
    """A fresh, migrated database for this test run (one per `suffix`); returns its URL."""
    server = make_url(require(kind))
    name = f"{RUN_ID}_{kind}{suffix}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        quoted = f'"{name}"' if kind == "postgresql" else f"`{name}`"
        extra = " CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci" if kind == "mariadb" else ""
        connection.execute(text(f"CREATE DATABASE {quoted}{extra}"))
    admin.dispose()
    url = server.set(database=name).render_as_string(hide_password=False)
    database = Database(url)
    upgrade(database)
    database.dispose()
    return url


def allow_connections(url: str, allowed: bool) -> None:
    """Close a PostgreSQL database to new connections and drop the open ones (or reopen it)."""
    name = make_url(url).database
    admin = create_engine(make_url(require("postgresql")), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(
            text(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS {"true" if allowed else "false"}')
        )
    admin.dispose()
    if not allowed:
        drop_connections(url)


def drop_connections(url: str) -> int:
    """Close every server connection to the PostgreSQL or MariaDB database of `url`, as a
    restart or a firewall's idle timeout would; returns how many."""
    parsed = make_url(url)
    kind = "postgresql" if parsed.get_backend_name() == "postgresql" else "mariadb"
    admin = create_engine(make_url(require(kind)), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            if kind == "postgresql":
                return len(
                    connection.execute(
                        text(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = :name AND pid <> pg_backend_pid()"
                        ),
                        {"name": parsed.database},
                    ).all()
                )
            ids = connection.scalars(
                text(
                    "SELECT id FROM information_schema.processlist "
                    "WHERE db = :name AND id <> CONNECTION_ID()"
                ),
                {"name": parsed.database},
            ).all()
            for connection_id in ids:
                connection.execute(text(f"KILL CONNECTION {int(connection_id)}"))
            return len(ids)
    finally:
        admin.dispose()


def lock_waiters(url: str, connection_id: int | None = None) -> int:
    """How many connections to the PostgreSQL or MariaDB database of `url` (or only the one
    with that server id: `pg_backend_pid()`, `CONNECTION_ID()`) wait on a lock now, read on a
    connection of its own. PostgreSQL: a wait of the `Lock` kind (pg_stat_activity). MariaDB:
    a statement on `locks` running for 100 ms or more, which only a lock wait makes it do
    (InnoDB's own view of lock waits, INNODB_TRX, is a cache that is not refreshed while
    anyone reads it more often than every 100 ms: the parallel tests do)."""
    parsed = make_url(url)
    kind = "postgresql" if parsed.get_backend_name() == "postgresql" else "mariadb"
    if kind == "postgresql":
        query = (
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = :name AND wait_event_type = 'Lock'"
        )
        one = " AND pid = :id"
    else:
        query = (
            "SELECT count(*) FROM information_schema.PROCESSLIST WHERE db = :name "
            "AND command = 'Query' AND info LIKE '%locks%' AND time_ms >= 100"
        )
        one = " AND id = :id"
    if connection_id is not None:
        query += one
    admin = create_engine(make_url(require(kind)), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            found = connection.execute(text(query), {"name": parsed.database, "id": connection_id})
            return int(found.scalar_one())
    finally:
        admin.dispose()


def drop_database(kind: str, url: str) -> None:
    server = make_url(SERVERS[kind])
    name = make_url(url).database
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        if kind == "postgresql":
            connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"
                ),
                {"name": name},
            )
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        else:
            connection.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
    admin.dispose()


def empty_tables(url: str) -> None:
    """Delete every row (children first), so each test starts from an empty schema."""
    engine = create_engine(url)
    with engine.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            connection.execute(table.delete())
    engine.dispose()


def queue_url(kind: str, tmp_path: object) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/queue.db"
    if kind == "postgresql":
        return require("postgresql").replace("postgresql+psycopg://", "postgresql://")
    return require("redis")
