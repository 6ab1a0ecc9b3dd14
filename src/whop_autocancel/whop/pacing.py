"""Pacing every call to Whop under the API key's rate limit, together with every other process.

Two tools, one owner:
- **the shared bucket** (`db.buckets`, GCRA): `WHOP_RATE_LIMIT` requests/s with bursts of
  `WHOP_RATE_BURST`, one row in the database, so N workers on M machines together stay under one
  limit. Each request takes its turn (one short transaction) and waits at most a few seconds:
  a 429 is rare, not the steering signal;
- **the "not before" time** after Whop said stop (a 429's `Retry-After`, or
  `X-RateLimit-Remaining: 0` with its reset): work that is due reschedules itself past it
  instead of holding a slot (`not_before`), and the bucket's rate drops by a fifth and grows
  back over the next minutes, so a limit lower than configured (another app on the same key)
  is learned, not hit again and again.

The bucket reads the wall clock (it is shared across machines); the "not before" time reads the
service's clock, like every other due time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta

import structlog
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from whop_autocancel import metrics
from whop_autocancel.clock import Clock
from whop_autocancel.db import buckets, leases
from whop_autocancel.db.engine import Database
from whop_autocancel.whop.client import WhopReply

log = structlog.get_logger(__name__)

BUCKET = "whop"
NOT_BEFORE_KEY = "whop:not_before"
SLOW_DOWN = 0.8  # a 429 costs a fifth of the rate in force; +1 %/s of the limit brings it back
MAX_HOLD = 10.0  # the longest "not before" a call already claimed waits out before it goes
DEFAULT_RETRY_AFTER = 60.0  # a 429 that does not say how long (Whop's documented cooldown)


class WhopPacer:
    def __init__(
        self,
        database: Database,
        clock: Clock,
        *,
        rate: float,
        burst: int,
        owner: str,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._database = database
        self._clock = clock
        self.limit = buckets.Limit(rate=rate, burst=burst)
        self._owner = owner
        self._wall = wall
        self._warned = threading.Event()

    def turn(self, wait: bool = True) -> float:
        """Draw one request from the shared budget: the seconds to wait before sending it (0
        when `wait` is False: it goes now, and the others make room). The database being
        unreachable never stops a call: it goes unpaced, and Whop's 429 still holds."""
        now_us = int(self._wall() * buckets.MICROS)

        def draw(session: Session) -> tuple[int, datetime | None]:
            [at_us] = buckets.reserve(session, BUCKET, self.limit, now_us)
            return at_us, leases.read_until(session, NOT_BEFORE_KEY)

        try:
            at_us, not_before = self._database.run(draw)
        except SQLAlchemyError as error:
            if not self._warned.is_set():
                self._warned.set()
                log.warning("whop_pacing_unavailable", error=type(error).__name__)
            return 0.0
        self._warned.clear()
        if not wait:
            metrics.observe_whop_pacing(0.0)
            return 0.0
        delay = (at_us - now_us) / buckets.MICROS
        # Whop said stop after this call was claimed: a short stop is waited out here; a
        # long one is not (the call meets the 429 and its row reschedules past it).
        blocked = (not_before - self._clock.now()).total_seconds() if not_before else 0.0
        if 0 < blocked <= MAX_HOLD:
            delay = max(delay, blocked)
        metrics.observe_whop_pacing(delay)
        return delay

    def stopped_for(self) -> float:
        """After a call waited for its turn: the seconds of a stop Whop asked for meanwhile (a
        429 answered to another call) that it waits out too, before it goes. 0: it goes now,
        also when the stop is longer than MAX_HOLD (it meets the 429; its row reschedules) or
        the database cannot be read (Whop's 429 still holds)."""
        try:
            blocked = self.waiting_for()
        except SQLAlchemyError:
            return 0.0
        return blocked if blocked <= MAX_HOLD else 0.0

    def observe(self, reply: WhopReply) -> None:
        """A 429 stops everyone until its `Retry-After` and slows the bucket; a
        `X-RateLimit-Remaining: 0` stops everyone until its reset."""
        if reply.status == 429:
            wait = reply.retry_after if reply.retry_after is not None else DEFAULT_RETRY_AFTER
            self._stop_until(wait, slow=True)
        elif reply.remaining == 0 and reply.reset_after is not None:
            self._stop_until(reply.reset_after, slow=False)

    def not_before(self) -> datetime | None:
        """Until when Whop asked everyone to wait (None, or a past time: go)."""
        return self._database.run(lambda session: leases.read_until(session, NOT_BEFORE_KEY))

    def waiting_for(self) -> float:
        """Seconds until calls may go again after Whop said stop (0: now)."""
        until = self.not_before()
        return max(0.0, (until - self._clock.now()).total_seconds()) if until else 0.0

    def _stop_until(self, seconds: float, *, slow: bool) -> None:
        until = self._clock.now() + timedelta(seconds=seconds)
        now_us = int(self._wall() * buckets.MICROS)

        def record(session: Session) -> float | None:
            leases.extend_until(session, NOT_BEFORE_KEY, self._owner, until)
            if slow:
                return buckets.slow_down(session, BUCKET, self.limit, now_us, SLOW_DOWN)
            return None

        try:
            rate = self._database.run(record)
        except SQLAlchemyError as error:
            log.warning("whop_pacing_unavailable", error=type(error).__name__)
            return
        log.warning(
            "whop_rate_limited" if slow else "whop_rate_budget_spent",
            wait=round(seconds, 3),
            rate_now=round(rate, 3) if rate is not None else None,
        )
