"""Engine and unit-of-work helpers. Services take a session and never commit; the request or job
that owns the unit of work opens it with `Database.transaction()`."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import structlog
from sqlalchemy import Engine, Table, create_engine, event, insert, inspect, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, IntegrityError
from sqlalchemy.orm import Session, make_transient_to_detached, sessionmaker

from whop_autocancel.db.write_turn import WriteTurn

log = structlog.get_logger(__name__)
T = TypeVar("T")

_AFTER_COMMIT = "after_commit_callbacks"
# An execution option of the connection a transaction runs on: False when its commit need not
# wait for the disk (see `Database.transaction`).
DURABLE = "whop_autocancel_durable"
_SYNCHRONOUS = "synchronous"  # the flush level last set on a pooled connection
READ_ONLY = "whop_autocancel_read_only"  # an execution option: `Database.read`


def sqlite_path(url: str) -> Path | None:
    """The file behind a `sqlite:///PATH` URL (None for other backends or in-memory)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    if parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def writer_lock_file(database: Path) -> Path:
    """The lock file beside a SQLite database that its writers take turns on."""
    return database.with_name(f"{database.name}-writer")


def _configure_sqlite(engine: Engine) -> None:
    """SQLite's connections: WAL, and transactions begun by `_sqlite_begin` (which takes the
    write lock up front) instead of pysqlite. No listener on the engine's connections: one
    listener for any of their events (a `begin` listener was how this began transactions)
    makes SQLAlchemy dispatch every event of every statement and transaction: a fifth more
    of its work a statement, a third more a transaction (tests/integration/
    test_transaction_cost.py)."""

    @event.listens_for(engine, "connect")  # (the pool's event, once a connection)
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy (below) decide when transactions begin, not pysqlite.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    # The dialect's own step, called with the pooled connection as each transaction begins
    # (pysqlite's does nothing: the driver would run every statement on its own).
    engine.dialect.do_begin = _sqlite_begin  # type: ignore[method-assign]


_BEGIN_AS = "whop_autocancel_begin_as"  # the connection's next transaction: a `_Begin`


class _Begin:
    """How `_sqlite_begin` begins the next transaction of a connection (`Database`
    leaves one in the connection's `info` before it begins)."""

    def __init__(self, *, read_only: bool = False, durable: bool = True) -> None:
        self.read_only = read_only
        self.level = "FULL" if durable else "NORMAL"


_DURABLE_WRITE = _Begin()


def _sqlite_begin(dbapi_connection: Any) -> None:
    """Begin a transaction on a pooled SQLite connection, as `Database` asked (anything else,
    a migration say, a flushed write). Errors are raised as the engine's (SQLAlchemy wraps
    this step's)."""
    begin: _Begin = dbapi_connection.info.pop(_BEGIN_AS, _DURABLE_WRITE)
    driver = dbapi_connection.driver_connection
    if begin.read_only:
        driver.execute("BEGIN")  # a snapshot; writers go on meanwhile (WAL)
        return
    # The level can only change between transactions: set it (when it differs from the
    # connection's last) just before this one begins.
    if dbapi_connection.info.get(_SYNCHRONOUS) != begin.level:
        driver.execute(f"PRAGMA synchronous={begin.level}")
        dbapi_connection.info[_SYNCHRONOUS] = begin.level
    # Take the write lock up front: a deferred transaction that later writes can fail with
    # SQLITE_BUSY at once, whatever the busy timeout says.
    driver.execute("BEGIN IMMEDIATE")


def _configure_postgresql(engine: Engine) -> None:
    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # Set on the connection (not `SET LOCAL`, a round trip in every transaction) when it
        # differs from the level its last transaction committed with; a read leaves it be.
        # Flushed is the server's own setting (`DEFAULT`: `on`, or stronger where the server
        # waits for a replica too), which a new connection has.
        options = connection.get_execution_options()
        if options.get(READ_ONLY, False):
            return
        level = "DEFAULT" if options.get(DURABLE, True) else "off"
        if connection.info.get(_SYNCHRONOUS, "DEFAULT") != level:
            connection.exec_driver_sql(f"SET synchronous_commit TO {level}")
            connection.info[_SYNCHRONOUS] = level

    @event.listens_for(engine, "rollback")
    def _on_rollback(connection: Any) -> None:
        # PostgreSQL undoes a `SET` made in a transaction that rolls back: the level is no
        # longer known, and the next transaction sets it again, whatever it asks. (A lost
        # connection has nothing to undo: touching its `info` would reconnect it mid-rollback;
        # a level left over for the next one can only be stronger than it has.)
        if not connection.invalidated:
            connection.info[_SYNCHRONOUS] = "unknown"


