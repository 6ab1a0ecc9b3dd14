"""Shared fixtures: a real SMTP sink, the Whop simulator over real HTTP, a frozen clock."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Generator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import backends
from support.harness import (
    API_KEY,
    KEEP_PLAN,
    MESSAGE_PLAN,
    NONE_PLAN,
    SECRET,
    STOCK_PLAN,
    UNLISTED_PLAN,
)
from whop_autocancel.clock import FrozenClock
from whop_autocancel.mail.sink import SmtpSink
from whop_autocancel.simulator import SimulatorServer

DATABASES = ["sqlite", "postgresql", "mariadb"]
QUEUES = ["sqlite", "postgresql", "redis"]


SCENARIO_COUNT = "scenario count"
_SHOWN: list[str] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Hand the counts a scenario collected to its report: run with `-n`, the test ran in
    another process, and only its reports come back to the one that prints the summary."""
    from support.reporting import COUNTS

    report = yield
    report.user_properties += [(SCENARIO_COUNT, text) for text in COUNTS]
    COUNTS.clear()
    return report


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _SHOWN.extend(str(text) for name, text in report.user_properties if name == SCENARIO_COUNT)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the counts the chaos and concurrency scenarios collected."""
    if _SHOWN:
        terminalreporter.section("scenario counts")
        for text in _SHOWN:
            terminalreporter.write_line(text)


@pytest.fixture(scope="session")
def server_databases() -> Iterator[dict[str, str]]:
    """One migrated database per server backend for the whole run, created on first use."""
    created: dict[str, str] = {}
    yield created
    for kind, url in created.items():
        backends.drop_database(kind, url)


@pytest.fixture(params=DATABASES)
def database_url(
    request: pytest.FixtureRequest, tmp_path: Path, server_databases: dict[str, str]
) -> str:
    """Each test that takes this runs on SQLite, PostgreSQL and MariaDB, from empty tables."""
    kind: str = request.param
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'service.db'}"
    if kind not in server_databases:
        server_databases[kind] = backends.create_database(kind)
    backends.empty_tables(server_databases[kind])
    return server_databases[kind]


@pytest.fixture(params=QUEUES)
def queue_settings(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """QUEUE_URL and a QUEUE_NAME of its own, for each queue backend."""
    kind: str = request.param
    name = f"{backends.RUN_ID}-{uuid.uuid4().hex[:8]}"
    return {"QUEUE_URL": backends.queue_url(kind, tmp_path), "QUEUE_NAME": name}


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
    for plan in (MESSAGE_PLAN, NONE_PLAN, KEEP_PLAN, UNLISTED_PLAN, STOCK_PLAN):
        server.state.create_plan(plan)
    try:
        yield server
    finally:
        server.stop()
