"""The shared budget of Whop calls (WHOP_RATE_LIMIT): one GCRA bucket row that every process
draws from, on SQLite, PostgreSQL and MariaDB; and the pacer that learns from Whop's answers.
The bucket's wall clock is given by the test, so nothing here waits."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import pytest
from sqlalchemy import event, select

from support.harness import wait_for
from whop_autocancel.clock import FrozenClock
from whop_autocancel.db import buckets
from whop_autocancel.db.engine import Database
from whop_autocancel.schema.migrate import upgrade
from whop_autocancel.whop.client import WhopReply
from whop_autocancel.whop.pacing import BUCKET, FRESH_STOP, WhopPacer

T0 = 1_800_000_000.0  # the wall clock the test gives the bucket (seconds since the epoch)
US = buckets.MICROS


@pytest.fixture
def databases(database_url: str) -> Iterator[tuple[Database, Database]]:
    """Two connections pools on one database: two processes sharing the budget."""
    first, second = Database(database_url), Database(database_url)
    upgrade(first)
    yield first, second
    first.dispose()
    second.dispose()


def draw(database: Database, limit: buckets.Limit, at: float) -> float:
    """One turn at wall time `at`: when it may go (seconds)."""
    now_us = int(at * US)
    return database.run(lambda s: buckets.reserve(s, BUCKET, limit, now_us))[0] / US


def draw_many(database: Database, limit: buckets.Limit, at: float, count: int) -> list[float]:
    """`count` turns in one transaction at wall time `at`: when each may go (seconds)."""
    now_us = int(at * US)
    slots = database.run(lambda s: buckets.reserve(s, BUCKET, limit, now_us, count))
    return [slot / US for slot in slots]


def test_a_burst_goes_at_once_then_one_request_per_interval(
    databases: tuple[Database, Database],
) -> None:
    database, _ = databases
    limit = buckets.Limit(rate=10, burst=3)
    slots = [draw(database, limit, T0) for _ in range(6)]
    assert slots[:3] == [T0, T0, T0]
    assert slots[3:] == pytest.approx([T0 + 0.1, T0 + 0.2, T0 + 0.3])
    # After a quiet spell the bucket is full again, never fuller.
    later = T0 + 60
    assert [draw(database, limit, later) for _ in range(4)] == pytest.approx(
        [later, later, later, later + 0.1]
    )


def test_one_transaction_reserves_several_consecutive_turns(
    databases: tuple[Database, Database],
) -> None:
    """A chunk is the turns that many single draws at that moment would have given: the burst
    first, then one interval apart; the next draw continues after it."""
    database, _ = databases
    limit = buckets.Limit(rate=100, burst=2)
    assert draw_many(database, limit, T0, 5) == pytest.approx(
        [T0, T0, T0 + 0.01, T0 + 0.02, T0 + 0.03]
    )
    assert draw(database, limit, T0) == pytest.approx(T0 + 0.04)
    assert draw_many(database, limit, T0, 2) == pytest.approx([T0 + 0.05, T0 + 0.06])
    with pytest.raises(ValueError, match="at least one"):
        draw_many(database, limit, T0, 0)


def test_two_processes_share_one_budget(databases: tuple[Database, Database]) -> None:
    """Turns drawn by two processes at once interleave into one schedule: never more than the
    rate between them, whoever draws."""
    limit = buckets.Limit(rate=5, burst=1)
    slots: list[float] = []
    lock = threading.Lock()

    def process(database: Database) -> None:
        for _ in range(10):
            slot = draw(database, limit, T0)
            with lock:
                slots.append(slot)

    threads = [threading.Thread(target=process, args=(db,)) for db in databases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(slots) == pytest.approx([T0 + i * 0.2 for i in range(20)])


def test_a_slow_down_lowers_the_rate_and_it_grows_back(
    databases: tuple[Database, Database],
) -> None:
    database, _ = databases
    limit = buckets.Limit(rate=10, burst=1, recovery=0.01, floor=0.1)
    rate = database.run(lambda s: buckets.slow_down(s, BUCKET, limit, int(T0 * US), 0.5))
    assert rate == pytest.approx(5.0)
    with database.transaction() as session:
        row = session.scalars(select(buckets.RateBucket)).one()
        assert buckets.rate_in_force(row, limit, int(T0 * US)) == pytest.approx(5.0)
        # +1 % of the limit per second: 0.5 of it back after 50 s, never above the limit.
        assert buckets.rate_in_force(row, limit, int((T0 + 20) * US)) == pytest.approx(7.0)
        assert buckets.rate_in_force(row, limit, int((T0 + 500) * US)) == pytest.approx(10.0)
    # Slowed turns are spaced by the lower rate.
    first = draw(database, limit, T0)
    assert draw(database, limit, T0) - first == pytest.approx(0.2)
    assert draw_many(database, limit, T0, 2) == pytest.approx([first + 0.4, first + 0.6])
    # Repeated 429s never push the rate below its floor.
    for _ in range(20):
        rate = database.run(lambda s: buckets.slow_down(s, BUCKET, limit, int(T0 * US), 0.5))
    assert rate == pytest.approx(1.0)


class Wall:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def make_pacer(database: Database, wall: Wall, clock: FrozenClock, **limit: float) -> WhopPacer:
    return WhopPacer(
        database,
        clock,
        rate=limit.get("rate", 10),
        burst=int(limit.get("burst", 2)),
        owner="test",
        wall=wall,
    )


def test_the_pacer_says_how_long_to_wait_and_a_checkout_never_waits(
    databases: tuple[Database, Database],
) -> None:
    database, _ = databases
    wall, clock = Wall(), FrozenClock(datetime(2026, 12, 5, tzinfo=UTC))
    pacer = make_pacer(database, wall, clock, rate=10, burst=2)
    assert [pacer.turn() for _ in range(2)] == [0.0, 0.0]
    assert pacer.turn() == pytest.approx(0.1)
    # A buyer's checkout goes now, but spends from the budget: the next turn is later.
    assert pacer.turn(wait=False) == 0.0
    assert pacer.turn() == pytest.approx(0.3)


def test_a_429_stops_every_process_and_slows_the_budget(
    databases: tuple[Database, Database],
) -> None:
    first_db, second_db = databases
    wall, clock = Wall(), FrozenClock(datetime(2026, 12, 5, tzinfo=UTC))
    first = make_pacer(first_db, wall, clock, rate=10, burst=1)
    second = make_pacer(second_db, wall, clock, rate=10, burst=1)
    assert second.waiting_for() == 0.0
    first.observe(WhopReply(status=429, retry_after=30.0))
    assert second.waiting_for() == pytest.approx(30.0)
    first_turn = second.turn()
    assert second.turn() - first_turn == pytest.approx(1 / 8)  # 10/s slowed by a fifth
    clock.advance(31)
    assert second.waiting_for() == 0.0


def test_rate_limit_headers_stop_everyone_until_the_reset_without_slowing(
    databases: tuple[Database, Database],
) -> None:
    database, _ = databases
    wall, clock = Wall(), FrozenClock(datetime(2026, 12, 5, tzinfo=UTC))
    pacer = make_pacer(database, wall, clock, rate=10, burst=1)
    pacer.observe(WhopReply(status=200, remaining=3, reset_after=5.0))
    assert pacer.waiting_for() == 0.0
    pacer.observe(WhopReply(status=200, remaining=0, reset_after=5.0))
    assert pacer.waiting_for() == pytest.approx(5.0)
    assert pacer.turn() == pytest.approx(5.0)  # a claimed call waits for the reset
    clock.advance(5)
    wall.now += 5
    first_turn = pacer.turn()
    assert pacer.turn() - first_turn == pytest.approx(0.1)  # the rate is untouched


def test_an_unreachable_database_never_stops_a_call(tmp_path: object) -> None:
    database = Database("postgresql://nobody@127.0.0.1:9/none")
    wall, clock = Wall(), FrozenClock(datetime(2026, 12, 5, tzinfo=UTC))
    try:
        assert make_pacer(database, wall, clock).turn() == 0.0
    finally:
        database.dispose()


def test_a_call_claimed_before_a_short_stop_waits_it_out_a_long_one_does_not(
    databases: tuple[Database, Database],
) -> None:
    first_db, second_db = databases
    wall, clock = Wall(), FrozenClock(datetime(2026, 12, 5, tzinfo=UTC))
    first = make_pacer(first_db, wall, clock, rate=10, burst=5)
    second = make_pacer(second_db, wall, clock, rate=10, burst=5)
    first.observe(WhopReply(status=429, retry_after=2.0))
    assert second.turn() == pytest.approx(2.0)  # claimed already: it waits, it does not go
    assert second.turn(wait=False) == 0.0  # a buyer's checkout still goes
    clock.advance(3)
    first.observe(WhopReply(status=429, retry_after=600.0))
    # Longer than MAX_HOLD: the call goes and its row reschedules on the 429.
    assert second.turn() < 1.0


def test_a_stop_whop_asks_for_while_a_call_waits_for_its_turn_is_waited_out_too(
    databases: tuple[Database, Database],
) -> None:
    """A call that drew a later slot looks again once its wait is over: a 429 answered to
    another call meanwhile stops it as well (a short stop; a long one it meets)."""
    first_db, second_db = databases
    wall, clock = Wall(), FrozenClock(datetime(2026, 12, 5, tzinfo=UTC))
    first = make_pacer(first_db, wall, clock, rate=10, burst=1)
    second = make_pacer(second_db, wall, clock, rate=10, burst=1)
    assert first.turn() == 0.0
    assert second.turn() == pytest.approx(0.1)  # its slot is a tenth of a second away
    wall.now += 0.1  # (its wait)
    assert second.stopped_for() == 0.0  # nothing happened meanwhile: it goes after its wait
    first.observe(WhopReply(status=429, retry_after=2.0))  # while it waits
    wall.now += FRESH_STOP * 2  # (what `second` read is older than FRESH_STOP: it reads again)
    assert second.stopped_for() == pytest.approx(2.0)
    clock.advance(2.5)
    assert second.stopped_for() == 0.0
    first.observe(WhopReply(status=429, retry_after=600.0))
    assert second.stopped_for() == 0.0  # longer than MAX_HOLD: it goes and meets the 429


# Chunks: a pacer draws the turns of every caller of its process that waits, in one transaction.


@contextmanager
def holding_the_bucket(database_url: str) -> Iterator[None]:
    """Another process holds the bucket's row (on SQLite: the write lock) until the block ends:
    the callers of the pacers under test pile up meanwhile."""
    holder = Database(database_url)
    try:
        with holder.transaction() as session:
            assert session.get(buckets.RateBucket, BUCKET, with_for_update=True) is not None
            yield
    finally:
        holder.dispose()


@contextmanager
def counting_commits(*databases: Database) -> Iterator[list[int]]:
    commits: list[int] = []
    listener = lambda _connection: commits.append(1)  # noqa: E731
    for database in databases:
        event.listen(database.engine, "commit", listener)
    try:
        yield commits
    finally:
        for database in databases:
            event.remove(database.engine, "commit", listener)


class Callers:
    """`count` threads named `name-0`, `name-1`…, each taking one turn from `pacer`."""

    def __init__(self, pacer: WhopPacer, count: int, name: str = "caller") -> None:
        self.waits: list[float] = []
        self._lock = threading.Lock()
        self._pacer = pacer
        self._threads = [
            threading.Thread(target=self._take, name=f"{name}-{i}", daemon=True)
            for i in range(count)
        ]
        for thread in self._threads:
            thread.start()

    def _take(self) -> None:
        wait = self._pacer.turn()
        with self._lock:
            self.waits.append(wait)

    def join(self) -> list[float]:
        """Their waits, shortest first."""
        for thread in self._threads:
            thread.join(10)
            assert not thread.is_alive(), "a caller never got its turn"
        assert len(self.waits) == len(self._threads)
        return sorted(self.waits)


class StallingWall(Wall):
    """A wall clock that stalls the threads whose name starts with a prefix when they read it,
    as a busy machine deschedules a thread, until the test lets them go."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = threading.Condition()
        self._prefix: str | None = None
        self.stalled = 0

    def stall(self, prefix: str) -> None:
        with self._changed:
            self._prefix = prefix

    def release(self) -> None:
        with self._changed:
            self._prefix = None
            self._changed.notify_all()

    def __call__(self) -> float:
        with self._changed:
            if self._prefix and threading.current_thread().name.startswith(self._prefix):
                self.stalled += 1
                self._changed.wait_for(lambda: self._prefix is None, timeout=10)
            return self.now


