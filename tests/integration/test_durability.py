"""Which commits wait for the disk (issue 12). Every commit survives a killed process; one that
someone outside is about to rely on also survives a power cut before it returns: the webhook
store (Whop gets its 2xx after it) and the lease taken before an email goes out. The steps in
between (applying a stored webhook, the delivery, recording a sent email, a cancellation's
claim and answer) commit without their own flush (SQLite `synchronous=NORMAL`, PostgreSQL
`synchronous_commit=off`): the log is written in commit order and every flushed commit flushes
the ones before it, so a power cut can only take the newest of them, and those are redone from
the stored webhooks (the sweeps). MariaDB flushes every commit (its setting is server-wide).
And on SQLite, the processes that share the file take turns to write through a lock file.

Real parts: each database, the Whop simulator over HTTP, an aiosmtpd sink."""

from __future__ import annotations

import fcntl
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, select, text
from sqlalchemy import event as sa_event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from support.harness import drain
from support.shop import Shop, open_shop
from support.statements import recorded
from whop_autocancel.clock import FrozenClock
from whop_autocancel.db.engine import Database, writer_lock_file
from whop_autocancel.db.leases import Lease
from whop_autocancel.simulator import SimulatorServer


def flushed(session_or_connection: Any, backend: str) -> bool | None:
    """Whether the open transaction's commit waits for the disk (None: MariaDB, always)."""
    if backend == "sqlite":
        level = session_or_connection.execute(text("PRAGMA synchronous")).scalar()
        return {1: False, 2: True}[level]
    if backend == "postgresql":
        return session_or_connection.execute(text("SHOW synchronous_commit")).scalar() != "off"
    return None


def test_a_transaction_flushes_its_commit_unless_told_it_need_not(database_url: str) -> None:
    database = Database(database_url)
    try:
        expected: list[bool | None] = [True, False, True, False]
        if database.backend not in ("sqlite", "postgresql"):
            expected = [None] * 4
        seen = []
        for durable in (True, False, True, False):
            with database.transaction(durable=durable) as session:
                seen.append(flushed(session, database.backend))
        assert seen == expected
        # The default: flushed, also on the connection a relaxed transaction used last.
        with database.transaction() as session:
            assert flushed(session, database.backend) in (True, None)
        assert database.run(lambda s: flushed(s, database.backend), durable=False) in (False, None)
    finally:
        database.dispose()


class _Refused(Exception):
    """Raised inside a transaction to roll it back."""


def refuse(database: Database, *, durable: bool) -> None:
    """A transaction that reads, then rolls back."""
    with database.transaction(durable=durable) as session:
        session.execute(text("SELECT 1"))
        raise _Refused


def test_a_rolled_back_transaction_leaves_the_next_ones_flushed_as_they_ask(
    database_url: str,
) -> None:
    """A transaction that rolls back takes with it what it set on its connection (PostgreSQL
    undoes a `SET` made in an aborted transaction): the next transaction on that connection
    still commits as it asks, flushed or not. A flushed one that relied on a level remembered
    from before the rollback would return before the disk has its commit."""
    database = Database(database_url)
    try:
        relaxed = database.backend in ("sqlite", "postgresql")
        for first, refused in ((True, False), (False, True)):
            with database.transaction(durable=first) as session:
                session.execute(text("SELECT 1"))
            with pytest.raises(_Refused):
                refuse(database, durable=refused)
            for durable in (refused, first, refused):
                with database.transaction(durable=durable) as session:
                    level = flushed(session, database.backend)
                assert level is (durable if relaxed else None), (first, refused, durable)
    finally:
        database.dispose()


def test_a_flushed_transaction_keeps_the_servers_own_flush_setting(database_url: str) -> None:
    """Flushed means what the PostgreSQL server is set to do (here `remote_apply`: wait for a
    replica as well), not a weaker `on` of ours, also on a connection whose last transaction
    did not flush."""
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL's synchronous_commit")
    url = make_url(database_url).update_query_dict({"options": "-csynchronous_commit=remote_apply"})
    database = Database(url.render_as_string(hide_password=False))
    try:
        seen = []
        for durable in (True, False, True, False, True):
            with database.transaction(durable=durable) as session:
                seen.append(session.execute(text("SHOW synchronous_commit")).scalar())
        assert seen == ["remote_apply", "off", "remote_apply", "off", "remote_apply"]
    finally:
        database.dispose()