# A pooled connection idle at least this long (seconds) is pinged before it is handed out.
PING_IDLE_AFTER = 10.0
_IDLE_SINCE = "whop_autocancel_idle_since"  # when a pooled connection was last given back


def _ping_when_idle(engine: Engine, idle_after: float) -> None:
    """Before a pooled connection (PostgreSQL, MariaDB) is handed out, ping it if it lay idle
    `idle_after` seconds or more: one the server or a firewall closed meanwhile is replaced
    (SQLAlchemy's `DisconnectionError`: the pool takes a new one) before any work meets it.
    SQLAlchemy's `pool_pre_ping` pings at every checkout, which is every transaction here (a
    session for each): a round trip, and in psycopg more Python than most statements, in
    each of the ten or so transactions of a purchase. A connection used a moment ago is as
    alive as the server: if the server went away since, the work's first statement finds
    out, SQLAlchemy replaces every connection of the pool, and `Database.run` runs the work
    again on a new one."""

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get(_IDLE_SINCE)
        if since is None or time.monotonic() - since < idle_after:
            return  # (None: connected just now)
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as error:
            raise DisconnectionError(f"{type(error).__name__}: {error}") from error


class Database:
    """One engine and session factory for the process."""

    def __init__(
        self, url: str, *, echo: bool = False, ping_idle_after: float = PING_IDLE_AFTER
    ) -> None:
        self.url = url
        path = sqlite_path(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        options: dict[str, Any] = {"echo": echo}
        backend = make_url(url).get_backend_name()
        if backend != "sqlite":
            # Last in, first out: the connections in use stay warm (never pinged under load),
            # the ones beyond what the load needs lie idle and are pinged when next needed.
            options.update(pool_use_lifo=True, pool_size=10, max_overflow=20, pool_recycle=1800)
        if backend in ("mysql", "mariadb"):
            # MariaDB's default REPEATABLE READ would let a transaction miss rows another one
            # committed after its first read; READ COMMITTED behaves like PostgreSQL's default.
            options.update(isolation_level="READ COMMITTED", connect_args={"charset": "utf8mb4"})
        self.engine = create_engine(url, **options)
        self.backend = self.engine.dialect.name
        if self.backend == "sqlite":
            _configure_sqlite(self.engine)
        else:
            if self.backend == "postgresql":
                _configure_postgresql(self.engine)
            _ping_when_idle(self.engine, ping_idle_after)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite: the turn to write, handed over between this process's threads at once and
        # urgent callers first, and between processes through a lock file (write_turn.py).
        self._write_turn = (
            WriteTurn(writer_lock_file(path) if path is not None else None)
            if self.backend == "sqlite"
            else None
        )

    @contextmanager
    def transaction(
        self, *, urgent: bool = False, durable: bool = True, read_only: bool = False
    ) -> Iterator[Session]:
        """A session in one transaction: commit on success, roll back on error, then run the
        callbacks registered with `after_commit` (enqueueing jobs, mostly). `urgent`: someone
        waits on this commit (the webhook writer); on SQLite it writes before the others.

        Every commit survives a killed process. A `durable` one (the default) also survives a
        power cut once it returns: it waits for the disk. `durable=False` is for the steps
        nobody outside relies on until a later durable commit: the log is written in commit
        order and a flushed commit flushes every one before it (SQLite's WAL, PostgreSQL's
        WAL), so a power cut can only take the newest unflushed commits, all of them after
        the last flushed one, and those are redone from what is durable (the stored webhooks,
        by the sweeps). On SQLite `synchronous=NORMAL`, on PostgreSQL
        `synchronous_commit=off`; MariaDB flushes every commit (its setting is server-wide).
        Before any act outside (an answer to Whop, an email, a call to Whop) commit durably
        whatever must not be undone after it.

        `read_only`: the work only reads (`Database.read`): on SQLite a snapshot without the
        write turn, and on every backend its commit, which has nothing to flush, leaves the
        connection's flush level as it found it."""
        turn: AbstractContextManager[None] = (
            self._write_turn.turn(urgent=urgent)
            if self._write_turn is not None and not read_only
            else nullcontext()
        )
        with turn, self._session(read_only=read_only, durable=durable) as session:
            with session.begin():
                if self.backend != "sqlite" and (read_only or not durable):
                    # (PostgreSQL, MariaDB: the engine's `begin` listener reads these.)
                    options = {READ_ONLY: True} if read_only else {DURABLE: False}
                    session.connection(execution_options=options)
                yield session
            callbacks: list[Callable[[], None]] = session.info.pop(_AFTER_COMMIT, [])
        for callback in callbacks:
            try:
                callback()
            except Exception:
                # The state row is the truth; the stuck-work sweep picks the work up again.
                log.exception("after_commit_callback_failed")

    @contextmanager
    def _session(self, *, read_only: bool, durable: bool) -> Iterator[Session]:
        """A session for one transaction. On SQLite on a connection of its own, told how its
        transaction begins (`_sqlite_begin`)."""
        if self.backend != "sqlite":
            with self.sessions() as session:
                yield session
            return
        with self.engine.connect() as connection:
            if read_only or not durable:
                connection.info[_BEGIN_AS] = _Begin(read_only=read_only, durable=durable)
            try:
                with self.sessions(bind=connection) as session:
                    yield session
            finally:
                connection.info.pop(_BEGIN_AS, None)  # (not begun: left for no one)

    def read(self, work: Callable[[Session], T]) -> T:
        """Run `work`, which only reads, in a transaction of its own. On SQLite it reads a
        snapshot without the write turn (WAL lets readers and the writer go at once), so a
        writer holding the turn never holds it up; elsewhere it is a plain transaction."""
        return self.run(work, read_only=True)

    @property
    def skip_locked(self) -> bool:
        """Whether `SELECT … FOR UPDATE SKIP LOCKED` is available (not on SQLite)."""
        return self.backend in ("postgresql", "mysql", "mariadb")

    def run(
        self,
        work: Callable[[Session], T],
        *,
        attempts: int = 5,
        urgent: bool = False,
        durable: bool = True,
        read_only: bool = False,
    ) -> T:
        """Run `work` in a transaction, again from the start when the database aborted it to
        break a deadlock or a serialization conflict (MariaDB does so on concurrent inserts of
        one unique key), or when its connection turned out to be closed (the server restarted,
        say; SQLAlchemy then replaces the pool's connections). `work` must therefore be safe to
        repeat (ours are idempotent: a connection lost at the commit may have committed)."""
        for attempt in range(1, attempts + 1):
            try:
                with self.transaction(
                    urgent=urgent, durable=durable, read_only=read_only
                ) as session:
                    return work(session)
            except DBAPIError as error:
                if attempt == attempts or not (
                    error.connection_invalidated or is_transient_conflict(error)
                ):
                    raise
                CONFLICTS.record(error)
                time.sleep(random.uniform(0.005, 0.05) * attempt)
        raise AssertionError("unreachable")

    def ping(self) -> None:
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()


class ConflictCounter:
    """How many transactions were retried after a deadlock, a serialization conflict or a
    lost connection (`Database.run`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def record(self, error: BaseException) -> None:
        with self._lock:
            self.count += 1
            count = self.count
        log.warning(
            "db_conflict_retried",
            error=type(getattr(error, "orig", error)).__name__,
            connection_lost=bool(getattr(error, "connection_invalidated", False)),
            retried_so_far=count,
        )


CONFLICTS = ConflictCounter()

# PostgreSQL SQLSTATEs and MariaDB/MySQL error numbers that mean "aborted: run it again".
_RETRY_SQLSTATES = {"40001", "40P01"}
_RETRY_MYSQL_CODES = {1205, 1213}


def is_transient_conflict(error: BaseException) -> bool:
    original = getattr(error, "orig", error)
    if getattr(original, "sqlstate", None) in _RETRY_SQLSTATES:
        return True
    args = getattr(original, "args", ())
    if args and isinstance(args[0], int) and args[0] in _RETRY_MYSQL_CODES:
        return True
    return "database is locked" in str(original)


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
    """Insert `row` unless a unique key already holds it (then False, and nothing changes);
    inserted, it is in the session, with every column as the database stored it.

    The one place that turns "someone else inserted it first" into a plain answer. On SQLite
    and PostgreSQL in one statement (`INSERT … ON CONFLICT DO NOTHING RETURNING`); elsewhere
    (MariaDB) in a savepoint, so the surrounding transaction stays usable after the error.
    """
    dialect = session.get_bind().dialect.name
    if dialect in ("postgresql", "sqlite"):
        return _insert_unless_held(session, row, dialect)
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
    except IntegrityError:
        return False
    return True


@dataclass(frozen=True)
class _UnlessHeld:
    """`INSERT … ON CONFLICT DO NOTHING RETURNING` every column of a mapped table, built once
    for each (mapper, dialect), with where each of its attributes goes: (attribute, column
    name, position in the returned row, part of the primary key)."""

    statement: Any
    columns: tuple[tuple[str, str, int, bool], ...]


_INSERTS_UNLESS_HELD: dict[tuple[Any, str], _UnlessHeld] = {}


def _unless_held(mapper: Any, dialect: str) -> _UnlessHeld:
    prepared = _INSERTS_UNLESS_HELD.get((mapper, dialect))
    if prepared is None:
        table = cast(Table, mapper.local_table)
        upsert = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
        returned = list(table.c)
        position = {column: n for n, column in enumerate(returned)}
        columns = tuple(
            (prop.key, column.key, position[column], column.primary_key)
            for prop in mapper.column_attrs
            for column in prop.columns[:1]
            if column.table is table  # (the table's own columns, not SQL expressions)
        )
        statement = upsert.on_conflict_do_nothing().returning(*returned)
        prepared = _INSERTS_UNLESS_HELD[(mapper, dialect)] = _UnlessHeld(statement, columns)
    return prepared


def _insert_unless_held(session: Session, row: object, dialect: str) -> bool:
    """`insert_once` without a savepoint or a unit-of-work flush of its own (each costs more
    than the insert): the row's set columns go in one statement, and the row, inserted, joins
    the session as if it had been read. What the session holds is flushed first (the row may
    refer to it)."""
    state = inspect(row)
    prepared = _unless_held(state.mapper, dialect)
    given = state.dict
    values = {
        column: given[key]
        for key, column, _, primary in prepared.columns
        if key in given and not (primary and given[key] is None)
    }
    session.flush()
    stored = session.connection().execute(prepared.statement, values).first()
    if stored is None:
        return False
    # Every column as stored. Written to the row's state directly (no attribute events, as
    # `set_committed_value`), then committed all at once: the row becomes as if it had been
    # loaded, with nothing to flush.
    for key, _, position, _ in prepared.columns:
        given[key] = stored[position]
    make_transient_to_detached(row)
    session.add(row)
    return True


# `insert_absent`'s statement for each (table, dialect, key column), built once.
_ABSENT_INSERTS: dict[tuple[Table, str, str], Any] = {}


def insert_absent(
    session: Session, model: type[Any], rows: Sequence[Mapping[str, Any]], key: str
) -> set[Any]:
    """Insert every row whose `key` is not in `model`'s table yet; the keys it inserted. Rows that
    another transaction inserts concurrently end as one row, never as an error: PostgreSQL and
    SQLite in one statement (`ON CONFLICT DO NOTHING RETURNING`); elsewhere (MariaDB) the keys
    already there are left out first and the rest inserted in one statement, row by row
    (`insert_once`'s savepoints) only when a concurrent insert took one in between. Pass the
    rows sorted by `key`: transactions then lock keys in one order and cannot deadlock on them."""
    if not rows:
        return set()
    # Table statements, not the ORM's: plain rows, and no ORM bulk-insert layer to go through.
    table = model.__table__
    column = table.c[key]
    dialect = session.get_bind().dialect.name
    if dialect in ("postgresql", "sqlite"):
        # One statement built once, its rows as parameters: SQLAlchemy sends them as one
        # multi-row INSERT (its "insertmanyvalues"), in the order given, and returns the keys
        # of those inserted. (A statement built with the rows in it costs more to build and key
        # than the database takes to run it.)
        statement = _ABSENT_INSERTS.get((table, dialect, key))
        if statement is None:
            upsert = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
            statement = upsert.on_conflict_do_nothing(index_elements=[column]).returning(column)
            _ABSENT_INSERTS[(table, dialect, key)] = statement
        return set(session.scalars(statement, [dict(row) for row in rows]))
    present = set(session.scalars(select(column).where(column.in_([row[key] for row in rows]))))
    fresh = [row for row in rows if row[key] not in present]
    if not fresh:
        return set()
    try:
        with session.begin_nested():
            session.execute(insert(table).values(fresh))
    except IntegrityError:  # a concurrent transaction inserted one of them since the select
        inserted = set()
        for row in fresh:
            try:
                with session.begin_nested():
                    session.execute(insert(table).values(dict(row)))
            except IntegrityError:
                continue
            inserted.add(row[key])
        return inserted
    return {row[key] for row in fresh}