def callers_waiting(pacer: WhopPacer, count: int) -> None:
    wait_for(lambda: pacer.callers_waiting() == count, what=f"{count} callers waiting")


def test_at_100_a_second_one_transaction_gives_a_turn_to_every_caller_waiting(
    databases: tuple[Database, Database], database_url: str
) -> None:
    """The caller that draws reserves a turn for itself and one for each caller of its process
    waiting meanwhile, up to 50 ms of the rate (5 at 100/s): six callers, two transactions."""
    database, _ = databases
    wall, clock = Wall(), FrozenClock(datetime(2026, 12, 5, tzinfo=UTC))
    pacer = make_pacer(database, wall, clock, rate=100, burst=1)
    assert pacer.turn() == 0.0
    with counting_commits(database) as commits:
        with holding_the_bucket(database_url):
            first = Callers(pacer, 1)
            callers_waiting(pacer, 1)
            others = Callers(pacer, 5)
            callers_waiting(pacer, 6)
        waits = sorted(first.join() + others.join())
    assert waits == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05, 0.06])
    assert len(commits) == 2


def test_at_10_a_second_each_call_is_still_one_transaction(
    databases: tuple[Database, Database], database_url: str
) -> None:
    """50 ms of 10/s is less than one turn: the chunk stays one, as before chunks."""
    database, _ = databases
    wall, clock = Wall(), FrozenClock(datetime(2026, 12, 5, tzinfo=UTC))
    pacer = make_pacer(database, wall, clock, rate=10, burst=1)
    assert pacer.turn() == 0.0
    with counting_commits(database) as commits:
        with holding_the_bucket(database_url):
            callers = Callers(pacer, 6)
            callers_waiting(pacer, 6)
        waits = callers.join()
    assert waits == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert len(commits) == 6


