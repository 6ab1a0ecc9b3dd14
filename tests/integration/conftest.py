"""Fixtures shared by the stock tests (a module that defines its own `world` keeps it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from support.stock import StockWorld, stock_world
from whop_autocancel.clock import FrozenClock
from whop_autocancel.mail.sink import SmtpSink
from whop_autocancel.simulator import SimulatorServer


@pytest.fixture
def world(
    tmp_path: Path,
    clock: FrozenClock,
    simulator: SimulatorServer,
    smtp_sink: SmtpSink,
    database_url: str,
) -> Iterator[StockWorld]:
    """A running shop that sells from stock (support/stock.py), on each database."""
    with stock_world(tmp_path, clock, simulator, smtp_sink, database_url) as built:
        yield built
