"""An injectable clock: services ask it for the time so tests can freeze or move it."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class FrozenClock:
    """A clock that only moves when told to (tests)."""

    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None:
            raise ValueError("FrozenClock needs a timezone-aware datetime")
        self._now = start
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += timedelta(seconds=seconds)

    def set(self, moment: datetime) -> None:
        with self._lock:
            self._now = moment


def utc(moment: datetime) -> datetime:
    """Make a datetime aware UTC (naive ones are taken to be UTC already)."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def format_utc(moment: datetime) -> str:
    """The one way a time is shown, in tables, messages and JSON: UTC, ISO 8601 with its zone,
    to the second (`2026-12-05T06:12:03Z`)."""
    return utc(moment).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(value: object) -> datetime | None:
    """Parse Whop's ISO-8601 strings (`…Z`) or Unix seconds into aware UTC; None if absent."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(f"not a timestamp: {value!r}")
    if isinstance(value, int | float):
        return datetime.fromtimestamp(float(value), UTC)
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        return utc(datetime.fromisoformat(text))
    raise ValueError(f"not a timestamp: {value!r}")
