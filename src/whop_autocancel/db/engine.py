"""Engine and unit-of-work helpers. Services take a session and never commit; the request or job
that owns the unit of work opens it with `Database.transaction()`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

log = structlog.get_logger(__name__)

_AFTER_COMMIT = "after_commit_callbacks"


def sqlite_path(url: str) -> Path | None:
    """The file behind a `sqlite:///PATH` URL (None for other backends or in-memory)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    if parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy (below) decide when transactions begin, not pysqlite.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # Take the write lock up front: a deferred transaction that later writes can fail with
        # SQLITE_BUSY at once, whatever the busy timeout says.
        connection.exec_driver_sql("BEGIN IMMEDIATE")


class Database:
    """One engine and session factory for the process."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        path = sqlite_path(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(url, echo=echo, pool_pre_ping=path is None)
        if self.engine.dialect.name == "sqlite":
            _configure_sqlite(self.engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session in one transaction: commit on success, roll back on error, then run the
        callbacks registered with `after_commit` (enqueueing jobs, mostly)."""
        with self.sessions() as session:
            with session.begin():
                yield session
            callbacks: list[Callable[[], None]] = session.info.pop(_AFTER_COMMIT, [])
        for callback in callbacks:
            try:
                callback()
            except Exception:
                # The state row is the truth; the stuck-work sweep picks the work up again.
                log.exception("after_commit_callback_failed")

    def ping(self) -> None:
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()


def after_commit(session: Session, callback: Callable[[], None]) -> None:
    """Run `callback` once the session's transaction has committed (never if it rolls back)."""
    session.info.setdefault(_AFTER_COMMIT, []).append(callback)


@contextmanager
def savepoint(session: Session) -> Iterator[None]:
    """A nested transaction whose `after_commit` callbacks vanish with it if it rolls back."""
    callbacks: list[Callable[[], None]] = session.info.setdefault(_AFTER_COMMIT, [])
    mark = len(callbacks)
    try:
        with session.begin_nested():
            yield
    except BaseException:
        del callbacks[mark:]
        raise


def insert_once(session: Session, row: object) -> bool:
    """Insert `row` unless a unique key already holds it (then False, and nothing changes).

    The one place that turns "someone else inserted it first" into a plain answer, in a
    savepoint so the surrounding transaction stays usable.
    """
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
    except IntegrityError:
        return False
    return True
