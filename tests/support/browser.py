"""The dashboard's browser tests: Debian's chromium, and a shop (a real `serve` process with
its in-process worker, the Whop simulator and an SMTP sink) with a week of realistic history."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from support.dashboard import dashboard_settings
from support.harness import (
    KEEP_PLAN,
    MESSAGE_PLAN,
    NONE_PLAN,
    STOCK_CATALOG,
    STOCK_PLAN,
    UNLISTED_PLAN,
    free_port,
    service_environment,
    signed_headers,
    wait_for,
)
from whop_autocancel.cancellation.models import Cancellation
from whop_autocancel.db.engine import Database
from whop_autocancel.mail.models import DELIVERY_KIND, Email
from whop_autocancel.mail.sink import SmtpSink
from whop_autocancel.orders.models import Order
from whop_autocancel.simulator import SimulatorServer
from whop_autocancel.webhooks.models import WebhookEvent

CHROMIUM = Path(os.environ.get("WA_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # as root (CI containers) Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 375, "height": 800}


def require_chromium() -> Path:
    if CHROMIUM.exists():
        return CHROMIUM
    message = f"{CHROMIUM} is not installed (Debian: apt-get install chromium)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}: CI runs the browser tests")
    pytest.skip(message)


class Shop:
    """A running deployment: `serve` (web and in-process worker), the simulator, SMTP."""

    def __init__(self, folder: Path, simulator: SimulatorServer, sink: SmtpSink) -> None:
        self.folder = folder
        self.simulator = simulator
        self.sink = sink
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (folder / "catalog.toml").write_text(STOCK_CATALOG)
        self.env = service_environment(
            folder,
            WHOP_API_URL=simulator.api_url,
            SMTP_URL=sink.url,
            CANCEL_DELAY="1",
            SWEEP_INTERVAL="0.5",
            STUCK_GRACE="0.5",
            RETRY_SCHEDULE="0.5,1",
            # The Whop sweep runs at start-up only; a test runs it when it wants (`sweep`).
            WHOP_SWEEP_INTERVAL="3600",
            ALERT_THROTTLE="0",
            LOG_LEVEL="INFO",
            **dashboard_settings(),
        )
        self.database = Database(self.env["DATABASE_URL"])
        self.process: subprocess.Popen[bytes] | None = None
        simulator.state.set_webhook_url(f"{self.url}/webhooks/whop")

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "whop_autocancel", *args],
            env=self.env,
            cwd=self.folder,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return result

    def start(self) -> None:
        log = (self.folder / "serve.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "whop_autocancel", "serve", "--port", str(self.port)],
            env=self.env,
            cwd=self.folder,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

        def healthy() -> bool:
            assert self.process is not None
            assert self.process.poll() is None, self.log_tail()
            try:
                return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 30, "the serve process")

    def log_tail(self) -> str:
        path = self.folder / "serve.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.database.dispose()

    # Purchases ------------------------------------------------------------------------------

    def buy(self, plan: str = MESSAGE_PLAN, **options: Any) -> dict[str, Any]:
        bought: dict[str, Any] = self.simulator.state.create_purchase(plan, **options)
        return bought

    def order(self, payment_id: str) -> Order | None:
        with self.database.transaction() as session:
            return session.scalars(select(Order).where(Order.whop_payment_id == payment_id)).first()

    def cancellation(self, payment_id: str) -> Cancellation | None:
        with self.database.transaction() as session:
            return session.scalars(
                select(Cancellation)
                .join(Order, Order.id == Cancellation.order_id)
                .where(Order.whop_payment_id == payment_id)
            ).first()

    def wait_cancellation(self, payment_id: str, *statuses: str, seconds: float = 30) -> int:
        def settled() -> bool:
            row = self.cancellation(payment_id)
            return row is not None and row.status in statuses

        wait_for(settled, seconds, f"the cancellation of {payment_id} to be {statuses}", 0.1)
        row = self.cancellation(payment_id)
        assert row is not None
        return row.id

    def wait_order(self, payment_id: str, *statuses: str, seconds: float = 30) -> str:
        def settled() -> bool:
            found = self.order(payment_id)
            return found is not None and found.status in statuses

        wait_for(settled, seconds, f"the order of {payment_id} to be {statuses}", 0.1)
        found = self.order(payment_id)
        assert found is not None
        return found.id

    def wait_event(self, event_id: str, status: str, seconds: float = 30) -> None:
        """Wait until the worker has applied a stored webhook to `status`."""

        def applied() -> bool:
            with self.database.transaction() as session:
                found = session.get(WebhookEvent, event_id)
                return found is not None and found.status == status

        wait_for(applied, seconds, f"event {event_id} to be {status}", 0.1)

    def delivery_email(self, order_id: str) -> Email | None:
        """The order's latest customer delivery email (its row, read without the body)."""
        with self.database.transaction() as session:
            return session.scalars(
                select(Email)
                .where(Email.order_id == order_id, Email.kind == DELIVERY_KIND)
                .order_by(Email.id.desc())
            ).first()

    def wait_delivery_email(self, order_id: str, status: str, seconds: float = 30) -> Email:
        """Until the order's delivery email is `pending`, `sent` or `failed`."""

        def settled() -> bool:
            row = self.delivery_email(order_id)
            if row is None:
                return False
            now = "sent" if row.sent_at else "failed" if row.failed_at else "pending"
            return now == status

        wait_for(settled, seconds, f"the delivery email of {order_id} to be {status}", 0.1)
        row = self.delivery_email(order_id)
        assert row is not None
        return row

    def order_ids_waiting(self) -> list[str]:
        with self.database.transaction() as session:
            return list(
                session.scalars(select(Order.id).where(Order.waiting_for_stock.is_not(None)))
            )

    def order_delivered(self, order_id: str) -> bool:
        with self.database.transaction() as session:
            found = session.get(Order, order_id)
            return found is not None and found.status == "delivered"

    def order_of_email(self, email: str) -> str:
        with self.database.transaction() as session:
            found = session.scalars(
                select(Order.id).where(Order.email == email).order_by(Order.created_at.desc())
            ).first()
            assert found is not None, email
            return found

    def post_event(self, event_type: str, data: dict[str, Any]) -> str:
        """A signed webhook, as Whop would send it."""
        event_id = f"msg_{uuid.uuid4().hex[:24]}"
        body = json.dumps(
            {
                "id": event_id,
                "api_version": "v1",
                "api_version_date": None,
                "timestamp": datetime.now(UTC).isoformat(),
                "type": event_type,
                "company_id": "biz_SimStore",
                "data": data,
            }
        ).encode()
        response = httpx.post(
            f"{self.url}/webhooks/whop", content=body, headers=signed_headers(body), timeout=10
        )
        assert response.status_code == 200, response.text
        return event_id


