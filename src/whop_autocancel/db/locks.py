"""Row locks that serialise the events of one purchase across web processes.

A payment and its `membership.activated` may arrive at the same moment at two processes; each
would otherwise not see the other's uncommitted order and both would create one. Every event
first locks the purchase's identifiers (payment, membership, order, checkout), in one global
order so two events can never wait on each other in a circle. SQLite needs none of this: its
write transactions already run one at a time.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import String, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from whop_autocancel.db.base import Base
from whop_autocancel.db.engine import insert_once


class Lock(Base):
    __tablename__ = "locks"

    key: Mapped[str] = mapped_column(String(150), primary_key=True)


def lock_keys(session: Session, keys: Iterable[str | None]) -> None:
    """Hold a row lock on each key until the transaction ends."""
    if session.get_bind().dialect.name == "sqlite":
        return
    for key in sorted({key for key in keys if key}):
        insert_once(session, Lock(key=key))
        session.execute(select(Lock.key).where(Lock.key == key).with_for_update())
