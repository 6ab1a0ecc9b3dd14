"""Pacing every call to Whop under the API key's rate limit, together with every other process.

Two tools, one owner:
- **the shared bucket** (`db.buckets`, GCRA): `WHOP_RATE_LIMIT` requests/s with bursts of
  `WHOP_RATE_BURST`, one row in the database, so N workers on M machines together stay under one
  limit. Each request takes its turn and waits at most a few seconds: a 429 is rare, not the
  steering signal. The turns are drawn in small chunks: the caller that finds none kept
  reserves, in one short transaction, a turn for itself and one for each caller of this process
  waiting meanwhile (at most 50 ms of the rate: 1 at 10/s, so one transaction per request
  there; up to 5 at 100/s); the others take theirs without a transaction. A kept turn is
  handed out only until it is one interval late, and is dropped when Whop says stop;
- **the "not before" time** after Whop said stop (a 429's `Retry-After`, or
  `X-RateLimit-Remaining: 0` with its reset): work that is due reschedules itself past it
  instead of holding a slot (`not_before`), and the bucket's rate drops by a fifth and grows
  back over the next minutes, so a limit lower than configured (another app on the same key)
  is learned, not hit again and again. A call that has its turn waits out a short stop this
  process knows of: the one read with its chunk or set here; and, once its wait is over, one
  another process set meanwhile (`stopped_for`: read again unless this process read it at most
  FRESH_STOP ago).

Neither a kept turn nor a stop read that recently needs the database: `kept_turn` and
`known_stop` answer them without a transaction or a wait, so the asynchronous client asks them
on its event loop and hands a thread only what does need the database (a draw, a read).

The bucket reads the wall clock (it is shared across machines); the "not before" time reads the
service's clock, like every other due time.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
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
CHUNK_SECONDS = 0.05  # a chunk of turns is at most this much of the configured rate
# A "not before" time this process read at most this long ago is what a call that waited for
# its turn goes on, without reading it again: a stop another process met in the last moment
# is seen by the next read (a call it misses meets Whop's 429, which costs no attempt).
FRESH_STOP = CHUNK_SECONDS
# What a caller waiting for its turn does next, besides taking a kept turn (`WhopPacer._next`).
DRAW, WAIT, UNPACED = "draw", "wait", "unpaced"


def _held(blocked: float) -> float:
    """How long a call whose turn has come waits for a stop `blocked` seconds long: all of it,
    up to MAX_HOLD; a longer one not at all (it meets the 429; its row reschedules past it)."""
    return max(0.0, blocked) if blocked <= MAX_HOLD else 0.0


class KeptSlots:
    """The turns (wall µs) this process reserved for its callers and has not handed out yet,
    earliest first. A turn that has passed by more than one interval (of the configured rate:
    the shortest) is dropped, never sent late in a bunch; `drop` forgets them all, and refuses
    the chunks drawn before it (`epoch`). Not locked: the pacer's lock guards it."""

    def __init__(self, interval_us: float) -> None:
        self._interval_us = interval_us
        self._slots: deque[int] = deque()
        self.epoch = 0  # how many drops so far

    def __len__(self) -> int:
        return len(self._slots)

    def keep(self, slots: Iterable[int], epoch: int) -> bool:
        """Keep the turns of a chunk drawn at `epoch`; False (nothing kept) when a drop came
        since."""
        if epoch != self.epoch:
            return False
        self._slots = deque(sorted([*self._slots, *slots]))
        return True

    def take(self, now_us: int) -> int | None:
        """The earliest kept turn still good at `now_us`, or None."""
        while self._slots and now_us - self._slots[0] > self._interval_us:
            self._slots.popleft()
        return self._slots.popleft() if self._slots else None

    def drop(self) -> None:
        self._slots.clear()
        self.epoch += 1


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
        self._chunk = max(1, math.floor(rate * CHUNK_SECONDS))
        self._changed = threading.Condition(threading.Lock())
        self._kept = KeptSlots(buckets.MICROS / rate)
        self._waiting = 0  # callers in `turn` without a turn yet (the one drawing included)
        self._drawing = False  # one caller draws at a time; the others wait for its chunk
        self._drawing_since = 0  # the kept turns' epoch when that draw began
        self._failed_draws = 0
        self._stop: datetime | None = None  # the latest "not before" read or set here
        self._stop_read_us: int | None = None  # (wall) when it was last read from the database

    def callers_waiting(self) -> int:
        """Callers of this process waiting for their turn now (the one drawing included)."""
        with self._changed:
            return self._waiting

    def turn(self, wait: bool = True) -> float:
        """Take one request's turn from the shared budget: the seconds to wait before sending
        it (0 when `wait` is False: it goes now, and the others make room). A turn kept from
        this process's last chunk costs no transaction. The database being unreachable never
        stops a call: it goes unpaced, and Whop's 429 still holds."""
        if not wait:
            return self._turn_now()
        now_us = self._now_us()  # (never read under the lock: the clock is the caller's)
        with self._changed:
            self._waiting += 1
            failed = self._failed_draws
            found = self._next(now_us, failed)
        while found == WAIT:
            now_us = self._now_us()
            with self._changed:
                found = self._next(now_us, failed)
        if isinstance(found, int):
            return self._delay(found, now_us)
        return self._draw() if found == DRAW else 0.0

    def kept_turn(self) -> float | None:
        """`turn()` when a turn kept from this process's last chunk is there to take: the
        seconds to wait, with no transaction and no wait for another caller's draw (the
        asynchronous client asks it on its event loop). None when none is kept: ask `turn`."""
        now_us = self._now_us()
        with self._changed:
            slot = self._kept.take(now_us)
        return None if slot is None else self._delay(slot, now_us)

    def _next(self, now_us: int, failed: int) -> int | str:
        """Under the lock, for a caller counted in `_waiting`: a kept turn (it is counted out),
        UNPACED (a draw it waited for found no database: it goes unpaced too, instead of
        meeting the same wait again), DRAW (it draws the next chunk), or WAIT (it waited for the
        one being drawn: look again)."""
        slot = self._kept.take(now_us)
        if slot is not None:
            self._waiting -= 1
            return slot
        if self._failed_draws != failed:
            self._waiting -= 1
            return UNPACED
        if not self._drawing:
            self._drawing = True
            self._drawing_since = self._kept.epoch
            return DRAW
        self._changed.wait()
        return WAIT

    def _draw(self) -> float:
        """Reserve a chunk: this caller's turn and one for each caller waiting meanwhile (up to
        `_chunk`), counted once the bucket's row is locked; keep the others' turns."""

        def draw(session: Session) -> tuple[list[int], datetime | None, int]:
            row = buckets.locked(session, BUCKET, self.limit, self._now_us())
            now_us = self._now_us()  # once the row is ours: a wait for it is not a turn missed
            with self._changed:
                count = min(self._chunk, self._waiting)
            slots = buckets.take(row, self.limit, now_us, count)
            return slots, leases.read_until(session, NOT_BEFORE_KEY), now_us

        drawn: tuple[list[int], datetime | None, int] | None = None
        unreachable = False
        try:
            # Not flushed to disk: lost to a power cut, the budget is spent again (Whop's 429
            # still holds); see `Database.transaction`.
            drawn = self._database.run(draw, durable=False)
        except SQLAlchemyError as error:
            unreachable = True
            self._unavailable(error)
            return 0.0
        finally:
            with self._changed:
                self._drawing = False
                self._waiting -= 1
                if unreachable:
                    self._failed_draws += 1
                if drawn is not None:
                    self._learn(drawn[1], read_us=drawn[2])
                    self._kept.keep(drawn[0][1:], self._drawing_since)
                self._changed.notify_all()
        self._warned.clear()
        return self._delay(drawn[0][0], self._now_us())

    def _unavailable(self, error: SQLAlchemyError) -> None:
        """The database could not be asked for a turn: the call goes unpaced (said once, until
        a draw works again)."""
        if not self._warned.is_set():
            self._warned.set()
            log.warning("whop_pacing_unavailable", error=type(error).__name__)

    def _turn_now(self) -> float:
        """A call that goes now (a buyer's checkout) still spends a turn: one transaction of its
        own, as before chunks; it never takes a turn kept for the callers waiting."""
        now_us = self._now_us()

        def draw(session: Session) -> datetime | None:
            buckets.reserve(session, BUCKET, self.limit, now_us)
            return leases.read_until(session, NOT_BEFORE_KEY)

        try:
            not_before = self._database.run(draw, durable=False)
        except SQLAlchemyError as error:
            self._unavailable(error)
            return 0.0
        self._warned.clear()
        with self._changed:
            self._learn(not_before, read_us=now_us)
        metrics.observe_whop_pacing(0.0)
        return 0.0

    def _delay(self, slot_us: int, now_us: int) -> float:
        """The wait for a turn at `slot_us`. Whop said stop after it was claimed (this process
        knows of it): a short stop is waited out here; a long one is not (the call meets the
        429 and its row reschedules past it)."""
        delay = max(0.0, (slot_us - now_us) / buckets.MICROS)
        with self._changed:
            stop = self._stop
        blocked = (stop - self._clock.now()).total_seconds() if stop else 0.0
        if 0 < blocked <= MAX_HOLD:
            delay = max(delay, blocked)
        metrics.observe_whop_pacing(delay)
        return delay

    def _learn(self, not_before: datetime | None, *, read_us: int | None = None) -> None:
        """Remember the latest "not before" seen (it only ever moves forward); `read_us`: it
        was read from the database, at that wall time or later. Under the lock."""
        if not_before is not None and (self._stop is None or not_before > self._stop):
            self._stop = not_before
        if read_us is not None and (self._stop_read_us is None or read_us > self._stop_read_us):
            self._stop_read_us = read_us

    def _now_us(self) -> int:
        return int(self._wall() * buckets.MICROS)

    def stopped_for(self) -> float:
        """After a call waited for its turn: the seconds of a stop Whop asked for meanwhile (a
        429 answered to another call) that it waits out too, before it goes. 0: it goes now,
        also when the stop is longer than MAX_HOLD (it meets the 429; its row reschedules) or
        the database cannot be read (Whop's 429 still holds). Read from the database unless
        this process read it at most FRESH_STOP ago (`known_stop`)."""
        known = self.known_stop()
        if known is not None:
            return known
        try:
            blocked = self.waiting_for()
        except SQLAlchemyError:
            return 0.0
        return _held(blocked)

    def known_stop(self) -> float | None:
        """`stopped_for()` from what this process knows, when it read the "not before" time
        from the database at most FRESH_STOP ago (with a chunk, or a look before): no
        transaction (the asynchronous client asks it on its event loop). None when that read
        is older, or there was none: ask `stopped_for`."""
        now_us = self._now_us()
        with self._changed:
            read_us, stop = self._stop_read_us, self._stop
        if read_us is None or now_us - read_us > FRESH_STOP * buckets.MICROS:
            return None
        return _held((stop - self._clock.now()).total_seconds() if stop else 0.0)

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
        now_us = self._now_us()  # (before the read: what it reads is at least this fresh)
        until = self._database.read(lambda session: leases.read_until(session, NOT_BEFORE_KEY))
        with self._changed:
            self._learn(until, read_us=now_us)
        return until

    def waiting_for(self) -> float:
        """Seconds until calls may go again after Whop said stop (0: now)."""
        until = self.not_before()
        return max(0.0, (until - self._clock.now()).total_seconds()) if until else 0.0

    def _stop_until(self, seconds: float, *, slow: bool) -> None:
        """Stop everyone until `seconds` from now (and slow the bucket). The turns this process
        kept are dropped at once: they were reserved before the stop, and at the old rate."""
        until = self._clock.now() + timedelta(seconds=seconds)
        with self._changed:
            self._kept.drop()
            self._learn(until)
        now_us = self._now_us()

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
        if slow:  # a chunk drawn meanwhile may predate the slower rate: not handed out either
            with self._changed:
                self._kept.drop()
        log.warning(
            "whop_rate_limited" if slow else "whop_rate_budget_spent",
            wait=round(seconds, 3),
            rate_now=round(rate, 3) if rate is not None else None,
        )