def test_two_processes_drawing_chunks_never_exceed_the_limit_over_any_window(
    databases: tuple[Database, Database], database_url: str
) -> None:
    """Rounds of four callers in each of two processes, the wall moving on between rounds
    (quiet spells refill the burst): every process draws each round's turns in one
    transaction, and the times the calls go never hold more than rate * t + burst calls in any
    window t."""
    rate, burst = 100, 3
    wall, clock = Wall(), FrozenClock(datetime(2026, 12, 5, tzinfo=UTC))
    pacers = [make_pacer(db, wall, clock, rate=rate, burst=burst) for db in databases]
    pacers[0].turn()  # the bucket's row exists
    goes = [0]  # when each call goes: µs after T0
    steps = [0.0, 0.013, 0.013, 0.5, 0.004, 0.013, 0.9, 0.02, 0.0]
    with counting_commits(*databases) as commits:
        for step in steps:
            wall.now += step
            with holding_the_bucket(database_url):
                callers = [Callers(pacer, 4) for pacer in pacers]
                for pacer in pacers:
                    callers_waiting(pacer, 4)
            for each in callers:
                goes.extend(round((wall.now - T0 + wait) * US) for wait in each.join())
    assert len(commits) == 2 * len(steps)
    goes.sort()
    assert len(goes) == 1 + 8 * len(steps)
    for i, start in enumerate(goes):
        for j in range(i, len(goes)):
            # (to the microsecond: the wall is a float)
            assert (j - i + 1) * US <= rate * (goes[j] - start + 1) + burst * US, (start, goes[j])