def test_a_transaction_sends_only_its_own_statements(database_url: str) -> None:
    """How a transaction begins (SQLite's `BEGIN IMMEDIATE`, or `BEGIN` for a read) and how
    it tells the database whether to flush its commit are not statements of their own through
    the engine: each would cost a statement's work in SQLAlchemy (tens of microseconds, more
    than SQLite takes to begin), in every one of the ten or so transactions of a purchase, and
    on PostgreSQL a round trip. The flush level is set on a connection when it changes, not
    in every transaction."""
    database = Database(database_url)
    try:
        database.run(lambda s: s.execute(text("SELECT 1")), durable=False)  # connection made
        with recorded(database.engine) as sent:
            for _ in range(3):
                database.run(lambda s: s.execute(text("SELECT 1")), durable=False)
            database.read(lambda s: s.execute(text("SELECT 1")))
        assert [statement for statement, _ in sent] == ["SELECT 1"] * 4
        # Flushed again, then relaxed again: the level changes twice, once each way.
        with recorded(database.engine) as sent:
            for durable in (True, True, False, False):
                database.run(lambda s: s.execute(text("SELECT 1")), durable=durable)
        others = [statement for statement, _ in sent if statement != "SELECT 1"]
        assert len(others) == (2 if database.backend == "postgresql" else 0), others
    finally:
        database.dispose()


@pytest.fixture
def shop(
    tmp_path: Path, clock: FrozenClock, simulator: SimulatorServer, database_url: str
) -> Iterator[Shop]:
    yield from open_shop(tmp_path, clock, simulator, DATABASE_URL=database_url)


def test_a_purchase_flushes_the_webhook_and_each_email_lease_and_not_the_steps_between(
    shop: Shop,
) -> None:
    """Commit by commit: whether it was flushed, and how many emails the SMTP server had
    accepted when it committed. An email accepted between two commits of the worker went out
    after the first of them: that one must be flushed."""
    sink = shop.smtp_up()
    database = shop.runtime.database
    backend = database.backend
    commits: list[tuple[int, bool | None, int]] = []
    lock = threading.Lock()

    def on_commit(connection: Any) -> None:
        level = flushed(connection, backend)
        with lock:
            commits.append((threading.get_ident(), level, len(sink.messages)))

    sa_event.listen(database.engine, "commit", on_commit)
    try:
        purchase = shop.buy()
        shop.run_cancellation(purchase, after=5)
        drain(shop.runtime, include_scheduled=True)
    finally:
        sa_event.remove(database.engine, "commit", on_commit)
    assert shop.cancellation(purchase).status == "canceled"
    assert len(sink.messages) == 2  # the customer's email and the admin's notice

    # The jobs ran in this thread (`drain`): between two of its commits, emails went out only
    # by its own doing (the server's threads store the webhooks meanwhile).
    worker = [(level, sent) for thread, level, sent in commits if thread == threading.get_ident()]
    leases = 0
    relaxed = backend in ("sqlite", "postgresql")
    for (level, sent), (level_next, sent_next) in pairwise(worker):
        if sent_next > sent:
            leases += 1
            assert level in (True, None)  # the lease before the email was flushed
            # The record of the accepted email is not: at worst the email goes again.
            assert level_next is (False if relaxed else None)
    assert leases >= 1
    if backend in ("sqlite", "postgresql"):
        levels = [level for _, level, _ in commits]
        assert True in levels  # the webhooks' store, the leases
        # Applying, delivering, recording the sent emails, the claim and the answer of the
        # cancellation (and the rate limit's turns): none of them waits for the disk.
        assert levels.count(False) >= 6
    else:
        assert {level for _, level, _ in commits} == {None}


def test_a_sqlite_transaction_holds_the_lock_file_other_processes_wait_on(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'service.db'}")
    lock = writer_lock_file(tmp_path / "service.db")
    try:
        with database.transaction() as session:
            session.execute(text("SELECT 1"))
            with lock.open("a") as probe, pytest.raises(BlockingIOError):
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with lock.open("a") as probe:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again
    finally:
        database.dispose()


def test_a_read_does_not_wait_for_the_writer_and_sees_what_is_committed(database_url: str) -> None:
    """A read-only transaction (`Database.read`) never takes SQLite's write turn: a writer that
    holds it (a long delivery, say) does not hold up the readers."""
    database = Database(database_url)
    Lease.__table__.create(database.engine, checkfirst=True)  # (the SQLite file is new)
    key = "read-test"
    try:
        database.run(lambda s: s.execute(delete(Lease).where(Lease.key == key)))
        holding, done = threading.Event(), threading.Event()

        def writer() -> None:
            with database.transaction() as session:
                session.add(Lease(key=key, holder="writer", until=datetime.now(UTC)))
                session.flush()
                holding.set()
                assert done.wait(30), "the read never finished"

        def count(session: Session) -> int:
            return len(session.scalars(select(Lease).where(Lease.key == key)).all())

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        assert holding.wait(30)
        seen = database.read(count)
        done.set()
        thread.join(30)
        assert seen == 0  # the writer had not committed yet
        assert database.read(count) == 1
        database.run(lambda s: s.execute(delete(Lease).where(Lease.key == key)))
    finally:
        database.dispose()
