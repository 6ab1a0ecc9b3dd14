"""Failed dashboard logins, one row each, keyed by client address: the login throttle counts
them in the database, so every web process on every machine sees the same count."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Integer, String, delete, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from whop_autocancel.db.base import Base, UTCDateTime
from whop_autocancel.db.locks import lock_keys

KEY_CHARS = 64


class LoginFailure(Base):
    __tablename__ = "login_failures"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    client: Mapped[str] = mapped_column(String(KEY_CHARS), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


@dataclass(frozen=True)
class RecentFailures:
    count: int
    oldest: datetime | None  # the oldest failure in the window: the throttle lifts after it


def client_key(address: str | None) -> str:
    """What failures are counted by: the IPv4 address, or the IPv6 /64 (one host usually owns a
    whole /64, so counting single IPv6 addresses would count nothing)."""
    if not address:
        return "unknown"
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address[:KEY_CHARS]
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network((parsed, 64), strict=False).compressed)
    return str(parsed)


def record_failure(
    session: Session, client: str, now: datetime, *, prune_before: datetime | None = None
) -> None:
    """One failed login of `client` at `now`; rows older than `prune_before` (every client's)
    are deleted on the way, so the table stays small without a job."""
    if prune_before is not None:
        session.execute(delete(LoginFailure).where(LoginFailure.at < prune_before))
    session.add(LoginFailure(client=client[:KEY_CHARS], at=now))
    session.flush()


def recent_failures(session: Session, client: str, since: datetime) -> RecentFailures:
    count, oldest = session.execute(
        select(func.count(), func.min(LoginFailure.at)).where(
            LoginFailure.client == client[:KEY_CHARS], LoginFailure.at >= since
        )
    ).one()
    return RecentFailures(int(count), oldest)


def admit(
    session: Session, client: str, now: datetime, *, window: timedelta, limit: int
) -> RecentFailures | None:
    """A login attempt of `client`: None if it may try, else its recent failures (throttled).
    An attempt is counted as a failure *before* the password is checked (`forget` clears it on
    success): otherwise parallel guesses would all pass the count while argon2 runs. The count
    and the insert hold a per-client lock (SQLite: its one writer), so no two attempts of one
    client see the same count, on any number of processes."""
    lock_keys(session, [f"login:{client[:KEY_CHARS]}"])
    recent = recent_failures(session, client, now - window)
    if recent.count >= limit:
        return recent
    record_failure(session, client, now, prune_before=now - window)
    return None


def forget(session: Session, client: str) -> None:
    """A successful login clears its client's failures."""
    session.execute(delete(LoginFailure).where(LoginFailure.client == client[:KEY_CHARS]))
