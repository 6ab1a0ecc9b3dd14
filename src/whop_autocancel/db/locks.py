"""Row locks that serialise the events of one purchase across web processes.

A payment and its `membership.activated` may arrive at the same moment at two processes; each
would otherwise not see the other's uncommitted order and both would create one. Every event
first locks the purchase's identifiers (payment, membership, order, checkout), in one global
order so two events can never wait on each other in a circle. SQLite needs none of this: its
write transactions already run one at a time.

A key is a row of `locks`, locked by one statement for all the keys of a call: an insert that,
where the row exists, locks it instead (PostgreSQL `ON CONFLICT DO UPDATE … WHERE false`, which
locks the row and writes nothing; MariaDB `ON DUPLICATE KEY UPDATE`). The rows are taken in the
order of the statement's values, the keys sorted. (It was an insert-if-absent and a
`SELECT … FOR UPDATE` for every key: two to four round trips a key. The locks are the same
row locks, so processes of both versions exclude each other during a rolling upgrade.)

On PostgreSQL each key is also an advisory lock, taken first, in the same statement: a
transaction may then only *try* a purchase (`trying_locks`): if another transaction holds any
of its keys, `lock_keys` raises `KeysBusy` at once instead of waiting, and takes no row lock.
An apply transaction of several events tries each event's purchase, so it never waits on one
while it holds the others it applied (the event whose purchase was busy is applied after, in a
transaction of its own, which waits). Every `lock_keys` takes the advisory locks, waiting or
trying, so a held purchase is seen by a try; the row locks stay, which the previous version
takes alone: a try that got the advisory locks then waits only for a process of that version.
An advisory lock is a 64-bit number, the key's hash (`_advisory_key`): two keys with one hash
only wait for each other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Select,
    String,
    Table,
    and_,
    bindparam,
    column,
    false,
    func,
    select,
    true,
    values,
)
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Mapped, Session, mapped_column

from whop_autocancel.db.base import Base


class Lock(Base):
    __tablename__ = "locks"

    key: Mapped[str] = mapped_column(String(150), primary_key=True)


class KeysBusy(Exception):
    """`lock_keys` in a transaction that only tries (`trying_locks`): another transaction holds
    one of the keys. It wrote nothing; the keys it did get stay held until the end. The
    transaction goes on without that work (an apply chunk, without rolling back, to the next
    event), so work that may be tried takes its keys before it writes anything (the
    purchase's apply methods in `orders.service` do so first)."""


_TRYING = "lock_keys.trying"  # (the session's `info`: this transaction only tries)


@contextmanager
def trying_locks(session: Session) -> Iterator[None]:
    """Within: `lock_keys` on PostgreSQL raises `KeysBusy` instead of waiting for a key
    another transaction holds. (MariaDB, SQLite: no change, it waits as ever.)"""
    session.info[_TRYING] = True
    try:
        yield
    finally:
        session.info.pop(_TRYING, None)


def lock_keys(session: Session, keys: Iterable[str | None]) -> None:
    """Hold a lock on each key until the transaction ends (see the module's text)."""
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        return
    ordered = sorted({key for key in keys if key})
    if not ordered:
        return
    values: dict[str, Any] = {f"key{n}": key for n, key in enumerate(ordered)}
    if dialect in ("mysql", "mariadb"):
        session.execute(_mariadb_statement(len(ordered)), values)
        return
    if dialect != "postgresql":
        raise ValueError(f"no row locks for the {dialect} dialect")
    values.update({f"hash{n}": _advisory_key(key) for n, key in enumerate(ordered)})
    connection = session.connection()
    sql = _postgresql_sql(connection.dialect, len(ordered), bool(session.info.get(_TRYING)))
    if not connection.exec_driver_sql(sql, values).scalar_one():
        raise KeysBusy(f"{len(ordered)} keys, held by another transaction")


def _advisory_key(key: str) -> int:
    """The key's advisory lock on PostgreSQL: a signed 64-bit hash of it."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@cache
def _postgresql_sql(dialect: Dialect, count: int, trying: bool) -> str:
    """`_postgresql_statement` compiled for `dialect`, once, and sent as it is
    (`exec_driver_sql`): through SQLAlchemy's execute (its cache of compiled statements, the
    parameters, the result) this statement cost about 1,000 Python function calls a run, sent
    as it is 197, and every event applied sends it."""
    return str(_postgresql_statement(count, trying).compile(dialect=dialect))


def _postgresql_statement(count: int, trying: bool) -> Select[tuple[bool]]:
    """Take (or try) the advisory locks of `count` keys (hash0, …, in the keys' order) and,
    only when all were got, the keys' row locks (key0, …): an insert that locks a row that
    exists (`ON CONFLICT DO UPDATE … WHERE false` locks it and writes nothing); one
    row: whether they were got. One statement: `WITH got AS (SELECT …locks… AS ok), locked AS
    (INSERT INTO locks … WHERE got.ok ON CONFLICT …) SELECT ok FROM got` (a data-modifying
    CTE runs whether or not it is read; `got` is computed once)."""
    hashes = [bindparam(f"hash{n}", type_=BigInteger()) for n in range(count)]
    if trying:
        tried = and_(*[func.pg_try_advisory_xact_lock(number) for number in hashes])
        got = select(tried.label("ok")).cte("got")
    else:  # (in order, each waiting: one order everywhere, so no two wait on each other)
        taken = select(*[func.pg_advisory_xact_lock(number) for number in hashes]).subquery()
        got = select(true().label("ok")).select_from(taken).cte("got")
    table = cast(Table, Lock.__table__)
    keys = values(column("key", String()), name="v").data(
        [(bindparam(f"key{n}", type_=String()),) for n in range(count)]
    )
    insert = postgresql.insert(table).from_select(
        ["key"], select(keys.c.key).select_from(keys.join(got, true())).where(got.c.ok)
    )
    locked = insert.on_conflict_do_update(
        index_elements=[table.c.key], set_={"key": insert.excluded.key}, where=false()
    )
    return select(got.c.ok).add_cte(locked.cte("locked"))


@cache
def _mariadb_statement(count: int) -> Any:
    """The row locks of `count` keys (bound as key0, key1, …) on MariaDB, built once per count:
    `INSERT … ON DUPLICATE KEY UPDATE`, which locks a row that exists."""
    rows: list[dict[str, Any]] = [{"key": bindparam(f"key{n}")} for n in range(count)]
    insert = mysql.insert(cast(Table, Lock.__table__)).values(rows)
    return insert.on_duplicate_key_update(key=insert.inserted.key)
