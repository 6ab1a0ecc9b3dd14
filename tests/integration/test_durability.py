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
from sqlalchemy.orm import Session

from support.harness import drain
from support.shop import Shop, open_shop
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
