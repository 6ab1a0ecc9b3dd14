"""The SQLite write turn between a process's threads (issue 12): the webhook writer (urgent)
goes before the other waiting threads, yet after each urgent turn one waiting regular thread
goes first, so applying, delivering and mailing never starve while webhooks keep coming."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

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


def lock_is_free(path: Path) -> bool:
    """Whether another process could take the lock file now (a probe of its own)."""
    with path.open("a") as probe:
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(probe, fcntl.LOCK_UN)
        return True


def test_the_turn_is_held_against_other_processes_from_first_take_to_last_release(
    tmp_path: Path,
) -> None:
    """Processes that share one SQLite file (`serve` and `worker` on one machine) hand the write
    turn over through a lock file, without SQLite's busy timeout sleeping between its polls."""
    path = tmp_path / "service.db-writer"
    turn = WriteTurn(path)
    assert lock_is_free(path)
    with turn.turn():
        assert not lock_is_free(path)
        with turn.turn():  # taken again by the same thread (a nested transaction)
            assert not lock_is_free(path)
        assert not lock_is_free(path)
    assert lock_is_free(path)
    holder = Taker(turn, "holder", [], urgent=True)
    assert holder.holding.wait(10)
    assert not lock_is_free(path)
    holder.let_go()
    assert lock_is_free(path)


def test_another_process_waits_for_the_turn_and_a_killed_holder_frees_it(tmp_path: Path) -> None:
    path = tmp_path / "service.db-writer"
    script = (
        "import sys, time\n"
        "from whop_autocancel.db.write_turn import WriteTurn\n"
        "with WriteTurn(sys.argv[1]).turn():\n"
        "    print('holding', flush=True)\n"
        "    time.sleep(600)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "holding"
        order: list[str] = []
        waiter = Taker(WriteTurn(path), "waiter", order, urgent=False)
        assert not lock_is_free(path)
        assert order == []  # the child holds it: this process's caller waits
        child.kill()  # kill -9: the kernel frees its lock
        child.wait(10)
        assert waiter.holding.wait(10)
        assert order == ["waiter"]
        waiter.let_go()
        assert lock_is_free(path)
    finally:
        child.kill()
        child.wait(10)


def test_many_callers_each_get_the_turn_alone_and_none_is_left_waiting() -> None:
    """The turn is handed from one caller straight to the next (one thread woken, not all)."""
    turn = WriteTurn()
    inside: list[str] = []
    overlaps: list[tuple[str, ...]] = []
    taken: list[str] = []
    lock = threading.Lock()

    def caller(name: str, urgent: bool) -> None:
        for _ in range(50):
            with turn.turn(urgent=urgent):
                with lock:
                    if inside:
                        overlaps.append((*inside, name))
                    inside.append(name)
                with turn.turn(urgent=urgent):  # nested: the same thread takes it again
                    taken.append(name)
                with lock:
                    inside.remove(name)

    threads = [
        threading.Thread(target=caller, args=(f"t{n}", n % 3 == 0), daemon=True) for n in range(12)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive()
    assert overlaps == []
    assert len(taken) == 12 * 50
    assert turn.waiting() == (0, 0)
