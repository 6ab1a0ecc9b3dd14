"""The turns a pacer reserved for its callers and has not handed out yet (whop/pacing.py):
earliest first, never one that has passed by more than one interval, none drawn before a
stop."""

from __future__ import annotations

from whop_autocancel.whop.pacing import KeptSlots

INTERVAL = 10_000  # µs: 100 requests/s


def test_the_earliest_kept_turn_goes_first() -> None:
    kept = KeptSlots(INTERVAL)
    assert kept.keep([30_000, 10_000], kept.epoch)
    assert kept.keep([20_000], kept.epoch)
    assert len(kept) == 3
    assert [kept.take(0) for _ in range(4)] == [10_000, 20_000, 30_000, None]


def test_a_turn_passed_by_more_than_one_interval_is_dropped() -> None:
    kept = KeptSlots(INTERVAL)
    assert kept.keep([100_000, 105_000, 130_000], kept.epoch)
    # At 115 ms: 100 ms is 15 ms old (dropped), 105 ms exactly one interval old (it goes).
    assert kept.take(115_000) == 105_000
    assert len(kept) == 1
    assert kept.take(140_001) is None
    assert len(kept) == 0


def test_a_drop_empties_it_and_refuses_a_chunk_drawn_before_it() -> None:
    kept = KeptSlots(INTERVAL)
    drawn_at = kept.epoch
    assert kept.keep([1, 2], drawn_at)
    kept.drop()
    assert kept.take(0) is None
    assert not kept.keep([3], drawn_at)  # reserved before the stop: never handed out
    assert kept.take(0) is None
    assert kept.keep([4], kept.epoch)
    assert kept.take(0) == 4
