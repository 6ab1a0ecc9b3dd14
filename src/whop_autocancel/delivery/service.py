"""The delivery job: idempotent per order. Marks the order delivered, queues the customer email
and the admin notice, and schedules the cancellation — all in one transaction (a stock item is
taken in that transaction too)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from whop_autocancel import metrics
from whop_autocancel.alerts.models import Alert, AlertKind
from whop_autocancel.alerts.service import AlertContent, Alerts
from whop_autocancel.cancellation.models import CANCEL_TASK
from whop_autocancel.cancellation.service import (
    schedule_cancellation,
    waits_for_email,
    wake_after_email,
)
from whop_autocancel.catalog import Catalog, CatalogPlan
from whop_autocancel.clock import Clock
from whop_autocancel.db.engine import Database, after_commit
from whop_autocancel.delivery import stock
from whop_autocancel.delivery.methods import (
    METHODS,
    Delivery,
    DeliveryContext,
    DeliveryError,
    OutOfStock,
    StockUnreadable,
    WaitingInLine,
)
from whop_autocancel.delivery.stock import SERVE_TASK
from whop_autocancel.errors import WhopAutocancelError
from whop_autocancel.jobs import Jobs
from whop_autocancel.mail.models import DELIVERY_KIND, Email
from whop_autocancel.mail.outbox import Outbox
from whop_autocancel.mail.render import PACKAGE_TEMPLATES, EmailTemplates, render_email
from whop_autocancel.orders.models import Order, OrderStatus
from whop_autocancel.orders.service import must_deliver
from whop_autocancel.orders.states import transition
from whop_autocancel.sealing import Sealer

log = structlog.get_logger(__name__)


def email_failed_key(email_id: int) -> str:
    """The dedupe key of the `email_failed` alert of one email (resolved when an admin puts
    the email back to be sent, so that failing again alerts again)."""
    return f"email_failed:{email_id}"


# What one delivery attempt did (`serve_waiting` goes on or stops by it).
Outcome = Literal["delivered", "waiting", "out_of_stock", "unreadable", "failed", "not_applicable"]


class ResendError(WhopAutocancelError):
    """The order's delivery email cannot be sent again; the message says why."""


