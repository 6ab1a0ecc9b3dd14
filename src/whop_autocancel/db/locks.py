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
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from typing import Any, cast

from sqlalchemy import String, Table, bindparam, false
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.orm import Mapped, Session, mapped_column

from whop_autocancel.db.base import Base


class Lock(Base):
    __tablename__ = "locks"

    key: Mapped[str] = mapped_column(String(150), primary_key=True)


def lock_keys(session: Session, keys: Iterable[str | None]) -> None:
    """Hold a row lock on each key until the transaction ends."""
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        return
    ordered = sorted({key for key in keys if key})
    if ordered:
        session.execute(
            _lock_statement(dialect, len(ordered)),
            {f"key{n}": key for n, key in enumerate(ordered)},
        )


@cache
def _lock_statement(dialect: str, count: int) -> Any:
    """The statement that locks `count` keys (bound as key0, key1, …), built once per count."""
    rows: list[dict[str, Any]] = [{"key": bindparam(f"key{n}")} for n in range(count)]
    table = cast(Table, Lock.__table__)
    if dialect == "postgresql":
        insert = postgresql.insert(table).values(rows)
        # Every conflicting row is locked, even the ones the WHERE does not update (all).
        return insert.on_conflict_do_update(
            index_elements=[table.c.key], set_={"key": insert.excluded.key}, where=false()
        )
    if dialect in ("mysql", "mariadb"):
        insert_ = mysql.insert(table).values(rows)
        return insert_.on_duplicate_key_update(key=insert_.inserted.key)
    raise ValueError(f"no row locks for the {dialect} dialect")
