"""The simulator's webhook sender: signs events and (re)delivers them like Whop (WHOP.md §5.1-§5.2).

A background thread pops a time-ordered queue, POSTs each event to the configured URL with a 5 s
timeout and, on a non-2xx answer or an error, redelivers at +10 s, +20 s and +40 s (times
`time_scale`) after the previous attempt started, then drops the event.

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
    """One webhook event: its id, type and the exact body bytes that get signed and sent."""

    id: str
    type: str
    body: bytes


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
    """Delivers events from a background thread; every attempt is kept in `deliveries()`."""

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
        self._deliveries: list[dict[str, Any]] = []
        self._thread: threading.Thread | None = None
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
        """Start the sender thread (idempotent)."""
        with self._cond:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="whop-sim-webhooks", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = DELIVERY_TIMEOUT + 1.0) -> None:
        """Stop the thread; queued events stay queued and are not delivered."""
        with self._cond:
            thread, self._thread = self._thread, None
            self._stopping = True
            self._cond.notify_all()
        if thread is not None:
            thread.join(timeout)

    def _push(self, job: _Job) -> None:
        self._seq += 1
        job.seq = self._seq
        heapq.heappush(self._queue, job)
        self._cond.notify_all()

    def _next_job(self) -> tuple[_Job, str | None] | None:
        with self._cond:
            while not self._stopping:
                now = time.monotonic()
                if self._queue and self._queue[0].due <= now:
                    self._in_flight += 1
                    return heapq.heappop(self._queue), self._url
                self._cond.wait(self._queue[0].due - now if self._queue else None)
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
