"""The SQLite write turn between a process's threads (issue 12): the webhook writer (urgent)
goes before the other waiting threads, yet after each urgent turn one waiting regular thread
goes first, so applying, delivering and mailing never starve while webhooks keep coming."""

from __future__ import annotations

import threading
from collections.abc import Callable

from support.harness import wait_for
from whop_autocancel.db.write_turn import WriteTurn


class Taker:
    """A thread that takes the turn, records its name in `order`, and holds the turn until the
    test lets it go."""

    def __init__(self, turn: WriteTurn, name: str, order: list[str], *, urgent: bool) -> None:
        self.release = threading.Event()
        self.holding = threading.Event()

        def take() -> None:
            with turn.turn(urgent=urgent):
                order.append(name)
                self.holding.set()
                assert self.release.wait(10), "the test never let the turn go"

        self.thread = threading.Thread(target=take, name=name, daemon=True)
        self.thread.start()

    def let_go(self) -> None:
        self.release.set()
        self.thread.join(10)
        assert not self.thread.is_alive()


def waiting(turn: WriteTurn, urgent: int, regular: int) -> Callable[[], bool]:
    return lambda: turn.waiting() == (urgent, regular)


def test_an_urgent_caller_goes_before_regular_ones_that_waited_longer() -> None:
    turn, order = WriteTurn(), []
    first = Taker(turn, "first", order, urgent=False)
    assert first.holding.wait(10)
    regular = Taker(turn, "regular", order, urgent=False)
    wait_for(waiting(turn, 0, 1), what="the regular caller waiting")
    urgent = Taker(turn, "urgent", order, urgent=True)
    wait_for(waiting(turn, 1, 1), what="the urgent caller waiting")
    first.let_go()
    assert urgent.holding.wait(10)
    assert not regular.holding.is_set()
    urgent.let_go()
    assert regular.holding.wait(10)
    regular.let_go()
    assert order == ["first", "urgent", "regular"]


def test_after_each_urgent_turn_a_waiting_regular_caller_goes_first() -> None:
    turn, order = WriteTurn(), []
    urgent = Taker(turn, "urgent-1", order, urgent=True)
    assert urgent.holding.wait(10)
    regulars = [Taker(turn, f"regular-{n}", order, urgent=False) for n in (1, 2)]
    wait_for(waiting(turn, 0, 2), what="two regular callers waiting")
    again = Taker(turn, "urgent-2", order, urgent=True)
    wait_for(waiting(turn, 1, 2), what="the urgent caller waiting again")
    urgent.let_go()
    # One regular caller had its turn owed: it goes, not the urgent one waiting.
    wait_for(lambda: len(order) == 2, what="the next turn taken")
    assert order[1].startswith("regular")
    assert not again.holding.is_set()
    taken = next(r for r in regulars if r.holding.is_set())
    taken.let_go()
    assert again.holding.wait(10)  # then urgent again, before the other regular caller
    assert len(order) == 3
    again.let_go()
    other = next(r for r in regulars if r is not taken)
    assert other.holding.wait(10)
    other.let_go()
    assert order[2] == "urgent-2"


def test_a_thread_holding_the_turn_takes_it_again_and_a_free_turn_is_taken_at_once() -> None:
    turn = WriteTurn()
    with turn.turn(urgent=False), turn.turn(urgent=True), turn.turn():
        assert turn.waiting() == (0, 0)
    taken = threading.Event()

    def take() -> None:
        with turn.turn():
            taken.set()

    thread = threading.Thread(target=take)
    thread.start()
    thread.join(10)
    assert taken.is_set()