def three_kept_and_stalled(pacer: WhopPacer, wall: StallingWall, database_url: str) -> Callers:
    """One caller draws while three more wait: one transaction, its turn (T0 + 0.01) and three
    kept for the others (T0 + 0.02, 0.03, 0.04), who stall (their threads descheduled) right
    before they take them. The three."""
    with holding_the_bucket(database_url):
        drawer = Callers(pacer, 1, name="drawer")
        callers_waiting(pacer, 1)
        kept = Callers(pacer, 3, name="kept")
        callers_waiting(pacer, 4)
        wall.stall("kept")
    assert drawer.join() == pytest.approx([0.01])
    wait_for(lambda: wall.stalled == 3, what="the kept callers stalled")
    return kept


def test_a_429_drops_the_turns_kept_for_callers_and_they_draw_again_at_the_slower_rate(
    databases: tuple[Database, Database], database_url: str
) -> None:
    """Turns reserved for the callers waiting, not taken yet when a 429 comes (their threads
    were descheduled), were drawn at the old rate: they are dropped, and those callers draw
    again, at the slowed rate."""
    database, _ = databases
    wall, clock = StallingWall(), FrozenClock(datetime(2026, 12, 5, tzinfo=UTC))
    pacer = make_pacer(database, wall, clock, rate=100, burst=1)
    assert pacer.turn() == 0.0
    try:
        with counting_commits(database) as commits:
            kept = three_kept_and_stalled(pacer, wall, database_url)
            assert len(commits) == 1
            pacer.observe(WhopReply(status=429, retry_after=0.5))
            assert len(commits) == 2
            clock.advance(0.5)  # the stop is over (the wall, the bucket's clock, stands still)
            wall.release()
            waits = kept.join()
    finally:
        wall.release()
    # Not T0 + 0.02, 0.03, 0.04 (the kept turns): the next ones, 1/80 s apart.
    assert waits == pytest.approx([0.05, 0.05 + 1 / 80, 0.05 + 2 / 80])
    assert len(commits) == 3


