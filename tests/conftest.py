"""Shared fixtures: a real SMTP sink, the Whop simulator over real HTTP, a frozen clock."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.harness import (
    API_KEY,
    KEEP_PLAN,
    MESSAGE_PLAN,
    NONE_PLAN,
    SECRET,
    UNLISTED_PLAN,
)
from whop_autocancel.clock import FrozenClock
from whop_autocancel.mail.sink import SmtpSink
from whop_autocancel.simulator import SimulatorServer


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(datetime.now(UTC).replace(microsecond=0))


@pytest.fixture
def simulator() -> Iterator[SimulatorServer]:
    """The Whop simulator, knowing the test catalog's plans as one-time plans."""
    server = SimulatorServer(
        api_key=API_KEY, webhook_secret=SECRET, webhook_url=None, time_scale=0.01
    )
    server.start()
    for plan in (MESSAGE_PLAN, NONE_PLAN, KEEP_PLAN, UNLISTED_PLAN):
        server.state.create_plan(plan)
    try:
        yield server
    finally:
        server.stop()
