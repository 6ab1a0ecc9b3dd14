"""Finding the order a payment belongs to (DESIGN §5, five steps, first match wins), under the
binding invariants: an order is bound to at most one payment and one membership, for ever."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from typing import Any

from sqlalchemy import ColumnElement, Select, bindparam, func, or_, select
from sqlalchemy.orm import Session

from whop_autocancel.db.base import not_searched
from whop_autocancel.orders.models import Order, OrderStatus
from whop_autocancel.whop.payloads import PaymentFacts


@dataclass(frozen=True)
class Match:
    order: Order | None
    step: str  # which rule found it, or why none did
    # An order the payment names (metadata, checkout) but that is bound to another membership
    # or checkout: the payment never joins it, and the admin hears of it once.
    conflict: Order | None = None


def contradiction(order: Order, facts: PaymentFacts) -> str | None:
    """Why `facts` can never join `order` (None: it can): another payment, membership or
    checkout is bound to it already."""
    if order.whop_payment_id is not None and order.whop_payment_id != facts.payment_id:
        return f"it is bound to payment {order.whop_payment_id}"
    if (
        order.whop_membership_id is not None
        and facts.membership_id is not None
        and order.whop_membership_id != facts.membership_id
    ):
        return f"it is bound to membership {order.whop_membership_id}"
    if (
        order.checkout_configuration_id is not None
        and facts.checkout_configuration_id is not None
        and order.checkout_configuration_id != facts.checkout_configuration_id
    ):
        return f"it belongs to checkout {order.checkout_configuration_id}"
    return None


def find_order_for_payment(
    session: Session, facts: PaymentFacts, window_seconds: float, fallback_time: datetime
) -> Match:
    """1 payment id; 2 metadata.order_id; 3 checkout configuration; 4 membership id;
    5 the only pending order of the plan, created within the window before the payment, whose
    Whop checkout exists and whose email is the payment's. Steps 2 to 5 consider only orders the
    payment does not contradict (`contradiction`)."""
    facts_known = (facts.membership_id is not None, facts.checkout_configuration_id is not None)
    params: dict[str, Any] = {
        "payment_id": facts.payment_id,
        "membership_id": facts.membership_id,
        "checkout_id": facts.checkout_configuration_id,
    }
    order = session.scalars(_BY_PAYMENT, params).first()
    if order is not None:
        return Match(order, "payment_id")
    conflict: Order | None = None
    if facts.order_id:
        named = session.scalars(_NAMED_UNPAID, {"order_id": facts.order_id}).first()
        if named is not None:
            if contradiction(named, facts) is None:
                return Match(named, "metadata.order_id")
            conflict = named
    if facts.checkout_configuration_id:
        order = session.scalars(_statements(*facts_known).by_checkout, params).first()
        if order is not None:
            return Match(order, "checkout_configuration_id", conflict)
    if facts.membership_id:
        order = session.scalars(_statements(*facts_known).by_membership, params).first()
        if order is not None:
            return Match(order, "membership_id", conflict)
    if conflict is not None:
        return Match(None, "the order it names is bound to another purchase: new order", conflict)
    if not facts.plan_id:
        return Match(None, "no plan id to match a pending order")
    if not facts.email:
        return Match(None, "no email to match a pending order: new order")
    reference = facts.created_at or facts.paid_at or fallback_time
    window = {
        "plan_id": facts.plan_id,
        "earliest": reference - timedelta(seconds=window_seconds),
        "latest": reference,
        "email": facts.email,
    }
    candidates = list(session.scalars(_statements(*facts_known).pending, params | window))
    if len(candidates) == 1:
        return Match(candidates[0], "pending order in window")
    if len(candidates) > 1:
        return Match(None, "several pending orders in window: not guessing, new order")
    return Match(None, "no matching order: new order")


# The statements of the steps, built once (building one and computing its cache key costs more
# than SQLite takes to run it). Which of them apply `_compatible`'s conditions depends on
# which facts the payment has, hence one set per (membership known, checkout known).

# (Not looked up in the payment id's unique index on SQLite: every order without a payment
# would be one row to it; see `not_searched`.)
_UNPAID = not_searched(Order.whop_payment_id).is_(None)
_BY_PAYMENT = select(Order).where(Order.whop_payment_id == bindparam("payment_id")).limit(1)
_NAMED_UNPAID = select(Order).where(Order.id == bindparam("order_id"), _UNPAID).limit(1)


@dataclass(frozen=True)
class _Steps:
    by_checkout: Select[Order]
    by_membership: Select[Order]
    pending: Select[Order]


@cache
def _statements(membership_known: bool, checkout_known: bool) -> _Steps:
    compatible = _compatible(membership_known, checkout_known)
    oldest_first = (Order.created_at, Order.id)
    return _Steps(
        by_checkout=select(Order)
        .where(Order.checkout_configuration_id == bindparam("checkout_id"), _UNPAID, *compatible)
        .order_by(*oldest_first)
        .limit(1),
        by_membership=select(Order)
        .where(Order.whop_membership_id == bindparam("membership_id"), _UNPAID, *compatible)
        .order_by(*oldest_first)
        .limit(1),
        pending=select(Order)
        .where(
            _UNPAID,
            *compatible,
            # Found by the status index: the pending orders, which PENDING_ORDER_TTL bounds.
            # Never by the plan's, every order of the plan ever (SQLite, without statistics,
            # ties the two and takes the index created last, which differs between installs).
            Order.status == OrderStatus.PENDING.value,
            not_searched(Order.plan_id) == bindparam("plan_id"),
            Order.created_at >= bindparam("earliest"),
            Order.created_at <= bindparam("latest"),
            # Only a checkout Whop created can have been paid; an order whose creation failed
            # (or is still in flight) has no checkout id and is never guessed.
            Order.checkout_configuration_id.is_not(None),
            func.lower(Order.email) == bindparam("email"),
        )
        .limit(2),
    )


def _compatible(membership_known: bool, checkout_known: bool) -> list[ColumnElement[bool]]:
    """SQL for `contradiction(order, facts) is None`, less the payment (callers ask `_UNPAID`),
    with the payment's membership and checkout as the parameters `membership_id` and
    `checkout_id`: only the ones it knows constrain the order."""
    conditions: list[ColumnElement[bool]] = []
    if membership_known:
        conditions.append(
            or_(
                Order.whop_membership_id.is_(None),
                Order.whop_membership_id == bindparam("membership_id"),
            )
        )
    if checkout_known:
        conditions.append(
            or_(
                Order.checkout_configuration_id.is_(None),
                Order.checkout_configuration_id == bindparam("checkout_id"),
            )
        )
    return conditions
