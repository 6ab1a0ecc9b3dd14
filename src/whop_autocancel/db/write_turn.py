"""The turn to write to SQLite, between the threads of one process.

SQLite lets one transaction write at a time (ours all begin IMMEDIATE), and a transaction that
waits for another process polls with growing sleeps (its busy timeout). Between the threads of
one process (`serve`: requests, the webhook writer, the worker's jobs) this turn hands the lock
over at once instead, and in an order that keeps Whop answered fast: an *urgent* caller (the
webhook writer, whose commit a sender is waiting on) goes before the others that wait, and after
each urgent turn one waiting regular caller goes before the next urgent one, so neither side
can starve the other. A thread that holds the turn may take it again (nested transactions).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class WriteTurn:
    def __init__(self) -> None:
        self._changed = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._urgent_waiting = 0
        self._regular_waiting = 0
        self._regular_owed = False  # an urgent turn ended while regular callers waited

    @contextmanager
    def turn(self, *, urgent: bool = False) -> Iterator[None]:
        self._acquire(urgent)
        try:
            yield
        finally:
            self._release(urgent)

    def waiting(self) -> tuple[int, int]:
        """(urgent, regular) callers waiting for the turn now."""
        with self._changed:
            return self._urgent_waiting, self._regular_waiting

    def _may_go(self, urgent: bool) -> bool:
        if self._owner is not None:
            return False
        if urgent:
            return not (self._regular_owed and self._regular_waiting)
        return self._urgent_waiting == 0 or self._regular_owed

    def _acquire(self, urgent: bool) -> None:
        me = threading.get_ident()
        with self._changed:
            if self._owner == me:
                self._depth += 1
                return
            if urgent:
                self._urgent_waiting += 1
            else:
                self._regular_waiting += 1
            try:
                self._changed.wait_for(lambda: self._may_go(urgent))
            finally:
                if urgent:
                    self._urgent_waiting -= 1
                else:
                    self._regular_waiting -= 1
            self._owner, self._depth = me, 1
            if not urgent:
                self._regular_owed = False

    def _release(self, urgent: bool) -> None:
        with self._changed:
            self._depth -= 1
            if self._depth:
                return
            self._owner = None
            if urgent and self._regular_waiting:
                self._regular_owed = True
            self._changed.notify_all()
