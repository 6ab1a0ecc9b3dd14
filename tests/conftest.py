"""Shared fixtures: a real SMTP sink, the Whop simulator over real HTTP, a migrated SQLite file."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.harness import API_KEY, SECRET
from whop_autocancel.clock import FrozenClock
from whop_autocancel.mail.sink import SmtpSink


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(datetime.now(UTC).replace(microsecond=0))


@pytest.fixture
def simulator() -> Iterator[object]:
    from whop_autocancel.simulator import SimulatorServer

    server = SimulatorServer(
        api_key=API_KEY, webhook_secret=SECRET, webhook_url=None, time_scale=0.01
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()
