"""The dashboard in a real headless Chromium (Debian's `chromium`, driven by Playwright; no
browser is ever downloaded) against a real `serve` process, the Whop simulator and an SMTP
sink. Without /usr/bin/chromium these tests skip with the reason, and fail under CI=true."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.browser import CHROMIUM_ARGS, Shop, require_chromium, seed
from support.harness import (
    API_KEY,
    KEEP_PLAN,
    MESSAGE_PLAN,
    NONE_PLAN,
    SECRET,
    STOCK_PLAN,
    STOCK_POOL,
    UNLISTED_PLAN,
)
from whop_autocancel.mail.sink import SmtpSink
from whop_autocancel.simulator import SimulatorServer


@pytest.fixture(scope="module")  # Playwright's sync API runs an event loop in the test thread
def browser() -> Iterator[Any]:  # while it is open: closed with the module, never leaking on
    executable = require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(executable), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where page screenshots go: WA_SCREENSHOT_DIR (e.g. docs/images), else a temporary
    folder (a test run does not rewrite the committed images)."""
    chosen = os.environ.get("WA_SCREENSHOT_DIR")
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    """A shop with a week of realistic history, made by the real paths: purchases of every
    kind of plan (some paid days ago), stock sold until the pool ran dry (the next buyer
    waits), a membership Whop refuses to cancel (404), a webhook that cannot apply."""
    require_chromium()
    folder = tmp_path_factory.mktemp("shop")
    with (
        SimulatorServer(
            api_key=API_KEY, webhook_secret=SECRET, webhook_url=None, time_scale=0.01
        ) as simulator,
        SmtpSink() as sink,
    ):
        for plan in (MESSAGE_PLAN, NONE_PLAN, KEEP_PLAN, UNLISTED_PLAN, STOCK_PLAN):
            simulator.state.create_plan(plan)
        built = Shop(folder, simulator, sink)
        (folder / "keys.txt").write_text("GAME-KEY-0001-SEED\nGAME-KEY-0002-SEED\n")
        built.cli("stock", "import", STOCK_POOL, "keys.txt")  # migrates the new database too
        built.start()
        try:
            seed(built)
            yield built
        finally:
            built.stop()
