"""The job queue (huey) behind a small typed wrapper: the only module that knows the backend.

Huey is at-most-once for a running job; the state rows (cancellations, emails, inbox events) and
the stuck-work sweep make the whole at-least-once, and every task is idempotent. Jobs carry only
ids, and are enqueued only after the transaction that creates their row has committed.
"""

from __future__ import annotations

import importlib
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from whop_autocancel import metrics
from whop_autocancel.db.engine import (
    CONFLICTS,
    after_commit,
    is_transient_conflict,
    sqlite_path,
)
from whop_autocancel.errors import ConfigurationError, error_line

log = structlog.get_logger(__name__)

# huey's storage module imports the Redis and PostgreSQL drivers whatever the queue: 17 MB of a
# process's memory (every process must stay under 150 MB; docs/performance.md). It is imported
# with both held off, and a queue that needs one hands it over when it is built (`_driver`).
# (Hence huey's imports come last in this file: ruff's E402 is off for it.)
_DRIVERS = ("redis", "psycopg")
_held = [name for name in _DRIVERS if name not in sys.modules]
for _name in _held:
    sys.modules[_name] = None  # type: ignore[assignment]  # `import name` raises ImportError
try:
    import huey.storage as _storage
finally:
    for _name in _held:
        if _name in sys.modules and sys.modules[_name] is None:
            del sys.modules[_name]
from huey import Huey, PostgresHuey, RedisHuey
from huey.consumer import Consumer
from huey.storage import PostgresStorage, SqliteStorage

JobHandler = Callable[..., object]  # the return value is ignored
# Offered a job enqueued in this process (its args, its delay): True when it took it.
LocalHandler = Callable[[tuple[Any, ...], float], bool]
CONFLICT_ATTEMPTS = 5
BACKLOG_PEEK = 20  # ready jobs read to find a due time (the next ones to run, oldest first)


@dataclass(frozen=True)
class Backlog:
    """What the queue holds now. `oldest_due_age`: how long the most overdue job it can see
    has waited past its due time (0 when none is overdue). Only delayed jobs carry a due time:
    a scheduled job whose time has come (no consumer moved it to the queue) or a delayed job
    moved to the queue and not yet run; a job enqueued to run at once carries no time at all
    (on every backend: huey stores none), so a backlog of those shows in `ready` only."""

    ready: int
    scheduled: int
    oldest_due_age: float


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    if url.startswith("sqlite"):
        return url
    return make_url(url).render_as_string(hide_password=True)


class _SqliteQueue(SqliteStorage):  # type: ignore[misc]
    """Huey's SQLite queue, committing without a disk flush (WAL, `synchronous=NORMAL`): it
    still survives a killed process, and a power cut can only lose its last few operations —
    a job enqueued (its row is the truth: the stuck-work sweep enqueues it again) or taken
    (it runs again: every job is idempotent). Each flush would otherwise serialize every
    thread's enqueue and dequeue behind the disk."""

    def _create_connection(self) -> Any:
        connection = super()._create_connection()
        connection.execute("PRAGMA synchronous=NORMAL")
        return connection


# Any fixed number: the advisory lock under which a process creates the PostgreSQL queue's tables.
_QUEUE_SCHEMA_LOCK = 0x77686F70_71756575  # "whopqueu"


class _PostgresQueue(PostgresStorage):  # type: ignore[misc]
    """Huey's PostgreSQL queue, its tables created one process at a time. Every process creates
    them if they are missing, and at a deployment's first start they all do at once: two
    sessions running `CREATE TABLE IF NOT EXISTS` together both find no table and one fails
    (a duplicate key in the catalog), which stopped that process. An advisory lock held for the
    transaction makes the others wait and then find the tables made."""

    def initialize_schema(self) -> None:
        with self.db(commit=True, close=True) as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_QUEUE_SCHEMA_LOCK,))
            for statement in self.ddl:
                cursor.execute(statement)


def _driver(name: str) -> None:
    """Hand huey's storage module the driver it was imported without (see `_DRIVERS`): the
    names it binds at import, as its own `try: import …` would have."""
    if name == "psycopg" and _storage.psycopg is None:
        _storage.psycopg = importlib.import_module("psycopg")
    elif name == "redis" and _storage.Redis is None:
        redis = importlib.import_module("redis")
        exceptions = importlib.import_module("redis.exceptions")
        _storage.ConnectionPool = redis.ConnectionPool
        _storage.Redis = _storage.RedisStorage.redis_client = redis.Redis
        _storage.ConnectionError = exceptions.ConnectionError
        _storage.TimeoutError = exceptions.TimeoutError


