"""A shop for integration tests: the runtime served over real HTTP, the Whop simulator sending
its webhooks there, an SMTP sink that a test starts and stops, and a frozen clock."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from support.harness import (
    MESSAGE_PLAN,
    ServiceServer,
    drain,
    free_port,
    make_runtime,
    make_settings,
    wait_for,
)
from whop_autocancel.alerts.models import Alert
from whop_autocancel.cancellation.models import Cancellation
from whop_autocancel.clock import FrozenClock
from whop_autocancel.mail.models import Email
from whop_autocancel.mail.sink import SmtpSink
from whop_autocancel.orders.models import Order
from whop_autocancel.runtime import Runtime
from whop_autocancel.simulator import SimulatorServer


@dataclass
class Shop:
    runtime: Runtime
    clock: FrozenClock
    simulator: SimulatorServer
    smtp_port: int
    sink: SmtpSink | None = None

    def smtp_up(self) -> SmtpSink:
        if self.sink is None:
            self.sink = SmtpSink(port=self.smtp_port).start()
        return self.sink

    def smtp_down(self) -> None:
        if self.sink is not None:
            self.sink.stop()
            self.sink = None

    def buy(self, plan: str = MESSAGE_PLAN, email: str | None = None) -> dict[str, Any]:
        email = email or f"buyer-{time.monotonic_ns()}@example.com"
        purchase: dict[str, Any] = self.simulator.state.create_purchase(plan, email=email)
        wait_for(lambda: self.simulator.state.pending_webhooks() == 0)
        drain(self.runtime)
        with self.runtime.database.transaction() as session:
            order = session.scalars(
                select(Order).where(Order.whop_payment_id == purchase["payment_id"])
            ).one()
            assert order.status == "delivered"
            row = session.scalars(
                select(Cancellation).where(Cancellation.order_id == order.id)
            ).one()
        purchase.update(email=email, order_id=order.id, cancellation_id=row.id)
        return purchase

    def cancellation(self, purchase: dict[str, Any]) -> Cancellation:
        with self.runtime.database.transaction() as session:
            row = session.get(Cancellation, purchase["cancellation_id"])
            assert row is not None
            return row

    def run_cancellation(self, purchase: dict[str, Any], after: float = 0.0) -> Cancellation:
        self.clock.advance(after)
        self.runtime.cancellations.run(purchase["cancellation_id"])
        return self.cancellation(purchase)

    def customer_emails(self, purchase: dict[str, Any]) -> list[Email]:
        with self.runtime.database.transaction() as session:
            return list(
                session.scalars(
                    select(Email)
                    .where(Email.order_id == purchase["order_id"], Email.kind == "delivery")
                    .order_by(Email.id)
                )
            )

    def whop_cancels(self, purchase: dict[str, Any]) -> list[dict[str, Any]]:
        """The cancel calls Whop received for this purchase's membership."""
        return [
            call
            for call in self.simulator.state.calls(purchase["membership_id"])
            if call["method"] == "POST"
        ]

    def membership_status(self, purchase: dict[str, Any]) -> str:
        return str(self.simulator.state.membership(purchase["membership_id"])["status"])

    def alerts(self, kind: str) -> list[Alert]:
        with self.runtime.database.transaction() as session:
            return list(session.scalars(select(Alert).where(Alert.kind == kind)))

    def time_passes(self, seconds: float, rounds: int = 3) -> None:
        """Workers keep going for a while: the stuck sweep and every due job, several times."""
        for _ in range(rounds):
            self.clock.advance(seconds / rounds)
            self.runtime.stuck_sweep.run(force=True)
            drain(self.runtime, include_scheduled=True)


def open_shop(
    tmp_path: Path,
    clock: FrozenClock,
    simulator: SimulatorServer,
    catalog: str | None = None,
    **settings: Any,
) -> Iterator[Shop]:
    """A shop on the runtime of `settings` (the harness's defaults: SQLite), its web app served
    and the simulator's webhooks sent to it; `catalog`: the catalog's TOML, when not the
    harness's (e.g. `STOCK_CATALOG`)."""
    if catalog is not None:
        (tmp_path / "catalog.toml").write_text(catalog)
    port = free_port()
    values: dict[str, Any] = {
        "WHOP_API_URL": simulator.api_url,
        "SMTP_URL": f"smtp://127.0.0.1:{port}",  # down until the test starts a sink there
        "RETRY_SCHEDULE": "1,2,4",
        "STUCK_GRACE": 30,
        "ALERT_THROTTLE": 0,
    }
    runtime = make_runtime(make_settings(tmp_path, **{**values, **settings}), clock)
    server = ServiceServer(runtime)
    built = Shop(runtime, clock, simulator, port)
    try:
        with server.running():
            simulator.state.set_webhook_url(f"{server.url}/webhooks/whop")
            yield built
    finally:
        built.smtp_down()
        runtime.close()
