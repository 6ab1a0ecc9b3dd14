"""Helpers for the stock tests: a running service with the stock catalog, the Whop simulator
holding the memberships, the SMTP sink, and signed payments whose `paid_at` the test chooses."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select, text

from support.harness import (
    ADMIN,
    STOCK_CATALOG,
    STOCK_PLAN,
    STOCK_POOL,
    ServiceServer,
    deliver_event,
    drain,
    event_body,
    make_runtime,
    make_settings,
)
from whop_autocancel.admin.stock import import_stock
from whop_autocancel.alerts.models import Alert
from whop_autocancel.cancellation.models import Cancellation
from whop_autocancel.clock import FrozenClock
from whop_autocancel.delivery.models import StockItem
from whop_autocancel.delivery.stock import ImportReport, items_for
from whop_autocancel.mail.sink import ReceivedEmail, SmtpSink
from whop_autocancel.orders.models import Order
from whop_autocancel.runtime import Runtime
from whop_autocancel.simulator import SimulatorServer


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class StockWorld:
    runtime: Runtime
    clock: FrozenClock
    simulator: SimulatorServer
    sink: SmtpSink
    http: httpx.Client
    server_url: str

    # Purchases ------------------------------------------------------------------------------

    def pay(
        self,
        *,
        plan: str = STOCK_PLAN,
        email: str | None = "auto",
        paid_at: datetime | None = None,
    ) -> dict[str, Any]:
        """A purchase made at the simulator (so its membership exists at "Whop"), whose signed
        `payment.succeeded` webhook (legacy shape) this test posts with the given `paid_at`.
        Returns the purchase with its `order_id` and `email`."""
        if email == "auto":
            email = f"buyer-{uuid.uuid4().hex[:10]}@example.com"
        purchase: dict[str, Any] = self.simulator.state.create_purchase(
            plan, email=email, send_webhooks=False
        )
        paid = paid_at or self.clock.now()
        body = event_body(
            "payment.succeeded.legacy.json",
            id=purchase["payment_id"],
            status="paid",
            billing_reason="one_time",
            created_at=iso(paid - timedelta(seconds=2)),
            paid_at=iso(paid),
            checkout_configuration_id=None,
            metadata={},
            member={"id": purchase["member_id"], "phone": None},
            membership={"id": purchase["membership_id"], "status": "completed"},
            user={"id": purchase["user_id"], "username": "buyer", "name": "Buyer", "email": email},
            plan={"id": plan, "internal_notes": None, "metadata": {}},
            product={"id": purchase["product_id"], "title": "Product", "metadata": {}},
        )
        response = self.deliver(body)
        assert response.status_code == 200, response.text
        assert response.json() == {"status": "received"}, response.text
        with self.runtime.database.transaction() as session:
            order = session.scalars(
                select(Order).where(Order.whop_payment_id == purchase["payment_id"])
            ).one()
        purchase["order_id"] = order.id
        purchase["email"] = email
        return purchase

    def deliver(self, body: bytes) -> httpx.Response:
        """Post a signed webhook, then apply it as the worker would."""
        return deliver_event(self.runtime, self.http, body)

    # Stock ----------------------------------------------------------------------------------

    def import_items(self, *items: str, pool: str = STOCK_POOL) -> ImportReport:
        return import_stock(self.runtime, pool, items_for(items))

    # Reading state --------------------------------------------------------------------------

    def order(self, order_id: str) -> Order:
        with self.runtime.database.transaction() as session:
            order = session.get(Order, order_id)
            assert order is not None
            return order

    def item_of(self, order_id: str) -> StockItem | None:
        with self.runtime.database.transaction() as session:
            return session.scalars(select(StockItem).where(StockItem.order_id == order_id)).first()

    def items(self) -> list[StockItem]:
        with self.runtime.database.transaction() as session:
            return list(session.scalars(select(StockItem).order_by(StockItem.id)))

    def item_ids(self, *contents: str) -> dict[str, int]:
        """Item id by plaintext, found by fingerprint (the database never holds plaintext)."""
        sealer = self.runtime.settings.sealer
        assert sealer is not None
        by_print = {sealer.fingerprint(content): content for content in contents}
        return {by_print[i.fingerprint]: i.id for i in self.items() if i.fingerprint in by_print}

    def cancellation(self, order_id: str) -> Cancellation | None:
        with self.runtime.database.transaction() as session:
            return session.scalars(
                select(Cancellation).where(Cancellation.order_id == order_id)
            ).first()

    def alerts(self, kind: str | None = None) -> list[Alert]:
        with self.runtime.database.transaction() as session:
            rows = list(session.scalars(select(Alert).order_by(Alert.id)))
        return [a for a in rows if kind is None or a.kind == kind]

    def raw(self, sql: str) -> list[tuple[Any, ...]]:
        with self.runtime.database.engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(sql))]

    def mail_to(self, address: str) -> list[ReceivedEmail]:
        return self.sink.to(address)

    def admin_mail(self, subject_start: str) -> list[ReceivedEmail]:
        # (strip: the stdlib parser keeps the space of a subject folded onto its own line)
        return [m for m in self.sink.to(ADMIN) if m.subject.strip().startswith(subject_start)]

    # Time and work --------------------------------------------------------------------------

    def drain(self) -> int:
        """Run what is queued now (not the delayed cancellation jobs: run before they are due,
        they would be used up and do nothing)."""
        return drain(self.runtime)

    def settle(self, seconds: float | None = None) -> int:
        """Advance past CANCEL_DELAY (or `seconds`) and run everything that is due."""
        self.clock.advance(self.runtime.settings.CANCEL_DELAY + 1 if seconds is None else seconds)
        return drain_due(self.runtime)


def drain_due(runtime: Runtime) -> int:
    """Run everything queued, delayed tasks included (the services check due times with the
    test's clock)."""
    return drain(runtime, include_scheduled=True)


@contextmanager
def stock_world(
    tmp_path: Path,
    clock: FrozenClock,
    simulator: SimulatorServer,
    sink: SmtpSink,
    database_url: str,
    *,
    catalog: str = STOCK_CATALOG,
    **settings: Any,
) -> Iterator[StockWorld]:
    """The service (real app on loopback, real database, real queue file) wired to the
    simulator and the SMTP sink, with `catalog` written to tmp_path/catalog.toml."""
    (tmp_path / "catalog.toml").write_text(catalog)
    values: dict[str, Any] = {
        "DATABASE_URL": database_url,
        "WHOP_API_URL": simulator.api_url,
        "SMTP_URL": sink.url,
        "RETRY_SCHEDULE": "1,2,4",
        "CANCEL_GIVE_UP_AFTER": 3600,
        "CANCEL_DELAY": 5,
        "ALERT_THROTTLE": 3600,
    }
    runtime = make_runtime(make_settings(tmp_path, **{**values, **settings}), clock)
    server = ServiceServer(runtime)
    try:
        with server.running(), httpx.Client(base_url=server.url, timeout=10) as http:
            yield StockWorld(runtime, clock, simulator, sink, http, server.url)
    finally:
        runtime.close()


def paid_orders(
    runtime: Runtime, plan: str, count: int, prefix: str, paid_at: datetime
) -> list[str]:
    """`count` paid one-time orders of `plan`, written directly (no webhook), paid one
    millisecond apart from `paid_at` on: the raw material of a delivery race."""
    ids = [f"ord_{prefix}{n:05d}" for n in range(count)]
    with runtime.database.transaction() as session:
        for n, order_id in enumerate(ids):
            session.add(
                Order(
                    id=order_id,
                    whop_payment_id=f"pay_{prefix}{n:05d}",
                    whop_membership_id=f"mem_{prefix}{n:05d}",
                    plan_id=plan,
                    email=f"{prefix}{n}@example.com",
                    billing_reason="one_time",
                    status="paid",
                    created_at=paid_at,
                    paid_at=paid_at + timedelta(milliseconds=n),
                    order_metadata={},
                )
            )
    return ids