@dataclass(frozen=True)
class Resent:
    order_id: str
    to: str
    summary: str


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
        sealer: Sealer | None = None,
        templates: EmailTemplates = PACKAGE_TEMPLATES,
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
        self._sealer = sealer
        self._templates = templates

    def deliver(self, order_id: str) -> None:
        """The `delivery.deliver` job. Its commit need not wait for the disk: nothing leaves
        the service before the email's lease, which is durable (see `Database.transaction`)."""
        with self._database.transaction(durable=False) as session:
            order = session.get(Order, order_id, with_for_update=True)
            if order is not None:
                self._deliver_locked(session, order, self._clock.now())

    def serve_waiting(self, pool: str) -> int:
        """The `stock.serve` job: deliver the orders waiting for `pool`, oldest payment first,
        one transaction each, until they are all served or the pool is empty again."""
        with self._database.transaction() as session:
            backlog = len(stock.waiting_orders(session, pool))
        served = 0
        for _ in range(backlog):
            with self._database.transaction(durable=False) as session:
                statement = (
                    select(Order)
                    .where(stock.waiting(pool))
                    .order_by(*stock.PAYMENT_ORDER)
                    .limit(1)
                    .with_for_update(skip_locked=self._database.skip_locked)
                )
                order = session.scalars(statement).first()
                if order is None:
                    break
                outcome = self._deliver_locked(session, order, self._clock.now())
            if outcome == "delivered":
                if not served:  # the pool can be read (again): close a 'cannot decrypt' alert
                    with self._database.transaction() as session:
                        self._alerts.resolve(session, unreadable_key(pool), self._clock.now())
                served += 1
            elif outcome == "out_of_stock":
                self._alert_still_waiting(pool)
                break
            elif outcome in ("unreadable", "waiting"):
                break  # the key is wrong, or another job is serving the orders ahead of this one
        if backlog:
            log.info("stock_waiting_served", pool=pool, served=served, waiting=backlog - served)
        return served

    def _deliver_locked(self, session: Session, order: Order, now: datetime) -> Outcome:
        """Deliver one locked order; returns what happened (for `serve_waiting`), counted in
        the metrics once the transaction commits."""
        outcome = self._attempt(session, order, now)
        after_commit(session, lambda: metrics.DELIVERIES.labels(outcome).inc())
        return outcome

    def _attempt(self, session: Session, order: Order, now: datetime) -> Outcome:
        waiting = order.status == OrderStatus.DELIVERY_FAILED.value and order.waiting_for_stock
        if order.status != OrderStatus.PAID.value and not waiting:
            return "not_applicable"  # delivered already (or not paid): a duplicate is harmless
        plan = self._catalog.get(order.plan_id)
        if plan is None or not must_deliver(self._catalog, order):
            log.info("delivery_not_applicable", order_id=order.id, plan_id=order.plan_id)
            order.waiting_for_stock = None
            return "not_applicable"
        try:
            delivery = METHODS[plan.method].deliver(self._context(session, order, plan, now))
        except WaitingInLine as line:
            self._wait_for_stock(session, order, plan, line)
            self._jobs.defer(session, SERVE_TASK, line.pool)
            return "waiting"
        except StockUnreadable as unreadable:
            self._wait_for_stock(session, order, plan, unreadable)
            self._alert_unreadable(session, unreadable, now)
            return "unreadable"  # nothing more can be served from this pool until fixed
        except OutOfStock as empty:
            self._wait_for_stock(session, order, plan, empty)
            self._alert_out_of_stock(session, order, plan, empty.pool, now)
            return "out_of_stock"
        except DeliveryError as error:
            self._fail(session, order, plan, error, now)
            return "failed"
        self._complete(session, order, plan, delivery, now)
        return "delivered"

    def _context(
        self, session: Session, order: Order, plan: CatalogPlan, now: datetime
    ) -> DeliveryContext:
        return DeliveryContext(
            session=session,
            order=order,
            plan=plan,
            support_email=self._support,
            templates=self._templates,
            now=now,
            sealer=self._sealer,
            skip_locked=self._database.skip_locked,
        )

    def _wait_for_stock(
        self, session: Session, order: Order, plan: CatalogPlan, reason: DeliveryError
    ) -> None:
        _mark_failed(order, plan, reason, waiting_for=plan.pool)

    def _alert_out_of_stock(
        self, session: Session, order: Order, plan: CatalogPlan, pool: str, now: datetime
    ) -> None:
        self._alerts.raise_once(
            session,
            AlertKind.OUT_OF_STOCK,
            f"out_of_stock:{order.id}",
            AlertContent(
                subject=f"Out of stock: order {order.id} is waiting for pool {pool}",
                summary=(
                    f"The customer paid for {plan.name}, but pool {pool!r} has no item left. "
                    "The order waits: it is delivered by itself, in payment order, as soon as "
                    "stock is added. The membership was NOT cancelled and will be after "
                    "delivery."
                ),
                details=[
                    ("Order", order.id),
                    ("Customer", order.email or "unknown"),
                    ("Payment", order.whop_payment_id or "-"),
                    ("Plan", f"{plan.name} ({plan.plan_id})"),
                    ("Pool", pool),
                ],
                steps=[
                    f"Add items: whop-autocancel stock import {pool} FILE",
                    "Check the levels: whop-autocancel stock levels",
                    "Or stop selling the plan in Whop until you have stock.",
                ],
            ),
            now,
            order_id=order.id,
        )

    def _alert_still_waiting(self, pool: str) -> None:
        """The pool ran dry again while orders wait: those that waited only for their turn
        (stock was there when they came) now wait for stock, and the admin hears of each."""
        now = self._clock.now()
        with self._database.transaction() as session:
            waiting = stock.waiting_orders(session, pool)
            alerted = set(
                session.scalars(
                    select(Alert.order_id).where(
                        Alert.kind == AlertKind.OUT_OF_STOCK.value, Alert.order_id.in_(waiting)
                    )
                )
            )
            for order_id in waiting:
                if order_id in alerted:
                    continue
                order = session.get(Order, order_id, with_for_update=True)
                plan = self._catalog.get(order.plan_id) if order is not None else None
                if order is None or plan is None or order.waiting_for_stock != pool:
                    continue
                order.delivery_error = str(OutOfStock(pool))
                self._alert_out_of_stock(session, order, plan, pool, now)

    def _alert_unreadable(self, session: Session, error: StockUnreadable, now: datetime) -> None:
        self._alerts.raise_once(
            session,
            AlertKind.DELIVERY_FAILED,
            unreadable_key(error.pool),
            AlertContent(
                subject=f"Stock of pool {error.pool} cannot be decrypted: deliveries wait",
                summary=(
                    f"{error} Orders of this pool wait (paid, not delivered, membership not "
                    "cancelled) and are delivered by themselves, in payment order, once the "
                    "item can be read."
                ),
                details=[("Pool", error.pool), ("Item", f"#{error.item_id}")],
                steps=[
                    "Check STOCK_ENCRYPTION_KEY on every web and worker machine: it must hold "
                    "the key the items were imported with (after a rotation: the new key "
                    "first, then the old one, space-separated). Restart after changing it.",
                    "`whop-autocancel check` tells whether the key opens the stored items.",
                    f"If only this item is damaged: whop-autocancel stock void {error.item_id}",
                ],
            ),
            now,
        )

    def _fail(
        self,
        session: Session,
        order: Order,
        plan: CatalogPlan,
        error: DeliveryError,
        now: datetime,
    ) -> None:
        _mark_failed(order, plan, error, waiting_for=None)
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

    def _complete(
        self,
        session: Session,
        order: Order,
        plan: CatalogPlan,
        delivery: Delivery,
        now: datetime,
    ) -> None:
        customer_email = delivery.customer_email is not None and bool(order.email)
        # The customer's email queued now is on its way: its acceptance arms the cancellation.
        on_its_way = customer_email and (
            self._queue_customer_email(
                session, order, delivery, now, f"delivery:{order.id}:customer"
            )
            is not None
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
                # Sent in the batch of the customer's email (queued just before: the older),
                # one `mail.send` job for the purchase instead of one a message.
                wake=not customer_email,
            )
        if order.waiting_for_stock:
            self._alerts.resolve(session, f"out_of_stock:{order.id}", now)
        order.waiting_for_stock = None
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
        if delivery.pool is not None:
            self._check_low_stock(session, delivery.pool, now)
        if plan.cancel:
            cancellation = schedule_cancellation(
                session, order, now + timedelta(seconds=self._cancel_delay), now
            )
            # Armed now unless the delivery email is on its way: then its acceptance arms it
            # (`email_sent`), and a killed worker's row is found by the stuck-work sweep.
            if cancellation is not None and not (
                on_its_way or waits_for_email(session, order, now)
            ):
                self._jobs.defer(session, CANCEL_TASK, cancellation.id, delay=self._cancel_delay)

    def _check_low_stock(self, session: Session, pool: str, now: datetime) -> None:
        threshold = self._catalog.low_stock_threshold(pool)
        left = stock.available_count(session, pool, at_most=threshold + 1)
        if left > threshold:
            return
        self._alerts.raise_once(
            session,
            AlertKind.LOW_STOCK,
            stock.low_stock_key(pool),
            AlertContent(
                subject=f"Low stock: pool {pool} has {left} item(s) left",
                summary=(
                    f"Pool {pool!r} is down to {left} available item(s) (alert threshold "
                    f"{threshold}). When it is empty, new orders wait (paid, not delivered, "
                    "membership not cancelled) until stock is added."
                ),
                details=[("Pool", pool), ("Available", str(left)), ("Threshold", str(threshold))],
                steps=[
                    f"Add items: whop-autocancel stock import {pool} FILE",
                    "This alert is raised once; it re-arms when the pool is above the "
                    "threshold again.",
                ],
            ),
            now,
        )

    def resend(self, order_id: str) -> Resent:
        """Queue the customer's delivery email again, with the same item (`orders resend`)."""
        now = self._clock.now()
        with self._database.transaction() as session:
            order = session.get(Order, order_id)
            if order is None:
                raise ResendError(f"no order {order_id} (see `whop-autocancel orders`)")
            if order.status != OrderStatus.DELIVERED.value:
                raise ResendError(
                    f"order {order_id} is {order.status}, not delivered: there is nothing to "
                    "send again"
                )
            plan = self._catalog.get(order.plan_id)
            if plan is None:
                raise ResendError(
                    f"order {order_id}'s plan {order.plan_id} is no longer in the catalog"
                )
            try:
                delivery = METHODS[plan.method].resend(self._context(session, order, plan, now))
            except DeliveryError as error:
                raise ResendError(f"cannot resend order {order_id}: {error}") from None
            self._queue_customer_email(
                session, order, delivery, now, f"delivery:{order.id}:resend:{uuid.uuid4().hex}"
            )
            log.info("delivery_resent", order_id=order.id, method=plan.delivery)
            assert order.email is not None  # (the email just queued went to it)
            return Resent(order_id=order.id, to=order.email, summary=delivery.summary)

    def _queue_customer_email(
        self, session: Session, order: Order, delivery: Delivery, now: datetime, dedupe_key: str
    ) -> Email | None:
        """The customer's delivery email into the outbox (sealed when it carries an item): the
        row queued, None when `dedupe_key` was queued before."""
        assert delivery.customer_email is not None
        assert order.email is not None
        return self._outbox.queue(
            session,
            kind=DELIVERY_KIND,
            to=order.email,
            email=delivery.customer_email,
            now=now,
            order_id=order.id,
            dedupe_key=dedupe_key,
            sealed=delivery.sealed,
        )

    # Outbox hooks (wired in runtime.py): the delivery is complete only once its email is in. --

    def email_sent(self, session: Session, email: Email, now: datetime) -> None:
        """A customer's delivery email was accepted: the order's cancellation, held for it,
        runs now; one not run yet is armed for CANCEL_DELAY after the delivery."""
        if email.kind == DELIVERY_KIND and email.order_id is not None:
            wake_after_email(session, self._jobs, email.order_id, now)

    def email_failed(self, session: Session, email: Email, now: datetime) -> None:
        """A customer's delivery email was given up: one `email_failed` alert. The order's
        cancellation stays held (the membership live) until a resend is accepted."""
        if email.kind != DELIVERY_KIND or email.order_id is None:
            return
        order = session.get(Order, email.order_id)
        if order is None:
            return
        plan = self._catalog.get(order.plan_id)
        answer = email.last_error or "no answer recorded"
        membership = order.whop_membership_id or "(find it by the customer's email)"
        cancels = plan is not None and plan.cancel
        steps = [
            "If the SMTP answer names your server or settings (SMTP_URL, MAIL_FROM, a "
            "block or quota), fix that first; `whop-autocancel check` tests the connection.",
            f"Then send the product again: whop-autocancel orders resend {order.id}"
            + (" (the membership is cancelled once the server accepts it)." if cancels else "."),
            "If the cause was on the server's side (your SMTP settings, a full mailbox, an "
            f"outage), this same email can go again: whop-autocancel emails retry {email.id}",
            "If the address itself is wrong or dead, contact the customer in Whop and deliver "
            "the product another way.",
        ]
        if cancels:
            steps.append(
                "Once the customer has the product another way, cancel the membership by "
                f"hand: whop-autocancel cancel {order.whop_membership_id or 'MEMBERSHIP'}"
            )
        self._alerts.raise_once(
            session,
            AlertKind.EMAIL_FAILED,
            email_failed_key(email.id),
            AlertContent(
                subject=f"Order {order.id}: the delivery email to {email.to_address} failed",
                summary=(
                    "The customer paid and the order is marked delivered, but the email that "
                    f"carries the product could not be sent: {answer}. "
                    + (
                        "The Whop membership was NOT cancelled: it stays live until the "
                        "customer has the product."
                        if cancels
                        else "This plan keeps its membership (cancel = false)."
                    )
                ),
                details=[
                    ("Order", order.id),
                    ("Customer", email.to_address),
                    ("SMTP answer", answer),
                    ("Membership", membership),
                    ("Plan", f"{plan.name} ({plan.plan_id})" if plan else order.plan_id or "-"),
                    ("Email", f"#{email.id}, {email.attempts} attempt(s)"),
                ],
                steps=steps,
            ),
            now,
            order_id=order.id,
        )


def unreadable_key(pool: str) -> str:
    """The dedupe key of a pool's open 'cannot decrypt' alert (freed by the next delivery)."""
    return f"stock_unreadable:{pool}:open"


def _mark_failed(
    order: Order, plan: CatalogPlan, error: DeliveryError, *, waiting_for: str | None
) -> None:
    """`delivery_failed`, with why; `waiting_for`: the pool whose stock it waits for (it is
    then delivered by itself when stock comes), or None (the admin must act)."""
    order.delivery_error = str(error)
    order.delivery_method = plan.delivery
    order.waiting_for_stock = waiting_for
    transition(
        order,
        OrderStatus.DELIVERY_FAILED,
        "waiting for stock" if waiting_for else "delivery failed",
    )
    log.warning(
        "delivery_waiting_for_stock" if waiting_for else "delivery_failed",
        order_id=order.id,
        plan_id=order.plan_id,
        payment_id=order.whop_payment_id,
        pool=waiting_for,
        error=str(error),
    )
