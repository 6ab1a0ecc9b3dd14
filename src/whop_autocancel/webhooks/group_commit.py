"""Group commit: one thread per process commits what concurrent callers hand it, many at a time.

Each caller submits one item and gets a future; the thread takes everything queued at that
moment (up to `max_batch`, never waiting for more, so a lone caller pays one commit), commits it
in one transaction through `commit`, runs `after` once for the batch (work that must follow the
commit, such as enqueueing the job that processes it), then resolves every future of the batch.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

import structlog

log = structlog.get_logger(__name__)

Item = TypeVar("Item")
Outcome = TypeVar("Outcome")

# One outcome per item: its result, or the exception that item alone failed with.
Committer = Callable[[Sequence[Item]], Sequence[Outcome | Exception]]


class Closed(RuntimeError):
    """The writer was closed: nothing more is taken."""


class GroupCommit(Generic[Item, Outcome]):
    """A writer thread, started on the first `submit`. `commit` raising fails the whole batch
    (every future gets that exception); returning an exception in an item's place fails that
    item alone."""

    def __init__(
        self,
        commit: Committer[Item, Outcome],
        *,
        after: Callable[[Sequence[Outcome | Exception]], None] | None = None,
        max_batch: int = 200,
        name: str = "group-commit",
    ) -> None:
        self._commit = commit
        self._after = after
        self._max_batch = max_batch
        self._name = name
        self._queue: queue.SimpleQueue[tuple[Item, Future[Outcome]] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, item: Item) -> Future[Outcome]:
        """Queue `item`; the future resolves once its batch committed (or failed)."""
        future: Future[Outcome] = Future()
        with self._lock:
            if self._closed:
                raise Closed(f"{self._name} is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._queue.put((item, future))
        return future

    def close(self, timeout: float = 30.0) -> None:
        """Commit what is queued already, then stop the thread; later submits raise `Closed`."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            if thread is not None:
                self._queue.put(None)
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            entry = self._queue.get()
            if entry is None:
                return
            batch = [entry]
            stopping = False
            while len(batch) < self._max_batch:
                try:
                    entry = self._queue.get_nowait()
                except queue.Empty:
                    break
                if entry is None:
                    stopping = True
                    break
                batch.append(entry)
            try:
                self._commit_live(batch)
            except Exception:  # the thread must outlive anything a batch does
                log.exception("group_commit_failed", writer=self._name)
            if stopping:
                return

    def _commit_live(self, batch: list[tuple[Item, Future[Outcome]]]) -> None:
        # A caller that gave up before its batch started is left out; once running, a future
        # can no longer be cancelled, so resolving it below cannot fail.
        live = [(item, future) for item, future in batch if future.set_running_or_notify_cancel()]
        if not live:
            return
        outcomes: Sequence[Outcome | Exception]
        try:
            outcomes = self._commit([item for item, _ in live])
            if len(outcomes) != len(live):
                raise AssertionError(f"{len(outcomes)} outcomes for {len(live)} items")
        except Exception as error:
            outcomes = [error] * len(live)
        if self._after is not None:
            try:
                self._after(outcomes)
            except Exception:
                log.exception("group_commit_after_failed", writer=self._name)
        for (_, future), outcome in zip(live, outcomes, strict=True):
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