def test_a_kept_turn_that_has_passed_by_more_than_one_interval_is_dropped(
    databases: tuple[Database, Database], database_url: str
) -> None:
    """A kept turn is taken late only a little (less than one interval): older ones are
    dropped, never sent late in a bunch, and the caller draws a new one."""
    database, _ = databases
    wall, clock = StallingWall(), FrozenClock(datetime(2026, 12, 5, tzinfo=UTC))
    pacer = make_pacer(database, wall, clock, rate=100, burst=1)
    assert pacer.turn() == 0.0
    try:
        with counting_commits(database) as commits:
            kept = three_kept_and_stalled(pacer, wall, database_url)
            # Kept: T0 + 0.02, 0.03, 0.04. At T0 + 0.035 the first is 15 ms old (dropped),
            # the second 5 ms (goes now), the third is 5 ms ahead.
            wall.now = T0 + 0.035
            wall.release()
            waits = kept.join()
    finally:
        wall.release()
    # The caller whose turn was dropped drew the next one, at T0 + 0.05.
    assert waits == pytest.approx([0.0, 0.005, 0.015])
    assert len(commits) == 2


def test_a_kept_turn_is_taken_without_a_transaction_by_a_caller_that_cannot_wait_for_a_draw(
    databases: tuple[Database, Database], database_url: str
) -> None:
    """`kept_turn` is `turn` for a caller that must not block (the asynchronous client asks it
    on its event loop): a turn kept from the last chunk, taken with no transaction, or None
    when none is kept (the caller then asks `turn` in a thread). The callers it was kept for
    draw again, as when a new caller takes a kept turn before they wake."""
    database, _ = databases
    wall, clock = StallingWall(), FrozenClock(datetime(2026, 12, 5, tzinfo=UTC))
    pacer = make_pacer(database, wall, clock, rate=100, burst=1)
    assert pacer.kept_turn() is None  # nothing drawn yet
    assert pacer.turn() == 0.0
    try:
        with counting_commits(database) as commits:
            kept = three_kept_and_stalled(pacer, wall, database_url)  # T0 + 0.02, 0.03, 0.04
            assert len(commits) == 1
            assert pacer.kept_turn() == pytest.approx(0.02)
            assert len(commits) == 1
            assert pacer.callers_waiting() == 3  # (the stalled ones: it was none of them)
            wall.release()
            waits = kept.join()
    finally:
        wall.release()
    # Two took the turns left (T0 + 0.03, 0.04), the third drew the next one (T0 + 0.05).
    assert waits == pytest.approx([0.03, 0.04, 0.05])
    assert len(commits) == 2
    assert pacer.kept_turn() is None