def seed(shop: Shop) -> None:
    now = datetime.now(UTC)
    cancelled = []
    for hours, name in [(150, "ada"), (97, "grace"), (75, "linus"), (49, "barbara"), (26, "ken")]:
        bought = shop.buy(email=f"{name}@example.com", at=now - timedelta(hours=hours))
        cancelled.append(bought["payment_id"])
    for name in ("margaret", "dennis"):
        cancelled.append(shop.buy(STOCK_PLAN, email=f"{name}@example.com")["payment_id"])
    cancelled.append(shop.buy(NONE_PLAN, email="alan@example.com")["payment_id"])
    kept = shop.buy(KEEP_PLAN, email="edsger@example.com")["payment_id"]
    unlisted = shop.buy(UNLISTED_PLAN, email="john@example.com")["payment_id"]
    refused = shop.buy(email="refused@example.com")
    shop.simulator.state.reject(refused["membership_id"], 404)
    for payment_id in cancelled:
        shop.wait_cancellation(payment_id, "canceled")
    shop.wait_cancellation(refused["payment_id"], "failed")
    shop.wait_order(kept, "delivered")
    shop.wait_order(unlisted, "paid")
    waiting = shop.buy(STOCK_PLAN, email="waiting@example.com")  # the pool is empty now
    shop.wait_order(waiting["payment_id"], "delivery_failed")
    broken = shop.post_event("payment.succeeded", {"status": "paid", "billing_reason": "one_time"})
    shop.wait_event(broken, "failed")  # it has no payment id: the worker stores it failed
