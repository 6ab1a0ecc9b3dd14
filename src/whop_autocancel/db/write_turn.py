"""The turn to write to SQLite, between the threads of one process.

SQLite lets one transaction write at a time (ours all begin IMMEDIATE), and a transaction that
waits for another process polls with growing sleeps (its busy timeout). Between the threads of
one process (`serve`: requests, the webhook writer, the worker's jobs) this turn hands the lock
over at once instead, and in an order that keeps Whop answered fast: an *urgent* caller (the
webhook writer, whose commit a sender is waiting on) goes before the others that wait, and after
each urgent turn one waiting regular caller goes before the next urgent one, so neither side
can starve the other. A thread that holds the turn may take it again (nested transactions).

Between processes that share the file (`serve --no-worker` and `worker`s on one machine, a
CLI command) the turn is also a lock file next to the database (`lock_file`, flock): a process
that waits for it sleeps in the kernel and wakes the moment the holder lets go, where SQLite's
busy timeout would poll with sleeps of up to 100 ms; a process that dies (even killed -9)
lets go with it. Each process still orders its own threads as above.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class WriteTurn:
    def __init__(self, lock_file: str | Path | None = None) -> None:
        self._lock_file = Path(lock_file) if lock_file is not None else None
        self._fd: int | None = None  # opened at the first turn, kept for the process's life
        self._mutex = threading.Lock()
        self._owner: int | None = None
        self._depth = 0
        # The callers waiting, each parked on a lock of its own that the caller before it
        # releases when it hands the turn over: one thread woken per turn, not every waiter.
        self._urgent: deque[tuple[int, threading.Lock]] = deque()
        self._regular: deque[tuple[int, threading.Lock]] = deque()
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
        with self._mutex:
            return len(self._urgent), len(self._regular)

    def _acquire(self, urgent: bool) -> None:
        me = threading.get_ident()
        with self._mutex:
            if self._owner == me:
                self._depth += 1
                return
            if self._owner is None:  # (nobody waits then: a release hands the turn over)
                self._owner, self._depth = me, 1
                parked = None
            else:
                parked = threading.Lock()
                parked.acquire()
                (self._urgent if urgent else self._regular).append((me, parked))
        if parked is not None:
            try:
                parked.acquire()  # until the turn is handed over: this thread owns it then
            except BaseException:  # (interrupted while waiting: leave the line, or the turn)
                with self._mutex:
                    queue = self._urgent if urgent else self._regular
                    handed = (me, parked) not in queue
                    if not handed:
                        queue.remove((me, parked))
                if handed:
                    self._release(urgent, locked=False)
                raise
        if self._lock_file is not None:
            try:
                self._lock_across_processes()
            except BaseException:
                self._release(urgent, locked=False)
                raise

    def _lock_across_processes(self) -> None:
        """Only the thread that holds the process's turn gets here: one taker at a time."""
        if self._fd is None:
            assert self._lock_file is not None
            self._fd = os.open(self._lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # the GIL is released while it waits

    def _release(self, urgent: bool, *, locked: bool = True) -> None:
        with self._mutex:
            self._depth -= 1
            if self._depth:
                return
            if locked and self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            if urgent and self._regular:
                self._regular_owed = True
            if self._urgent and not (self._regular_owed and self._regular):
                self._owner, parked = self._urgent.popleft()
            elif self._regular:
                self._owner, parked = self._regular.popleft()
                self._regular_owed = False
            else:
                self._owner = None
                return
            self._depth = 1
        parked.release()
