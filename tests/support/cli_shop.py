"""A shop with some of everything for the command-line tests: orders (delivered, one whose
cancellation failed, one of an unlisted plan), stored webhook events (one failed), emails (one
rejected for good), alerts; made by the real ingest, delivery, outbox and cancellation paths
against the Whop simulator and an SMTP sink. The commands then run as real processes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from support.harness import (
    MESSAGE_PLAN,
    STOCK_CATALOG,
    UNLISTED_PLAN,
    apply_webhooks,
    drain,
    event_body,
    make_runtime,
    make_settings,
    service_environment,
    signed_headers,
)
from support.terminal import Run, on_terminal, piped
from whop_autocancel.admin.operations import cancel_membership
from whop_autocancel.alerts.models import Alert
from whop_autocancel.cancellation.models import Cancellation
from whop_autocancel.mail.models import Email
from whop_autocancel.mail.sink import SmtpSink
from whop_autocancel.orders.models import Order
from whop_autocancel.runtime import Runtime
from whop_autocancel.simulator import SimulatorServer
from whop_autocancel.webhooks.models import WebhookEvent

WIDTH = 80
REJECTED = "customer.number.1.with.a.long.address@example.com"
BROKEN_EVENT = "msg_BrokenPaymentEventWithALongId1"


@dataclass
class Shop:
    """What the shop holds (rows read back after it was made, detached) and the environment
    of its commands."""

    tmp_path: Path
    env: dict[str, str]
    orders: list[Order] = field(default_factory=list)
    events: list[WebhookEvent] = field(default_factory=list)
    cancellations: list[Cancellation] = field(default_factory=list)
    emails: list[Email] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)

    def pipe(self, *args: str, columns: int | None = WIDTH) -> Run:
        return piped(self.tmp_path, *args, env=self.env, columns=columns)

    def terminal(self, *args: str, **env: str) -> Run:
        return on_terminal(self.tmp_path, *args, env={**self.env, **env}, columns=WIDTH)


def buy(runtime: Runtime, simulator: SimulatorServer, email: str, plan: str = MESSAGE_PLAN) -> str:
    """A purchase at the simulator whose payment webhook reached the inbox and was applied; its
    membership."""
    made = simulator.state.create_purchase(plan, email=email, send_webhooks=False)
    body = event_body(
        "payment.succeeded.legacy.json",
        id=made["payment_id"],
        billing_reason="one_time",
        membership={"id": made["membership_id"], "status": "completed"},
        plan={"id": plan, "metadata": {}},
        user={"id": "user_Output1", "email": email},
        metadata={},
        checkout_configuration_id=None,
    )
    assert runtime.inbox.ingest(body, signed_headers(body)).http_status == 200
    apply_webhooks(runtime)  # as the worker does
    return str(made["membership_id"])


def read_back(runtime: Runtime, shop: Shop) -> Shop:
    with runtime.database.transaction() as session:
        shop.orders = list(session.scalars(select(Order)))
        shop.events = list(session.scalars(select(WebhookEvent)))
        shop.cancellations = list(
            session.scalars(select(Cancellation).where(Cancellation.status == "failed"))
        )
        shop.emails = list(session.scalars(select(Email)))
        shop.alerts = list(session.scalars(select(Alert)))
        session.expunge_all()
    return shop


@contextmanager
def cli_shop(
    tmp_path: Path,
    simulator: SimulatorServer,
    smtp_sink: SmtpSink,
    database_url: str | None = None,
) -> Iterator[Shop]:
    (tmp_path / "catalog.toml").write_text(STOCK_CATALOG)
    values = {"WHOP_API_URL": simulator.api_url, "SMTP_URL": smtp_sink.url}
    if database_url is not None:
        values["DATABASE_URL"] = database_url
    runtime = make_runtime(make_settings(tmp_path, **values))
    try:
        memberships = [
            buy(runtime, simulator, f"customer.number.{n}.with.a.long.address@example.com")
            for n in range(3)
        ]
        buy(runtime, simulator, "someone.else@example.com", plan=UNLISTED_PLAN)
        smtp_sink.reject(REJECTED)
        with runtime.database.transaction() as session:
            paid = list(session.scalars(select(Order.id).where(Order.plan_id == MESSAGE_PLAN)))
        for order_id in paid:
            runtime.delivery.deliver(order_id)
        drain(runtime)  # the emails: the one to REJECTED is refused (550) for good
        simulator.state.reject(memberships[2], 422)
        assert cancel_membership(runtime, memberships[2]).status == "failed"
        broken = json.dumps(
            {
                "id": BROKEN_EVENT,
                "type": "payment.succeeded",
                "timestamp": "2026-11-20T14:03:11Z",
                "data": {"status": "paid"},
            }
        ).encode()
        assert runtime.inbox.ingest(broken, signed_headers(broken)).http_status == 200
        apply_webhooks(runtime)  # stored `failed`: its payment has no id
        shop = read_back(runtime, Shop(tmp_path, service_environment(tmp_path, **values)))
    finally:
        runtime.close()
    assert shop.cancellations
    assert shop.alerts
    assert any(email.failed_at for email in shop.emails)
    yield shop
