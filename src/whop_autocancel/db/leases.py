"""Small keyed rows with an expiry: who holds each periodic job this tick, and the Whop API key's
shared "not before" time after a 429. Compare-and-set, so it holds on every backend."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import ScalarSelect, String, bindparam, delete, func, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from whop_autocancel.db.base import Base, UTCDateTime
from whop_autocancel.db.engine import insert_once


class Lease(Base):
    __tablename__ = "leases"

    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    holder: Mapped[str] = mapped_column(String(100))
    until: Mapped[datetime] = mapped_column(UTCDateTime())


def try_acquire(session: Session, key: str, holder: str, now: datetime, seconds: float) -> bool:
    """Take the lease `key` until now+seconds if it is free (expired) or already ours."""
    until = now + timedelta(seconds=seconds)
    result = session.execute(
        update(Lease)
        .where(Lease.key == key, (Lease.until <= now) | (Lease.holder == holder))
        .values(holder=holder, until=until)
    )
    if result.rowcount == 1:  # type: ignore[attr-defined]
        return True
    if session.get(Lease, key) is not None:
        return False
    return insert_once(session, Lease(key=key, holder=holder, until=until))


_UNTIL = select(Lease.until).where(Lease.key == bindparam("key"))  # built once: read often


def until_of(key: str) -> ScalarSelect[datetime]:
    """The end of the lease `key` (NULL when there is none), as a column of another read."""
    return select(Lease.until).where(Lease.key == key).scalar_subquery()


def read_until(session: Session, key: str) -> datetime | None:
    return session.execute(_UNTIL, {"key": key}).scalar_one_or_none()


def extend_until(session: Session, key: str, holder: str, until: datetime) -> None:
    """Move `key`'s time forward to `until` (never backwards), creating it if needed."""
    current = session.get(Lease, key, with_for_update=True)
    if current is None:
        if insert_once(session, Lease(key=key, holder=holder, until=until)):
            return
        current = session.get(Lease, key, with_for_update=True, populate_existing=True)
        assert current is not None
    if current.until < until:
        current.until = until
        current.holder = holder


HEARTBEAT_PREFIX = "heartbeat:"


def beat(session: Session, owner: str, now: datetime) -> None:
    """Record that worker `owner` is alive now."""
    key = HEARTBEAT_PREFIX + owner
    if not session.execute(update(Lease).where(Lease.key == key).values(until=now)).rowcount:  # type: ignore[attr-defined]
        insert_once(session, Lease(key=key, holder=owner, until=now))


def latest_heartbeat(session: Session) -> datetime | None:
    """When the most recently alive worker last beat (None: no worker ever did)."""
    return session.execute(
        select(func.max(Lease.until)).where(Lease.key.startswith(HEARTBEAT_PREFIX))
    ).scalar_one_or_none()


def forget_heartbeats_before(session: Session, moment: datetime) -> int:
    """Drop the heartbeats of workers gone since `moment` (restarts leave one row each)."""
    result = session.execute(
        delete(Lease).where(Lease.key.startswith(HEARTBEAT_PREFIX), Lease.until < moment)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]
