"""Applying payment and membership facts to orders. Services take a session and never commit."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

import structlog
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from whop_autocancel.alerts.models import AlertKind
from whop_autocancel.alerts.service import AlertContent, Alerts
from whop_autocancel.catalog import Catalog
from whop_autocancel.db.base import not_searched
from whop_autocancel.db.locks import lock_keys
from whop_autocancel.errors import WhopAutocancelError
from whop_autocancel.jobs import Jobs
from whop_autocancel.orders.matching import find_order_for_payment
from whop_autocancel.orders.models import Order, OrderStatus
from whop_autocancel.orders.states import transition
from whop_autocancel.whop.payloads import ClaimFacts, MembershipFacts, PaymentFacts

log = structlog.get_logger(__name__)

DELIVER_TASK = "delivery.deliver"
# Claim statuses (Whop's RefundStatus / DisputeStatus) that mean the money went back: only these
# end the order (refunded/disputed) and void a stock item under `on_refund = "void"`. Every other
# status (a pending, failed or canceled refund; an open, under-review or won dispute; none at
# all) is recorded on the order and alerted, and blocks neither delivery nor cancellation.
ENDING_STATUSES: dict[str, frozenset[str]] = {
    "refund": frozenset({"succeeded"}),
    "dispute": frozenset({"lost"}),
}


def ends_order(claim: ClaimFacts) -> bool:
    """Whether this claim took the money back (the order ends)."""
    return claim.status in ENDING_STATUSES[claim.kind]


ONE_TIME = "one_time"


def new_order_id() -> str:
    """Unguessable: the id is shown to customers on the success page."""
    return "ord_" + secrets.token_urlsafe(18).replace("-", "x").replace("_", "y")


def purchase_keys(
    payment_id: str | None,
    membership_id: str | None,
    order_id: str | None,
    checkout_configuration_id: str | None,
) -> list[str | None]:
    """The lock keys of one purchase: any two of its events share at least one."""
    return [
        f"payment:{payment_id}" if payment_id else None,
        f"membership:{membership_id}" if membership_id else None,
        f"order:{order_id}" if order_id else None,
        f"checkout:{checkout_configuration_id}" if checkout_configuration_id else None,
    ]


class ClaimAhead(WhopAutocancelError):
    """A refund or dispute that does not end its order came before its payment: applied again
    (with the inbox's backoff) once the payment is recorded."""


def must_deliver(catalog: Catalog, order: Order) -> bool:
    """The safety rule: only one-time purchases of listed plans are delivered (and cancelled)."""
    return catalog.is_listed(order.plan_id) and order.billing_reason == ONE_TIME


def order_of_membership(session: Session, membership_id: str | None) -> str | None:
    """The order bound to this membership, if we know one."""
    if membership_id is None:
        return None
    return session.scalars(_ORDER_ID_OF_MEMBERSHIP, {"membership_id": membership_id}).first()


_ORDER_ID_OF_MEMBERSHIP = (
    select(Order.id)
    .where(Order.whop_membership_id == bindparam("membership_id"))
    .order_by(Order.id)
    .limit(1)
)
# (built once: building a statement costs more than SQLite takes to run it)
_OF_MEMBERSHIP = (
    select(Order)
    .where(Order.whop_membership_id == bindparam("membership_id"))
    .order_by(Order.created_at, Order.id)
    .limit(1)
)
_UNBOUND_OF_CHECKOUT = (
    select(Order)
    .where(
        Order.checkout_configuration_id == bindparam("checkout_id"),
        Order.whop_membership_id.is_(None),
    )
    .order_by(Order.created_at, Order.id)
    .limit(1)
)


def order_of_recorded_payment(session: Session, payment_id: str) -> str | None:
    """The order that holds this payment as applied (None: the payment was never applied). An
    order a refund or dispute created ahead of its payment, still `pending`, does not count:
    the payment is still to be applied (and delivered, unless the claim ended the order)."""
    found: str | None = session.scalars(_RECORDED, {"payment_id": payment_id}).first()
    return found


def recorded_payments(session: Session, payment_ids: Sequence[str]) -> set[str]:
    """Those of `payment_ids` that an order holds as applied (`order_of_recorded_payment`), in
    one statement (the Whop sweep asks for a page of Whop's list at once)."""
    if not payment_ids:
        return set()
    return set(session.scalars(_RECORDED_AMONG, {"payment_ids": list(payment_ids)}))


# A payment is applied once an order holds it and has left `pending` (see
# `order_of_recorded_payment`); both statements built once.
_APPLIED = Order.status != OrderStatus.PENDING.value
_RECORDED = (
    select(Order.id).where(Order.whop_payment_id == bindparam("payment_id"), _APPLIED).limit(1)
)
_RECORDED_AMONG = select(Order.whop_payment_id).where(
    Order.whop_payment_id.in_(bindparam("payment_ids", expanding=True)), _APPLIED
)


def close_unpaid_orders(session: Session, created_before: datetime, limit: int) -> list[str]:
    """Close (`abandoned`) pending orders without a payment created before `created_before`:
    nobody paid them within PENDING_ORDER_TTL, so no guess may bind a payment to them any
    more (a payment that names one still pays it). Returns the ids closed."""
    statement = (
        select(Order)
        .where(
            Order.status == OrderStatus.PENDING.value,
            not_searched(Order.whop_payment_id).is_(None),
            Order.created_at < created_before,
        )
        .order_by(Order.created_at)
        .limit(limit)
    )
    closed = []
    for order in session.scalars(statement):
        if transition(order, OrderStatus.ABANDONED, "not paid within PENDING_ORDER_TTL"):
            closed.append(order.id)
    return closed


class OrderHooks(Protocol):
    """What the layers above orders do when an order changes (dependency inversion: orders never
    import delivery or cancellation; the runtime wires their implementations in)."""

    def membership_attached(self, session: Session, order: Order, now: datetime) -> None:
        """The order just learned its membership id (a cancellation may be waiting for it)."""

    def claim_recorded(
        self, session: Session, order: Order, claim: ClaimFacts, now: datetime
    ) -> tuple[list[tuple[str, str]], list[str]]:
        """A refund or dispute was recorded on the order: settle what was delivered. Returns
        the alert's extra (label, value) lines and steps."""


class OrderService:
    def __init__(
        self,
        catalog: Catalog,
        jobs: Jobs,
        alerts: Alerts,
        match_window: float,
        hooks: OrderHooks,
    ) -> None:
        self._catalog = catalog
        self._jobs = jobs
        self._alerts = alerts
        self._window = match_window
        self._hooks = hooks

    def apply_payment(self, session: Session, facts: PaymentFacts, now: datetime) -> Order:
        """Record a succeeded payment on its order (found or new) and start delivery."""
        lock_keys(
            session,
            purchase_keys(
                facts.payment_id,
                facts.membership_id,
                facts.order_id,
                facts.checkout_configuration_id,
            ),
        )
        match = find_order_for_payment(session, facts, self._window, now)
        order = match.order
        if order is None:
            order = Order(
                id=new_order_id(),
                status=OrderStatus.PENDING.value,
                created_at=now,
                order_metadata={},
            )
            session.add(order)
        log.info(
            "payment_matched",
            payment_id=facts.payment_id,
            order_id=order.id,
            membership_id=facts.membership_id,
            how=match.step,
        )
        if match.conflict is not None:
            session.flush()
            self._alert_binding_conflict(
                session,
                match.conflict,
                order,
                f"payment {facts.payment_id} (membership {facts.membership_id or 'unknown'})",
                now,
            )
        order.whop_payment_id = facts.payment_id
        order.matched_by = order.matched_by or match.step
        order.whop_membership_id = order.whop_membership_id or facts.membership_id
        order.checkout_configuration_id = (
            order.checkout_configuration_id or facts.checkout_configuration_id
        )
        order.plan_id = facts.plan_id or order.plan_id
        order.product_id = facts.product_id or order.product_id
        order.whop_user_id = facts.user_id or order.whop_user_id
        order.email = facts.email or order.email
        order.billing_reason = facts.billing_reason
        order.amount = facts.amount
        order.currency = facts.currency
        order.payment_created_at = facts.created_at
        order.paid_at = facts.paid_at or now
        if facts.metadata:
            order.order_metadata = {**(order.order_metadata or {}), **facts.metadata}
        if not transition(order, OrderStatus.PAID, "payment.succeeded"):
            if (order.order_metadata or {}).get("backfill"):
                log.warning(
                    "payment_of_backfilled_membership",
                    order_id=order.id,
                    payment_id=facts.payment_id,
                    membership_id=order.whop_membership_id,
                    consequence="recorded on the backfill's order, not delivered: the purchase "
                    "predates the service and backfill cancelled its membership",
                )
            return order  # already paid (another event of the same payment): nothing more to do
        session.flush()
        self._hooks.membership_attached(session, order, now)
        if must_deliver(self._catalog, order):
            self._jobs.defer(session, DELIVER_TASK, order.id)
        elif self._catalog.is_listed(order.plan_id):
            self._alert_not_one_time(session, order, now)
        else:
            log.info(
                "payment_recorded_only",
                order_id=order.id,
                plan_id=order.plan_id,
                reason="plan not listed in the catalog",
            )
        return order

    def apply_membership_live(
        self, session: Session, facts: MembershipFacts, now: datetime
    ) -> Order | None:
        """`membership.activated` (or a live `membership.updated`): attach the membership id to
        its order, or, for a listed plan, create a pending order that the payment will find
        (None: a plan we do not sell, recorded only). Never delivers."""
        lock_keys(
            session,
            purchase_keys(
                None, facts.membership_id, facts.order_id, facts.checkout_configuration_id
            ),
        )
        order, conflict = self._find_order_for_membership(session, facts)
        if order is None:
            if not self._catalog.is_listed(facts.plan_id):
                # Not a plan we sell: nothing will ever deliver or cancel it, so no order
                # waits for its payment (which, if it comes, is recorded on its own).
                log.info(
                    "membership_recorded_only",
                    membership_id=facts.membership_id,
                    plan_id=facts.plan_id,
                    reason="plan not listed in the catalog",
                )
                return None
            order = Order(
                id=new_order_id(),
                status=OrderStatus.PENDING.value,
                created_at=now,
                whop_membership_id=facts.membership_id,
                checkout_configuration_id=facts.checkout_configuration_id,
                plan_id=facts.plan_id,
                product_id=facts.product_id,
                whop_user_id=facts.user_id,
                email=facts.email,
                order_metadata={},
            )
            session.add(order)
            session.flush()
            log.info(
                "membership_recorded_ahead_of_payment",
                order_id=order.id,
                membership_id=facts.membership_id,
            )
            if conflict is not None:
                self._alert_binding_conflict(
                    session, conflict, order, f"membership {facts.membership_id}", now
                )
            return order
        if order.whop_membership_id is None:
            order.whop_membership_id = facts.membership_id
            log.info("membership_attached", order_id=order.id, membership_id=facts.membership_id)
        order.email = order.email or facts.email
        order.plan_id = order.plan_id or facts.plan_id
        session.flush()
        self._hooks.membership_attached(session, order, now)
        return order

    def apply_claim(self, session: Session, claim: ClaimFacts, now: datetime) -> Order:
        """Record a refund or dispute on its order and tell the admin once per claim. The
        order moves to refunded/disputed if it can, never backwards. A claim that ends an order
        and comes before its payment creates the order, so the late payment cannot deliver it;
        one that does not end it waits for its payment (`ClaimAhead`: the event is applied
        again later), so that the payment still finds the order its checkout created."""
        lock_keys(session, purchase_keys(claim.payment_id, None, None, None))
        order = session.scalars(
            select(Order).where(Order.whop_payment_id == claim.payment_id)
        ).first()
        if order is None:
            if not ends_order(claim):
                raise ClaimAhead(
                    f"payment {claim.payment_id} of {claim.kind} {claim.claim_id} "
                    f"({claim.status or 'no status'}) is not recorded yet: the {claim.kind} is "
                    "applied again once its payment is"
                )
            order = Order(
                id=new_order_id(),
                status=OrderStatus.PENDING.value,
                created_at=now,
                whop_payment_id=claim.payment_id,
                order_metadata={},
            )
            session.add(order)
        was = order.status
        target = OrderStatus.REFUNDED if claim.kind == "refund" else OrderStatus.DISPUTED
        ended = ends_order(claim)
        if ended:
            transition(order, target, f"{claim.kind} {claim.claim_id} {claim.status}")
        if order.waiting_for_stock and order.status == target.value:
            # Refunded while waiting for stock: it no longer waits, and must not be served.
            order.waiting_for_stock = None
            self._alerts.resolve(session, f"out_of_stock:{order.id}", now)
        key = f"{claim.kind}s"
        entries = [
            e for e in (order.order_metadata or {}).get(key, []) if e.get("id") != claim.claim_id
        ]
        entries.append(
            {
                "id": claim.claim_id,
                "status": claim.status,
                "amount": claim.amount,
                "reason": claim.reason,
                "at": now.isoformat(),
            }
        )
        order.order_metadata = {**(order.order_metadata or {}), key: entries}
        session.flush()
        log.warning(
            "order_claim",
            order_id=order.id,
            payment_id=claim.payment_id,
            kind=claim.kind,
            claim_id=claim.claim_id,
            status=claim.status,
        )
        delivered = was in (OrderStatus.DELIVERED.value, OrderStatus.DELIVERY_FAILED.value)
        item_details, item_steps = self._hooks.claim_recorded(session, order, claim, now)
        self._alerts.raise_once(
            session,
            AlertKind.ORDER_REFUNDED if claim.kind == "refund" else AlertKind.ORDER_DISPUTED,
            # One alert per claim while it is open, and one more when it ends the order (and,
            # under on_refund = "void", voids the item).
            f"{claim.kind}:{claim.claim_id}" + (":ended" if ended else ""),
            AlertContent(
                subject=f"{claim.kind.capitalize()} on order {order.id} ({claim.payment_id})",
                summary=(
                    f"Whop reports a {claim.kind} ({claim.status or 'no status'}) of payment "
                    f"{claim.payment_id}. The order was {was}"
                    + (": the product had already been delivered." if delivered else ".")
                    + (
                        f" The order is now {order.status}: it is not delivered, and a "
                        "membership not yet cancelled will not be cancelled now."
                        if ended
                        else " The money has not gone back, so nothing changes: delivery and "
                        "the membership's cancellation go on as usual. You will hear again if "
                        f"the {claim.kind} "
                        + ("succeeds." if claim.kind == "refund" else "is lost.")
                    )
                ),
                details=[
                    ("Order", order.id),
                    ("Customer", order.email or "unknown"),
                    ("Payment", claim.payment_id),
                    ("Amount", claim.amount or "-"),
                    ("Reason", claim.reason or "-"),
                    *item_details,
                ],
                steps=[
                    "Look at the payment in the Whop dashboard.",
                    *(
                        item_steps
                        or [
                            "If the product was delivered, decide whether to revoke it (e.g. "
                            "rotate an account's password or disable a license key).",
                        ]
                    ),
                ]
                + (
                    ["Answer the dispute in Whop before its deadline."]
                    if claim.kind == "dispute"
                    else []
                ),
            ),
            now,
            order_id=order.id,
        )
        return order

    def _find_order_for_membership(
        self, session: Session, facts: MembershipFacts
    ) -> tuple[Order | None, Order | None]:
        """The order this membership belongs to, and the order its metadata names if that one
        is bound to another membership (a binding conflict: never joined)."""
        conflict: Order | None = None
        if facts.order_id:
            order = session.get(Order, facts.order_id)
            if order is not None:
                if order.whop_membership_id in (None, facts.membership_id):
                    return order, None
                conflict = order
        if facts.checkout_configuration_id:
            order = session.scalars(
                _UNBOUND_OF_CHECKOUT, {"checkout_id": facts.checkout_configuration_id}
            ).first()
            if order is not None:
                return order, None
        order = session.scalars(_OF_MEMBERSHIP, {"membership_id": facts.membership_id}).first()
        if order is not None:
            return order, None
        if conflict is not None and conflict.whop_payment_id is not None:
            # A checkout link used again: the order it names is another purchase, paid and
            # bound. Normal (a buyer buying again), not a conflict worth an alert.
            conflict = None
        return None, conflict

    def _alert_binding_conflict(
        self, session: Session, bound: Order, new: Order, what: str, now: datetime
    ) -> None:
        """A payment or membership event named an order bound to another purchase: it got its
        own order instead. Once per pair of orders."""
        log.warning(
            "binding_conflict",
            order_id=bound.id,
            bound_membership_id=bound.whop_membership_id,
            bound_payment_id=bound.whop_payment_id,
            new_order_id=new.id,
            what=what,
        )
        self._alerts.raise_once(
            session,
            AlertKind.BINDING_CONFLICT,
            f"binding_conflict:{bound.id}:{new.id}",
            AlertContent(
                subject=f"Two purchases named order {bound.id}: kept apart",
                summary=(
                    f"Whop sent {what} naming order {bound.id}, which is already bound to "
                    f"membership {bound.whop_membership_id or '-'} and payment "
                    f"{bound.whop_payment_id or '-'}. An order is never rebound: it was "
                    f"recorded as its own order {new.id}, and each order delivers to and "
                    "cancels only its own purchase. This is usually a buyer who used the same "
                    "checkout link twice, with Whop's events arriving out of order."
                ),
                details=[
                    ("Bound order", bound.id),
                    ("Its membership", bound.whop_membership_id or "-"),
                    ("Its payment", bound.whop_payment_id or "-"),
                    ("Its customer", bound.email or "-"),
                    ("New order", new.id),
                    ("New purchase", what),
                ],
                steps=[
                    "Nothing to do if both orders are delivered (see them with "
                    "`whop-autocancel orders`, or `--email` with the customer's address).",
                    "If one of them waits (paid, not delivered), look at it in the Whop "
                    "dashboard and contact the customer.",
                ],
            ),
            now,
            order_id=bound.id,
        )

    def _alert_not_one_time(self, session: Session, order: Order, now: datetime) -> None:
        log.warning(
            "listed_plan_not_one_time",
            order_id=order.id,
            plan_id=order.plan_id,
            billing_reason=order.billing_reason,
        )
        self._alerts.raise_once(
            session,
            AlertKind.PLAN_NOT_ONE_TIME,
            f"plan_not_one_time:{order.plan_id}",
            AlertContent(
                subject=f"Plan {order.plan_id} is listed but was billed as a subscription",
                summary=(
                    f"A payment of the listed plan {order.plan_id} has billing reason "
                    f"'{order.billing_reason}', not 'one_time'. It was recorded only: nothing was "
                    "delivered and the membership was not touched. Subscriptions are never "
                    "cancelled. This alert is sent once per plan."
                ),
                details=[
                    ("Order", order.id),
                    ("Payment", order.whop_payment_id or "-"),
                    ("Membership", order.whop_membership_id or "-"),
                    ("Customer", order.email or "-"),
                    ("Billing reason", order.billing_reason or "-"),
                ],
                steps=[
                    "In Whop, check the plan's type: whop-autocancel is for one-time plans.",
                    f"If {order.plan_id} is a subscription, remove it from your catalog.",
                ],
            ),
            now,
            order_id=order.id,
        )
