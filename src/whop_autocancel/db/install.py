"""When this installation started watching Whop (DESIGN §5, "Install time"): recorded once, by
the first `migrate`, `serve` or `worker`. The Whop sweep never looks before it, and `backfill`
acts only on memberships created before it."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import String, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from whop_autocancel.db.base import Base, UTCDateTime
from whop_autocancel.db.engine import Database, insert_once

WATCHING_SINCE = "watching_since"


class ServiceMarker(Base):
    """A moment the service recorded once about itself, by name."""

    __tablename__ = "service_markers"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())


def watching_since(session: Session) -> datetime | None:
    """When the service started watching (None: never started on this database)."""
    return session.scalars(
        select(ServiceMarker.at).where(ServiceMarker.name == WATCHING_SINCE)
    ).first()


def record_watching_since(session: Session, now: datetime) -> datetime:
    """Record `now` as the install time unless one is recorded already; returns the one kept."""
    found = watching_since(session)
    if found is not None:
        return found
    if insert_once(session, ServiceMarker(name=WATCHING_SINCE, at=now)):
        return now
    kept = watching_since(session)
    assert kept is not None
    return kept


def start_watching(database: Database, now: datetime) -> datetime:
    """At every start (`migrate`, `serve`, `worker`): record `now` as the install time if none
    is recorded yet (the first start, or a database older than the marker); returns the one
    kept. Never moved afterwards."""
    return database.run(lambda session: record_watching_since(session, now))
