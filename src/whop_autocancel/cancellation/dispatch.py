"""Cancellations off the job threads: a worker's job only hands the row's id over, and one event
loop runs the attempts, as many at once as the shared rate limit and Whop's latency need.

A job thread that made the Whop call itself would be held for the whole call, capping a worker
at `WORKER_THREADS / latency` cancellations per second (4 threads at 1 s: 4/s) and stalling
delivery and email jobs behind a slow Whop. Here each attempt is a coroutine: it leases its row
and reads the database in a small thread pool, waits for its turn under `WHOP_RATE_LIMIT`, and
holds no thread while Whop answers.

A worker's own cancellations skip the job queue (`Jobs.run_locally`): one scheduled
`CANCEL_DELAY` after a delivery waits here on the loop's timer and runs on time to the
millisecond, where huey's scheduler would add up to its one-second tick and a poll.

Nothing is lost by handing over: the row is the truth. On a graceful stop whatever waits here
goes back to the job queue with its remaining delay. An id waiting here when the process dies
is still `scheduled` (or `running` with a lease that runs out), and the stuck-work sweep enqueues
it again STUCK_GRACE after it was due; a duplicate id is dropped here, and one that slips
through finds the row leased or done.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import structlog

from whop_autocancel import metrics
from whop_autocancel.cancellation.service import CancellationService
from whop_autocancel.whop.client import AsyncWhopClient

log = structlog.get_logger(__name__)

T = TypeVar("T")
LOOKAHEAD = 4.0  # seconds of the rate limit's budget each process may hold leased at once
DATABASE_THREADS = 4
ATTEMPT_JOB = "cancellation.attempt"  # its runs and CPU in the job metrics


def active_limit(rate: float, burst: int) -> int:
    """How many attempts one process runs at once: a burst plus `LOOKAHEAD` seconds of the
    rate, so that a leased row never waits long for its turn."""
    return max(8, min(1024, burst + math.ceil(rate * LOOKAHEAD)))


class CancelDispatcher:
    def __init__(
        self,
        service: CancellationService,
        client: Callable[[], AsyncWhopClient],
        *,
        rate: float,
        burst: int,
        shutdown_timeout: float,
    ) -> None:
        self._service = service
        self._new_client = client
        self._limit = active_limit(rate, burst)
        self._shutdown_timeout = shutdown_timeout
        self._lock = threading.Lock()
        self._queued: set[int] = set()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[int] | None = None
        self._stopping: asyncio.Event | None = None
        self._timers: dict[tuple[int, float], asyncio.TimerHandle] = {}
        self._left: list[tuple[int, float]] = []  # what was waiting when the loop stopped
        self._executor = ThreadPoolExecutor(DATABASE_THREADS, thread_name_prefix="cancel-db")

    @property
    def running(self) -> bool:
        return self._ready.is_set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="whop-calls", daemon=True)
        self._thread.start()
        self._ready.wait(timeout=10)
        log.info("cancel_dispatcher_started", at_once=self._limit)

    def submit(self, cancellation_id: int, delay: float = 0.0) -> bool:
        """Run this cancellation's attempt now, or `delay` seconds from now, here (thread-safe;
        a duplicate waiting in the queue is dropped). False when not running (stopping): the
        caller puts it on the job queue instead."""
        loop = self._loop
        if loop is None or not self.running:
            return False
        if delay > 0:
            loop.call_soon_threadsafe(self._later, cancellation_id, delay)
        else:
            loop.call_soon_threadsafe(self._put, cancellation_id)
        return True

    def _later(self, cancellation_id: int, delay: float) -> None:
        assert self._loop is not None
        due = self._loop.time() + delay
        handle = self._loop.call_at(due, self._fire, cancellation_id, due)
        self._timers[(cancellation_id, due)] = handle

    def _fire(self, cancellation_id: int, due: float) -> None:
        self._timers.pop((cancellation_id, due), None)
        self._put(cancellation_id)

    def _put(self, cancellation_id: int) -> None:
        assert self._queue is not None
        with self._lock:
            if cancellation_id in self._queued:
                return
            self._queued.add(cancellation_id)
        self._queue.put_nowait(cancellation_id)

    def stop(self, hand_back: Callable[[int, float], None]) -> None:
        """Take no new attempts and let the ones in flight finish (bounded by
        SHUTDOWN_TIMEOUT; one cut short keeps its lease and is retried by the sweep with the
        same key). What waits here (due now or later) goes to `hand_back(id, delay)`: the job
        queue, for any worker."""
        loop, stopping = self._loop, self._stopping
        if loop is None or stopping is None or self._thread is None:
            return
        self._ready.clear()
        loop.call_soon_threadsafe(stopping.set)
        self._thread.join(timeout=self._shutdown_timeout + 10)
        if self._thread.is_alive():  # (a database call that hangs: the process ends anyway)
            log.warning("cancel_dispatcher_stop_timed_out")
        else:
            self._executor.shutdown(wait=True, cancel_futures=True)
        for cancellation_id, delay in self._left:
            try:
                hand_back(cancellation_id, delay)
            except Exception:  # the queue is down too: the sweep finds the row when it is due
                log.exception("cancel_hand_back_failed", cancellation_id=cancellation_id)
        log.info("cancel_dispatcher_stopped", handed_back=len(self._left))

    # The loop -------------------------------------------------------------------------------

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._stopping = stopping = asyncio.Event()
        slots = asyncio.Semaphore(self._limit)
        client = self._new_client()
        attempts: set[asyncio.Task[None]] = set()

        async def one(cancellation_id: int) -> None:
            metrics.observe_job(ATTEMPT_JOB, 0.0)
            try:
                await self._service.attempt(cancellation_id, client, self._offload)
            except Exception as error:  # the row keeps its lease; the sweep runs it again
                if stopping.is_set():
                    log.warning(
                        "cancel_attempt_cut_short",
                        cancellation_id=cancellation_id,
                        error=type(error).__name__,
                    )
                else:
                    log.exception("cancel_attempt_crashed", cancellation_id=cancellation_id)
            finally:
                slots.release()

        async def pump() -> None:
            assert self._queue is not None
            while True:
                cancellation_id = await self._queue.get()
                await slots.acquire()
                with self._lock:
                    self._queued.discard(cancellation_id)
                task = asyncio.create_task(one(cancellation_id))
                attempts.add(task)
                task.add_done_callback(attempts.discard)

        self._ready.set()
        pumping = asyncio.create_task(pump())
        try:
            await self._stopping.wait()
        finally:
            pumping.cancel()
            now = self._loop.time()
            self._left = [(cid, max(0.0, due - now)) for cid, due in self._timers]
            for handle in self._timers.values():
                handle.cancel()
            with self._lock:
                self._left += [(cid, 0.0) for cid in self._queued]
            if attempts:
                await asyncio.wait(set(attempts), timeout=self._shutdown_timeout)
            left = list(attempts)
            for task in left:
                task.cancel()
            await asyncio.gather(*left, return_exceptions=True)  # ended here, not after
            await client.aclose()

    def _offload(self, work: Callable[[], T]) -> asyncio.Future[T]:
        assert self._loop is not None

        def measured() -> T:
            started = time.thread_time()
            try:
                return work()
            finally:
                metrics.observe_job(ATTEMPT_JOB, time.thread_time() - started, run=False)

        return self._loop.run_in_executor(self._executor, measured)