def build_huey(queue_url: str, name: str = "whop-autocancel") -> Any:
    """The huey instance for `QUEUE_URL` (already normalised by the settings)."""
    common: dict[str, Any] = {"results": False, "utc": True}
    path = sqlite_path(queue_url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        return Huey(name=name, storage_class=_SqliteQueue, filename=str(path), timeout=30, **common)
    if queue_url.startswith("postgresql://"):
        _driver("psycopg")
        return PostgresHuey(name=name, dsn=queue_url, storage_class=_PostgresQueue, **common)
    if queue_url.startswith(("redis://", "rediss://")):
        _driver("redis")
        return RedisHuey(name=name, url=queue_url, **common)
    raise ConfigurationError(f"QUEUE_URL: unsupported queue backend {queue_url.split(':')[0]}")


class _QuietConsumer(Consumer):  # type: ignore[misc]
    """A consumer that leaves signal handling to its host process (uvicorn in `serve`).

    Huey's `Consumer.start()` installs SIGTERM/SIGINT handlers that would replace uvicorn's.
    """

    def _set_signal_handlers(self) -> None:
        return None


class Jobs:
    """Named tasks (`domain.verb`) on one huey instance."""

    def __init__(self, queue_url: str, name: str = "whop-autocancel") -> None:
        try:
            self.huey = build_huey(queue_url, name)
        except ConfigurationError:
            raise
        except Exception as error:  # the driver's own error: unreachable, refused, bad auth
            raise ConfigurationError(
                f"QUEUE_URL: cannot use {_safe(queue_url)}: {error_line(error)}"
            ) from None
        self._tasks: dict[str, Any] = {}
        self._local: dict[str, LocalHandler] = {}

    def register(self, name: str, handler: JobHandler) -> None:
        """Register `handler` as task `name`. A transaction the database aborted to break a
        deadlock reruns the whole (idempotent) job at once instead of dropping it."""

        def run(*args: Any) -> None:
            started = time.thread_time()
            try:
                for attempt in range(1, CONFLICT_ATTEMPTS + 1):
                    try:
                        handler(*args)
                        return
                    except DBAPIError as error:
                        if attempt == CONFLICT_ATTEMPTS or not is_transient_conflict(error):
                            raise
                        CONFLICTS.record(error)
                        time.sleep(random.uniform(0.005, 0.05) * attempt)
            finally:
                metrics.observe_job(name, time.thread_time() - started)

        self._tasks[name] = self.huey.task(name=name)(run)

    def run_here(self, name: str, *args: Any) -> None:
        """Run a registered task in this thread now, exactly as a worker would (with the same
        conflict retries), without the queue: for tests and benchmarks."""
        self._tasks[name].call_local(*args)

    @property
    def names(self) -> list[str]:
        return sorted(self._tasks)

    def run_locally(self, name: str, handler: LocalHandler | None) -> None:
        """While set, a `name` job enqueued in this process is offered to `handler` first and
        skips the queue when it takes it: it runs on time to the millisecond, not at huey's
        next scheduler tick. Only for work whose row is the truth and which the stuck-work
        sweep enqueues again if this process dies first (the cancellations)."""
        if handler is None:
            self._local.pop(name, None)
        else:
            self._local[name] = handler

    def enqueue(self, name: str, *args: Any, delay: float = 0.0) -> None:
        local = self._local.get(name)
        if local is not None and local(args, delay):
            return
        self.to_queue(name, *args, delay=delay)

    def to_queue(self, name: str, *args: Any, delay: float = 0.0) -> None:
        """Put the job on the queue, for any worker (never to a local handler)."""
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

    def backlog(self, now: datetime | None = None) -> Backlog:
        """Depth and lateness of the queue (`now`: huey's clock, the wall clock, by default).
        A few cheap reads on every backend: two counts, the next ready jobs, the next
        scheduled one."""
        huey = self.huey
        storage = huey.storage
        moment = (now or datetime.now(UTC)).astimezone(UTC).replace(tzinfo=None)  # huey: naive
        due_times = [
            huey.serializer.deserialize(data).eta
            for data in [
                *storage.enqueued_items(BACKLOG_PEEK),
                *storage.scheduled_items(1),
            ]
        ]
        late = [(moment - due).total_seconds() for due in due_times if due is not None]
        return Backlog(
            ready=int(huey.pending_count()),
            scheduled=int(huey.scheduled_count()),
            oldest_due_age=max([0.0, *late]),
        )

    def consumer(self, *, threads: int, shutdown_timeout: float, own_signals: bool) -> Any:
        """A consumer; with `own_signals` it treats SIGTERM as a graceful stop (`worker`)."""
        options: dict[str, Any] = {
            "workers": threads,
            "worker_type": "thread",
            "periodic": False,
            "initial_delay": 0.05,
            "max_delay": 0.1,  # an idle consumer looks every 0.1 s: a cheap read
            "backoff": 1.5,
            "scheduler_interval": 1,
            "check_worker_health": True,
            "shutdown_timeout": shutdown_timeout,
            "graceful_signal": "TERM",
        }
        if own_signals:
            return self.huey.create_consumer(**options)
        return _QuietConsumer(self.huey, **options)
