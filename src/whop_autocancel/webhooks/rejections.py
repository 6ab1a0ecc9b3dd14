"""The log of refused webhooks: a few lines in full, then one summary line a minute, so a flood
of forged or broken requests cannot flood the logs (the counters in `metrics` count them all)."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import datetime
from typing import Any

import structlog

from whop_autocancel.clock import Clock

log = structlog.get_logger(__name__)

FREE_PER_WINDOW = 5  # rejections logged in full per window
SUMMARY_WINDOW = 60.0  # seconds
TOP_CLIENTS = 5  # client addresses named in a summary
_TRACKED_CLIENTS = 1000  # distinct addresses counted per window; more count as "other"


class RejectionLog:
    """The first `free` rejections of each window are logged in full (`webhook_rejected`, with
    the client's address); the rest are counted by reason and client and logged as one
    `webhooks_rejected_summary` line when the window is over: at the next rejection after it,
    or by a timer when none comes. Thread-safe."""

    def __init__(
        self, clock: Clock, *, free: int = FREE_PER_WINDOW, window: float = SUMMARY_WINDOW
    ) -> None:
        self._clock = clock
        self._free = free
        self._window = window
        self._lock = threading.Lock()
        self._started: datetime | None = None
        self._generation = 0  # which window a timer belongs to
        self._logged = 0
        self._reasons: Counter[str] = Counter()
        self._clients: Counter[str] = Counter()
        self._timer: threading.Timer | None = None

    def record(self, outcome: str, client: str | None, **fields: Any) -> None:
        """One refused webhook: its `outcome` (bad_signature, bad_request, too_large) is what
        the summary counts; `fields` say more (never a secret, never the body)."""
        now = self._clock.now()
        address = client or "unknown"
        with self._lock:
            summary = self._close_if_over(now)
            if self._started is None:
                self._started = now
            in_full = self._logged < self._free
            if in_full:
                self._logged += 1
            else:
                self._reasons[outcome] += 1
                tracked = address in self._clients or len(self._clients) < _TRACKED_CLIENTS
                self._clients[address if tracked else "other"] += 1
                if self._timer is None:
                    self._start_timer(now)
        if summary is not None:
            log.warning("webhooks_rejected_summary", **summary)
        if in_full:
            log.warning("webhook_rejected", outcome=outcome, client=address, **fields)

    def flush(self) -> None:
        """Log the current window's summary now, if anything was folded (and end the window)."""
        with self._lock:
            summary = self._take()
        if summary is not None:
            log.warning("webhooks_rejected_summary", **summary)

    def close(self) -> None:
        """Stop the timer, logging what it would have logged."""
        self.flush()

    # Under the lock -------------------------------------------------------------------------

    def _close_if_over(self, now: datetime) -> dict[str, Any] | None:
        if self._started is None or (now - self._started).total_seconds() < self._window:
            return None
        return self._take()

    def _take(self) -> dict[str, Any] | None:
        """End the window; its summary if anything was folded."""
        summary = None
        if self._reasons and self._started is not None:
            summary = {
                "rejected": sum(self._reasons.values()),
                "by_reason": dict(sorted(self._reasons.items())),
                "top_clients": dict(self._clients.most_common(TOP_CLIENTS)),
                "clients": len(self._clients),
                "logged_in_full": self._logged,
                "window_start": self._started.isoformat(),
                "window_seconds": self._window,
            }
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._started = None
        self._logged = 0
        self._reasons = Counter()
        self._clients = Counter()
        self._generation += 1
        return summary

    def _start_timer(self, now: datetime) -> None:
        assert self._started is not None
        remaining = max(0.0, self._window - (now - self._started).total_seconds())
        self._timer = threading.Timer(remaining, self._on_timer, args=(self._generation,))
        self._timer.daemon = True
        self._timer.start()

    def _on_timer(self, generation: int) -> None:
        with self._lock:
            if generation != self._generation:
                return  # that window was closed by a rejection after it
            self._timer = None
            summary = self._take()
        if summary is not None:
            log.warning("webhooks_rejected_summary", **summary)
