"""The simulator's webhook sender: signs events and (re)delivers them like Whop (WHOP.md §5.1-§5.2).

Background threads pop a time-ordered queue, POST each event to the configured URL with a 5 s
timeout and, on a non-2xx answer or an error, redeliver at +10 s, +20 s and +40 s (times
`time_scale`) after the previous attempt started, then drop the event. One delivery is in flight
at a time unless `set_concurrency` allows more; even then the events of one purchase (one
membership: its payment, its activation, the echo of its cancel) are never in flight together
and start in queue order, as with one thread.

Options make delivery as untidy as Whop's "at least once, in no particular order": a fraction of
events is sent twice (same webhook id), each event can be held back a random 0-2 s (times
`time_scale`) before its first attempt, or every event can be dropped unsent.
"""

from __future__ import annotations

import heapq
import random
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from standardwebhooks import Webhook

from whop_autocancel.simulator.shapes import iso

#: Delays before the 2nd, 3rd and 4th attempt, in seconds (before `time_scale`).
RETRY_DELAYS = (10.0, 20.0, 40.0)
#: Attempts in total: the first delivery plus one per retry delay.
MAX_ATTEMPTS = len(RETRY_DELAYS) + 1
#: Whop's delivery timeout (not scaled).
DELIVERY_TIMEOUT = 5.0
#: The longest random hold before a first attempt when `reorder` is on (before `time_scale`).
REORDER_WINDOW = 2.0
#: The most deliveries `set_concurrency` allows in flight at once.
MAX_CONCURRENCY = 64
NO_URL_ERROR = "no webhook_url"
DROPPED_ERROR = "dropped"


@dataclass(frozen=True)
class WebhookOptions:
    """How untidy delivery is: see the module docstring."""

    duplicate_rate: float = 0.0
    reorder: bool = False
    drop: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.duplicate_rate <= 1.0:
            raise ValueError("duplicate_rate must be between 0 and 1")


@dataclass(frozen=True)
class Event:
    """One webhook event: its id, type and the exact body bytes that get signed and sent.
    Events with the same `key` (the membership they are about) are delivered one at a time,
    in queue order."""

    id: str
    type: str
    body: bytes
    key: str | None = None


@dataclass(order=True)
class _Job:
    due: float
    seq: int
    event: Event = field(compare=False)
    attempt: int = field(compare=False, default=1)
    generation: int = field(compare=False, default=0)