def test_a_call_goes_on_the_stop_its_process_read_within_fresh_stop_without_reading_it_again(
    databases: tuple[Database, Database],
) -> None:
    """After its wait a call asks whether Whop said stop meanwhile (`stopped_for`). What its
    process read from the database (with a chunk, or a look before) at most FRESH_STOP ago is
    the answer, with no transaction (`known_stop`, asked on the asynchronous client's event
    loop; None when older); a stop another process set since is read once that is older, and
    a stop met in this process is known at once."""
    first_db, second_db = databases
    wall, clock = Wall(), FrozenClock(datetime(2026, 12, 5, tzinfo=UTC))
    first = make_pacer(first_db, wall, clock, rate=10, burst=1)
    second = make_pacer(second_db, wall, clock, rate=10, burst=1)
    assert second.known_stop() is None  # nothing read yet
    assert second.turn() == 0.0  # (its chunk read the stop: none)
    first.observe(WhopReply(status=429, retry_after=2.0))  # another process is told to stop
    with counting_commits(second_db) as commits:
        wall.now += FRESH_STOP / 2
        assert second.known_stop() == 0.0
        assert second.stopped_for() == 0.0  # it goes: what it read is fresh enough
        assert len(commits) == 0
        wall.now += FRESH_STOP
        assert second.known_stop() is None
        assert second.stopped_for() == pytest.approx(2.0)  # read again: the stop is seen
        assert len(commits) == 1
        assert second.known_stop() == pytest.approx(2.0)  # (fresh again)
        clock.advance(1)
        second.observe(WhopReply(status=429, retry_after=5.0))  # met here: known at once
        assert second.known_stop() == pytest.approx(5.0)


def test_turns_handed_out_from_a_chunk_wait_out_the_stop_read_with_it(
    databases: tuple[Database, Database], database_url: str
) -> None:
    """A stop another process set is read with the chunk: every turn of the chunk waits it out,
    not only the drawer's, with no transaction of their own."""
    first_db, second_db = databases
    wall, clock = Wall(), FrozenClock(datetime(2026, 12, 5, tzinfo=UTC))
    first = make_pacer(first_db, wall, clock, rate=100, burst=1)
    second = make_pacer(second_db, wall, clock, rate=100, burst=1)
    assert first.turn() == 0.0
    second.observe(WhopReply(status=200, remaining=0, reset_after=2.0))
    with counting_commits(first_db) as commits:
        with holding_the_bucket(database_url):
            callers = Callers(first, 4)
            callers_waiting(first, 4)
        assert callers.join() == pytest.approx([2.0] * 4)
    assert len(commits) == 1


def test_callers_waiting_for_a_draw_the_database_refused_go_at_once() -> None:
    database = Database("postgresql://nobody@127.0.0.1:9/none")
    wall, clock = Wall(), FrozenClock(datetime(2026, 12, 5, tzinfo=UTC))
    try:
        pacer = make_pacer(database, wall, clock, rate=100, burst=1)
        assert Callers(pacer, 6).join() == [0.0] * 6
        assert pacer.callers_waiting() == 0
    finally:
        database.dispose()
