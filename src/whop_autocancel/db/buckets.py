"""Shared token buckets: one row per bucket, so every process on every machine draws from the
same budget. The algorithm is GCRA (a token bucket kept as one time, the "theoretical arrival
time" of the next request): a reservation is one short transaction that reads and moves that
time under a row lock, and returns when the caller may go."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import BigInteger, Float, String
from sqlalchemy.orm import Mapped, Session, mapped_column

from whop_autocancel.db.base import Base
from whop_autocancel.db.engine import insert_once

MICROS = 1_000_000


class RateBucket(Base):
    __tablename__ = "rate_buckets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    # When the bucket is empty again if nothing else is drawn (µs since the epoch).
    next_free_us: Mapped[int] = mapped_column(BigInteger)
    # The rate in force (requests/s): the configured one, or lower after the server said "slow
    # down" (`slowed_at_us`), growing back linearly from then on.
    rate: Mapped[float] = mapped_column(Float)
    slowed_at_us: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


@dataclass(frozen=True)
class Limit:
    """A bucket's shape: `rate` requests per second, at most `burst` at once after a pause.
    `recovery`: how much of `rate` comes back per second after a slow-down."""

    rate: float
    burst: int
    recovery: float = 0.01
    floor: float = 0.1  # never slower than this share of `rate`


def locked(session: Session, name: str, limit: Limit, now_us: int) -> RateBucket:
    """Bucket `name`'s row, locked until the transaction ends (created full when missing)."""
    row = session.get(RateBucket, name, with_for_update=True)
    if row is None:
        created = RateBucket(name=name, next_free_us=now_us, rate=limit.rate, slowed_at_us=None)
        if insert_once(session, created):
            return created
        row = session.get(RateBucket, name, with_for_update=True, populate_existing=True)
        assert row is not None
    return row


def rate_in_force(row: RateBucket, limit: Limit, now_us: int) -> float:
    """The stored rate, grown back towards the configured one since the last slow-down (a
    configured rate lower than the stored one wins at once)."""
    if row.slowed_at_us is None:
        return limit.rate
    elapsed = max(0, now_us - row.slowed_at_us) / MICROS
    return min(limit.rate, row.rate + limit.rate * limit.recovery * elapsed)


def reserve(session: Session, name: str, limit: Limit, now_us: int, n: int = 1) -> list[int]:
    """Draw `n` consecutive requests from bucket `name` in this transaction: the times (µs since
    the epoch, earliest first) at which each may go, `now_us` for those the bucket has a token
    for now. Never refuses: a later time is the answer."""
    return take(locked(session, name, limit, now_us), limit, now_us, n)


def take(row: RateBucket, limit: Limit, now_us: int, n: int = 1) -> list[int]:
    """`reserve` on a row already `locked` in this transaction: the turns `n` single draws in a
    row at `now_us` would give (the burst first, then one interval of the rate in force
    apart)."""
    if n < 1:
        raise ValueError(f"a reservation takes at least one turn, not {n}")
    interval = MICROS / rate_in_force(row, limit, now_us)
    tolerance = (limit.burst - 1) * interval
    due = max(row.next_free_us, now_us)
    row.next_free_us = int(due + n * interval)
    return [int(max(now_us, due + i * interval - tolerance)) for i in range(n)]


def slow_down(session: Session, name: str, limit: Limit, now_us: int, factor: float) -> float:
    """The server refused for rate (a 429): the rate in force drops to `factor` of itself (not
    below `limit.floor` of the configured rate) and grows back from now. Returns it."""
    row = locked(session, name, limit, now_us)
    lowered = max(limit.rate * limit.floor, rate_in_force(row, limit, now_us) * factor)
    row.rate = lowered
    row.slowed_at_us = now_us
    return lowered
