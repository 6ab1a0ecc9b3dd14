"""The delivery job: idempotent per order. Marks the order delivered, queues the customer email
and the admin notice, and schedules the cancellation — all in one transaction."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import structlog

from whop_autocancel.alerts.models import AlertKind
from whop_autocancel.alerts.service import AlertContent, Alerts
from whop_autocancel.cancellation.service import schedule_cancellation
from whop_autocancel.clock import Clock
from whop_autocancel.db.engine import Database
from whop_autocancel.delivery.catalog import Catalog
from whop_autocancel.delivery.methods import METHODS, DeliveryContext, DeliveryError
from whop_autocancel.jobs import Jobs
from whop_autocancel.mail.outbox import Outbox
from whop_autocancel.mail.render import render_email
from whop_autocancel.orders.models import Order, OrderStatus
from whop_autocancel.orders.service import must_deliver
from whop_autocancel.orders.states import transition

log = structlog.get_logger(__name__)


class DeliveryService:
    def __init__(
        self,
        database: Database,
        catalog: Catalog,
        outbox: Outbox,
        alerts: Alerts,
        jobs: Jobs,
        clock: Clock,
        *,
        admin_emails: Sequence[str],
        support_email: str | None,
        cancel_delay: float,
    ) -> None:
        self._database = database
        self._catalog = catalog
        self._outbox = outbox
        self._alerts = alerts
        self._jobs = jobs
        self._clock = clock
        self._admins = list(admin_emails)
        self._support = support_email
        self._cancel_delay = cancel_delay

    def deliver(self, order_id: str) -> None:
        """The `delivery.deliver` job."""
        now = self._clock.now()
        with self._database.transaction() as session:
            order = session.get(Order, order_id, with_for_update=True)
            if order is None or order.status != OrderStatus.PAID.value:
                return  # delivered already (or not paid): a duplicate job is harmless
            plan = self._catalog.get(order.plan_id)
            if plan is None or not must_deliver(self._catalog, order):
                log.info("delivery_not_applicable", order_id=order.id, plan_id=order.plan_id)
                return
            method = METHODS[plan.method]
            try:
                delivery = method.deliver(
                    DeliveryContext(
                        session=session, order=order, plan=plan, support_email=self._support
                    )
                )
            except DeliveryError as error:
                order.delivery_error = str(error)
                order.delivery_method = plan.delivery
                transition(order, OrderStatus.DELIVERY_FAILED, "delivery failed")
                log.warning(
                    "delivery_failed",
                    order_id=order.id,
                    plan_id=order.plan_id,
                    payment_id=order.whop_payment_id,
                    error=str(error),
                )
                self._alerts.raise_once(
                    session,
                    AlertKind.DELIVERY_FAILED,
                    f"delivery_failed:{order.id}",
                    AlertContent(
                        subject=f"Order {order.id} could not be delivered",
                        summary=(
                            f"The customer paid for {plan.name} but nothing was delivered: "
                            f"{error} The membership was NOT cancelled."
                        ),
                        details=[
                            ("Order", order.id),
                            ("Customer", order.email or "unknown"),
                            ("Payment", order.whop_payment_id or "-"),
                            ("Membership", order.whop_membership_id or "-"),
                            ("Plan", f"{plan.name} ({plan.plan_id})"),
                        ],
                        steps=[
                            "Fix the cause named above (e.g. give the API key member:email:read).",
                            "Deliver the product yourself, or contact the customer in Whop.",
                            "Then cancel the membership in the Whop dashboard if it should not "
                            "stay active.",
                        ],
                    ),
                    now,
                    order_id=order.id,
                )
                return
            if delivery.customer_email is not None and order.email:
                self._outbox.queue(
                    session,
                    kind="delivery",
                    to=order.email,
                    email=delivery.customer_email,
                    now=now,
                    order_id=order.id,
                    dedupe_key=f"delivery:{order.id}:customer",
                )
            notice = render_email(
                "admin_delivered",
                f"Delivered: {plan.name} to {order.email or 'unknown customer'} ({order.id})",
                order_id=order.id,
                plan_name=plan.name,
                plan_id=plan.plan_id,
                method=delivery.summary,
                email=order.email,
                payment_id=order.whop_payment_id,
                membership_id=order.whop_membership_id,
                amount=order.amount,
                currency=(order.currency or "").upper(),
                cancel=plan.cancel,
                cancel_delay=f"{self._cancel_delay:g}",
            )
            for address in self._admins:
                self._outbox.queue(
                    session,
                    kind="admin_delivered",
                    to=address,
                    email=notice,
                    now=now,
                    order_id=order.id,
                    dedupe_key=f"delivery:{order.id}:admin:{address}",
                )
            order.delivery_method = plan.delivery
            order.delivery_error = None
            order.delivered_at = now
            transition(order, OrderStatus.DELIVERED, "delivered")
            log.info(
                "delivered",
                order_id=order.id,
                payment_id=order.whop_payment_id,
                membership_id=order.whop_membership_id,
                method=plan.delivery,
            )
            if plan.cancel:
                cancellation = schedule_cancellation(
                    session, order, now + timedelta(seconds=self._cancel_delay), now
                )
                if cancellation is not None:
                    self._jobs.defer(
                        session, "cancellation.run", cancellation.id, delay=self._cancel_delay
                    )
