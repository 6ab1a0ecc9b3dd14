"""The shared budget of Whop calls (WHOP_RATE_LIMIT): one GCRA bucket row that every process
draws from, on SQLite, PostgreSQL and MariaDB; and the pacer that learns from Whop's answers.
The bucket's wall clock is given by the test, so nothing here waits."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from whop_autocancel.clock import FrozenClock
from whop_autocancel.db import buckets
from whop_autocancel.db.engine import Database
from whop_autocancel.schema.migrate import upgrade
from whop_autocancel.whop.client import WhopReply
from whop_autocancel.whop.pacing import BUCKET, WhopPacer

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
    assert second.stopped_for() == 0.0  # nothing happened meanwhile: it goes after its wait
    first.observe(WhopReply(status=429, retry_after=2.0))  # while it waits
    assert second.stopped_for() == pytest.approx(2.0)
    clock.advance(2.5)
    assert second.stopped_for() == 0.0
    first.observe(WhopReply(status=429, retry_after=600.0))
    assert second.stopped_for() == 0.0  # longer than MAX_HOLD: it goes and meets the 429