@dataclass(frozen=True)
class _Outcome:
    started: float
    at: str
    status: int | None
    error: str | None
    answered_at: str | None = None  # when the answer (or the error) came back; None: not sent

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class WebhookSender:
    """Delivers events from background threads (one delivery in flight unless
    `set_concurrency` allows more); every attempt is kept in `deliveries()`."""

    def __init__(
        self,
        secret: str,
        *,
        lock: threading.RLock,
        time_scale: float = 1.0,
        webhook_url: str | None = None,
        seed: int = 0,
    ) -> None:
        # Whop signs with the raw bytes of the whole `ws_…` secret; a str would be base64-decoded.
        self._signer = Webhook(secret.encode())
        self._options = WebhookOptions()
        self._rng = random.Random(f"webhooks-{seed}")
        self._generation = 0
        self._cond = threading.Condition(lock)
        self._time_scale = time_scale
        self._url = webhook_url
        self._queue: list[_Job] = []
        self._seq = 0
        self._in_flight = 0
        self._concurrency = 1
        self._busy_keys: set[str] = set()  # keys of the events in flight
        self._deliveries: list[dict[str, Any]] = []
        self._threads: list[threading.Thread] = []
        self._stopping = False

    @property
    def webhook_url(self) -> str | None:
        """Where events are POSTed; None records them as undeliverable."""
        with self._cond:
            return self._url

    def set_webhook_url(self, url: str | None) -> None:
        """Change the destination; applies to the next attempt of every queued event."""
        with self._cond:
            self._url = url

    @property
    def options(self) -> WebhookOptions:
        with self._cond:
            return self._options

    def set_options(self, options: WebhookOptions) -> None:
        """Applies to events enqueued from now on."""
        with self._cond:
            self._options = options

    @property
    def concurrency(self) -> int:
        """How many deliveries may be in flight at once."""
        with self._cond:
            return self._concurrency

    def set_concurrency(self, in_flight: int) -> None:
        """Allow up to `in_flight` deliveries at once (1 to MAX_CONCURRENCY; 1 by default).
        The events of one membership still go one at a time, in queue order."""
        if not 1 <= in_flight <= MAX_CONCURRENCY:
            raise ValueError(f"in_flight must be between 1 and {MAX_CONCURRENCY}")
        with self._cond:
            self._concurrency = in_flight
            if self._threads:
                self._add_threads()
            self._cond.notify_all()

    def seed(self, seed: int) -> None:
        """Restart the dice of `duplicate_rate` and `reorder`."""
        with self._cond:
            self._rng.seed(f"webhooks-{seed}")

    def enqueue(self, event: Event) -> None:
        """Queue an event for its first delivery (now, or after a random hold; maybe twice)."""
        with self._cond:
            options = self._options
            if options.drop:
                self._record(event, attempt=0, status=None, error=DROPPED_ERROR, at=_wall())
                return
            copies = 1
            if options.duplicate_rate > 0 and self._rng.random() < options.duplicate_rate:
                copies = 2
            for _ in range(copies):
                hold = 0.0
                if options.reorder:
                    hold = self._rng.uniform(0.0, REORDER_WINDOW) * self._time_scale
                due = time.monotonic() + hold
                self._push(_Job(due=due, seq=0, event=event, generation=self._generation))

    def reset(self) -> None:
        """Forget queued events, past deliveries and options (an attempt in flight is ignored)."""
        with self._cond:
            self._generation += 1
            self._queue.clear()
            self._deliveries.clear()
            self._options = WebhookOptions()

    def pending(self) -> int:
        """Events queued or being delivered right now."""
        with self._cond:
            return len(self._queue) + self._in_flight

    def deliveries(self) -> list[dict[str, Any]]:
        """Every delivery attempt so far, oldest first (copies)."""
        with self._cond:
            return [dict(d) for d in self._deliveries]

    def start(self) -> None:
        """Start the sender threads (idempotent)."""
        with self._cond:
            if self._threads:
                return
            self._stopping = False
            self._add_threads()

    def _add_threads(self) -> None:
        while len(self._threads) < self._concurrency:
            name = f"whop-sim-webhooks-{len(self._threads)}"
            thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._threads.append(thread)
            thread.start()

    def stop(self, timeout: float = DELIVERY_TIMEOUT + 1.0) -> None:
        """Stop the threads; queued events stay queued and are not delivered."""
        with self._cond:
            threads, self._threads = self._threads, []
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _push(self, job: _Job) -> None:
        self._seq += 1
        job.seq = self._seq
        heapq.heappush(self._queue, job)
        self._cond.notify_all()

    def _next_job(self) -> tuple[_Job, str | None] | None:
        """The first due job, in (due, seq) order, whose membership has nothing in flight;
        None when stopping."""
        with self._cond:
            while not self._stopping:
                timeout = None  # a finishing delivery notifies
                if self._in_flight < self._concurrency:
                    now = time.monotonic()
                    job, blocked = None, []
                    while self._queue and self._queue[0].due <= now:
                        candidate = heapq.heappop(self._queue)
                        if candidate.event.key in self._busy_keys:
                            blocked.append(candidate)
                        else:
                            job = candidate
                            break
                    if job is None and self._queue:
                        timeout = self._queue[0].due - now
                    for waiting in blocked:
                        heapq.heappush(self._queue, waiting)
                    if job is not None:
                        self._in_flight += 1
                        if job.event.key is not None:
                            self._busy_keys.add(job.event.key)
                        return job, self._url
                self._cond.wait(timeout)
            return None

    def _run(self) -> None:
        with httpx.Client(timeout=DELIVERY_TIMEOUT) as client:
            while (item := self._next_job()) is not None:
                job, url = item
                outcome = self._attempt(client, url, job.event)
                self._finish(job, outcome, retry=url is not None)

    def _attempt(self, client: httpx.Client, url: str | None, event: Event) -> _Outcome:
        started, wall = time.monotonic(), datetime.now(UTC)
        if url is None:
            return _Outcome(started, str(iso(wall)), None, NO_URL_ERROR)
        seconds = int(wall.timestamp())
        signature = self._signer.sign(
            msg_id=event.id,
            timestamp=datetime.fromtimestamp(seconds, UTC),
            data=event.body.decode(),
        )
        headers = {
            "webhook-id": event.id,
            "webhook-timestamp": str(seconds),
            "webhook-signature": signature,
            "content-type": "application/json",
            "user-agent": "whop-simulator",
        }
        try:
            response = client.post(url, content=event.body, headers=headers)
        except httpx.HTTPError as exc:
            failure = f"{type(exc).__name__}: {exc}"
            return _Outcome(started, str(iso(wall)), None, failure, _wall())
        error = None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"
        return _Outcome(started, str(iso(wall)), response.status_code, error, _wall())

    def _record(
        self,
        event: Event,
        *,
        attempt: int,
        status: int | None,
        error: str | None,
        at: str,
        answered_at: str | None = None,
    ) -> None:
        self._deliveries.append(
            {
                "webhook_id": event.id,
                "type": event.type,
                "attempt": attempt,
                "status": status,
                "error": error,
                "at": at,
                "answered_at": answered_at,
            }
        )

    def _finish(self, job: _Job, outcome: _Outcome, *, retry: bool) -> None:
        with self._cond:
            self._in_flight -= 1
            if job.event.key is not None:
                self._busy_keys.discard(job.event.key)
            self._cond.notify_all()
            if job.generation != self._generation:
                return  # sent before a reset: forgotten
            self._record(
                job.event,
                attempt=job.attempt,
                status=outcome.status,
                error=outcome.error,
                at=outcome.at,
                answered_at=outcome.answered_at,
            )
            if outcome.ok or not retry or job.attempt >= MAX_ATTEMPTS:
                return
            delay = RETRY_DELAYS[job.attempt - 1] * self._time_scale
            due = max(outcome.started + delay, time.monotonic())
            self._push(
                _Job(
                    due=due,
                    seq=0,
                    event=job.event,
                    attempt=job.attempt + 1,
                    generation=job.generation,
                )
            )


def _wall() -> str:
    return str(iso(datetime.now(UTC)))
