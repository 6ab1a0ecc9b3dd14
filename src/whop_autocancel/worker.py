"""Running jobs: the huey consumer plus a ticker thread for the periodic sweeps.

Huey's periodic tasks tick by the minute; the sweeps need seconds in tests and the demo, and
each takes a database lease anyway, so a plain thread per worker process drives them.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import structlog

from whop_autocancel import affinity
from whop_autocancel.db import leases
from whop_autocancel.runtime import Runtime

log = structlog.get_logger(__name__)


class SweepTicker:
    """Runs the stuck-work sweep now and then every `SWEEP_INTERVAL` until stopped."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sweep-ticker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        settings = self._runtime.settings
        next_whop_sweep = 0.0  # monotonic time; the first tick sweeps Whop too
        while not self._stop.is_set():
            try:
                self._beat()
                self._runtime.stuck_sweep.run()
            except Exception:
                log.exception("stuck_sweep_failed")
            if time.monotonic() >= next_whop_sweep:
                next_whop_sweep = time.monotonic() + settings.WHOP_SWEEP_INTERVAL
                try:
                    self._runtime.whop_sweep.run()
                except Exception:
                    log.exception("whop_sweep_failed")
            self._stop.wait(settings.SWEEP_INTERVAL)

    def _beat(self) -> None:
        runtime = self._runtime
        now = runtime.clock.now()
        runtime.database.run(lambda session: leases.beat(session, runtime.owner, now))


class InProcessWorker:
    """The worker inside `serve`: started and stopped by the web app's lifespan, leaving signal
    handling to uvicorn."""

    def __init__(self, runtime: Runtime) -> None:
        settings = runtime.settings
        self._consumer: Any = runtime.jobs.consumer(
            threads=settings.WORKER_THREADS,
            shutdown_timeout=settings.SHUTDOWN_TIMEOUT,
            own_signals=False,
        )
        self._ticker = SweepTicker(runtime)
        self._runtime = runtime

    def start(self) -> None:
        self._runtime.start_dispatcher()
        self._consumer.start()
        self._ticker.start()
        log.info("worker_started", mode="in-process")

    def stop(self) -> None:
        self._ticker.stop()
        self._consumer.stop(graceful=True)
        self._runtime.stop_dispatcher()
        log.info("worker_stopped", mode="in-process")


def run_worker(runtime: Runtime) -> None:
    """The `worker` command: blocks until SIGTERM/SIGINT, then finishes running jobs (bounded
    by SHUTDOWN_TIMEOUT) and takes no new ones."""
    settings = runtime.settings
    consumer: Any = runtime.jobs.consumer(
        threads=settings.WORKER_THREADS,
        shutdown_timeout=settings.SHUTDOWN_TIMEOUT,
        own_signals=True,
    )
    ticker = SweepTicker(runtime)
    runtime.start_dispatcher()
    ticker.start()
    log.info(
        "worker_started",
        mode="standalone",
        threads=settings.WORKER_THREADS,
        cpus=list(affinity.allowed_cpus()),  # one: pinned (CPU_AFFINITY)
    )
    try:
        consumer.run()
    finally:
        ticker.stop()
        runtime.stop_dispatcher()
        log.info("worker_stopped", mode="standalone")
