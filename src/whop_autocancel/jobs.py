"""The job queue (huey) behind a small typed wrapper: the only module that knows the backend.

Huey is at-most-once for a running job; the state rows (cancellations, emails, inbox events) and
the stuck-work sweep make the whole at-least-once, and every task is idempotent. Jobs carry only
ids, and are enqueued only after the transaction that creates their row has committed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog
from huey import SqliteHuey
from huey.consumer import Consumer
from sqlalchemy.orm import Session

from whop_autocancel.db.engine import after_commit, sqlite_path
from whop_autocancel.errors import ConfigurationError

log = structlog.get_logger(__name__)

JobHandler = Callable[..., None]


def build_huey(queue_url: str) -> Any:
    path = sqlite_path(queue_url)
    if path is None:
        raise ConfigurationError(f"QUEUE_URL: unsupported queue backend {queue_url!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return SqliteHuey(
        name="whop-autocancel", filename=str(path), results=False, utc=True, timeout=30
    )


class _QuietConsumer(Consumer):  # type: ignore[misc]
    """A consumer that leaves signal handling to its host process (uvicorn in `serve`).

    Huey's `Consumer.start()` installs SIGTERM/SIGINT handlers that would replace uvicorn's.
    """

    def _set_signal_handlers(self) -> None:
        return None


class Jobs:
    """Named tasks (`domain.verb`) on one huey instance."""

    def __init__(self, queue_url: str) -> None:
        self.huey = build_huey(queue_url)
        self._tasks: dict[str, Any] = {}

    def register(self, name: str, handler: JobHandler) -> None:
        self._tasks[name] = self.huey.task(name=name)(handler)

    @property
    def names(self) -> list[str]:
        return sorted(self._tasks)

    def enqueue(self, name: str, *args: Any, delay: float = 0.0) -> None:
        task = self._tasks[name]
        if delay > 0:
            task.schedule(args=args, delay=delay)
        else:
            task(*args)

    def defer(self, session: Session, name: str, *args: Any, delay: float = 0.0) -> None:
        """Enqueue once `session` commits; never if it rolls back."""
        after_commit(session, lambda: self.enqueue(name, *args, delay=delay))

    def pending(self) -> int:
        return int(self.huey.pending_count()) + int(self.huey.scheduled_count())

    def ping(self) -> None:
        self.huey.pending_count()

    def consumer(self, *, threads: int, shutdown_timeout: float, own_signals: bool) -> Any:
        """A consumer; with `own_signals` it treats SIGTERM as a graceful stop (`worker`)."""
        options: dict[str, Any] = {
            "workers": threads,
            "worker_type": "thread",
            "periodic": False,
            "initial_delay": 0.05,
            "max_delay": 0.5,
            "backoff": 1.5,
            "scheduler_interval": 1,
            "check_worker_health": True,
            "shutdown_timeout": shutdown_timeout,
            "graceful_signal": "TERM",
        }
        if own_signals:
            return self.huey.create_consumer(**options)
        return _QuietConsumer(self.huey, **options)
