"""One view per purchase: find an order by anything a merchant holds (an order, payment,
membership, checkout or event id, or the customer's email) and lay out everything that happened
to it in time order: webhook events, the matching decision, the delivery (never a stock item's
content), every email, every call to Whop for its cancellation, every alert and admin action."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from whop_autocancel.admin.audit import actions_for
from whop_autocancel.alerts.models import Alert
from whop_autocancel.cancellation.models import Cancellation, CancellationAttempt
from whop_autocancel.clock import format_utc
from whop_autocancel.delivery.models import StockItem
from whop_autocancel.mail.models import Email
from whop_autocancel.mail.outbox import CHAT_KIND
from whop_autocancel.orders.models import Order
from whop_autocancel.webhooks.models import EventStatus, WebhookEvent
from whop_autocancel.whop.payloads import PayloadError, parse_envelope

Value = str | int | None

CHAT_ADDRESS = "(chat webhook)"
# Events that never reached an order (failed or not yet applied) are found by the ids in their
# payload; only this many, newest first, are searched.
UNLINKED_EVENTS_SEARCHED = 500


# Entries of the same instant are shown in the order the flow produces them.
FLOW_RANK = {
    source: rank
    for rank, source in enumerate(
        (
            "order",
            "event",
            "match",
            "stock",
            "delivery",
            "email",
            "admin",
            "cancellation",
            "attempt",
            "alert",
        )
    )
}

AFTER_ATTEMPTS = FLOW_RANK["attempt"]  # a cancellation's end shows after the call that ended it


@dataclass(frozen=True)
class TimelineEntry:
    at: datetime
    source: str  # order, match, event, delivery, stock, email, cancellation, attempt, alert, admin
    title: str  # one line
    fields: dict[str, Value] = field(default_factory=dict)
    # Its place among entries of the same instant (default: its source's place in the flow).
    rank: int | None = None

    @property
    def sort_key(self) -> tuple[datetime, int]:
        return (self.at, self.rank if self.rank is not None else FLOW_RANK[self.source])


@dataclass(frozen=True)
class PurchaseView:
    order: dict[str, Value]
    cancellation: dict[str, Value] | None
    entries: list[TimelineEntry]


def iso(moment: datetime | None) -> str | None:
    """The house time format: UTC, ISO 8601 with its zone, to the second."""
    return format_utc(moment) if moment is not None else None


def find_orders(session: Session, ref: str, limit: int = 50) -> list[str]:
    """Order ids, newest first, for REF: an order, payment, membership or checkout id, a
    webhook event id, or a customer's email (any case)."""
    ref = ref.strip()
    if not ref:
        return []
    conditions = [
        Order.id == ref,
        Order.whop_payment_id == ref,
        Order.whop_membership_id == ref,
        Order.checkout_configuration_id == ref,
    ]
    if "@" in ref:
        conditions.append(func.lower(Order.email) == ref.lower())
    found = list(
        session.scalars(
            select(Order.id)
            .where(or_(*conditions))
            .order_by(Order.created_at.desc(), Order.id.desc())
            .limit(limit)
        )
    )
    if found:
        return found
    event = session.get(WebhookEvent, ref)
    if event is None:
        return []
    if event.order_id is not None:
        return [event.order_id]
    ids = _payload_ids(event.payload)
    if not ids:
        return []
    return list(
        session.scalars(
            select(Order.id)
            .where(
                or_(
                    Order.whop_payment_id.in_(ids),
                    Order.whop_membership_id.in_(ids),
                    Order.checkout_configuration_id.in_(ids),
                    Order.id.in_(ids),
                )
            )
            .order_by(Order.created_at.desc())
            .limit(limit)
        )
    )


def _payload_ids(payload: str) -> set[str]:
    """The payment, membership, checkout and order ids an event's body names."""
    try:
        envelope = parse_envelope(payload.encode())
    except PayloadError:
        return set()
    data = envelope.data
    ids: set[str] = set()
    membership = data.get("membership")
    payment = data.get("payment")
    metadata = data.get("metadata")
    for value in (
        data.get("id"),
        payment.get("id") if isinstance(payment, dict) else None,
        data.get("membership_id"),
        membership.get("id") if isinstance(membership, dict) else None,
        data.get("payment_id"),
        data.get("checkout_configuration_id"),
        metadata.get("order_id") if isinstance(metadata, dict) else None,
    ):
        if isinstance(value, str) and value:
            ids.add(value)
    return ids


def order_fields(order: Order) -> dict[str, Value]:
    return {
        "id": order.id,
        "status": order.status,
        "plan_id": order.plan_id,
        "product_id": order.product_id,
        "email": order.email,
        "payment_id": order.whop_payment_id,
        "membership_id": order.whop_membership_id,
        "checkout_configuration_id": order.checkout_configuration_id,
        "billing_reason": order.billing_reason,
        "amount": order.amount,
        "currency": order.currency,
        "matched_by": order.matched_by,
        "delivery_method": order.delivery_method,
        "waiting_for_stock": order.waiting_for_stock,
        "created_at": iso(order.created_at),
        "paid_at": iso(order.paid_at),
        "delivered_at": iso(order.delivered_at),
    }


def cancellation_fields(row: Cancellation) -> dict[str, Value]:
    return {
        "id": row.id,
        "status": row.status,
        "membership_id": row.membership_id,
        "attempts": row.attempts,
        "generation": row.generation,
        "last_http_status": row.last_http_status,
        "last_error": row.last_error,
        "next_attempt_at": iso(row.next_attempt_at),
        "canceled_at": iso(row.canceled_at),
    }


def purchase(session: Session, order_id: str) -> PurchaseView | None:
    """Everything that happened to one order, in time order (ties keep the flow's order)."""
    order = session.get(Order, order_id)
    if order is None:
        return None
    entries: list[TimelineEntry] = []
    entries += _order_entries(order)
    entries += _event_entries(session, order)
    entries += _stock_entries(session, order)
    entries += _email_entries(session, order)
    cancellation = session.scalars(
        select(Cancellation).where(Cancellation.order_id == order.id)
    ).first()
    if cancellation is not None:
        entries += _cancellation_entries(session, cancellation)
    entries += _alert_entries(session, order)
    entries += [
        TimelineEntry(
            action.at,
            "admin",
            f"{action.action} {action.target} by {action.actor}: {action.outcome}",
            {
                "actor": action.actor,
                "action": action.action,
                "target": action.target,
                "outcome": action.outcome,
                "detail": action.detail or None,
            },
        )
        for action in actions_for(session, order.id)
    ]
    entries.sort(key=lambda entry: entry.sort_key)
    return PurchaseView(
        order=order_fields(order),
        cancellation=cancellation_fields(cancellation) if cancellation is not None else None,
        entries=entries,
    )


def _order_entries(order: Order) -> list[TimelineEntry]:
    origin = (
        f"checkout {order.checkout_configuration_id}"
        if order.checkout_configuration_id
        else "from a Whop event"
    )
    entries = [
        TimelineEntry(
            order.created_at,
            "order",
            f"order created ({origin})",
            {"plan_id": order.plan_id, "email": order.email},
        )
    ]
    if order.paid_at is not None:
        entries.append(
            TimelineEntry(
                # Bound when its event was applied: never before the order existed (Whop's
                # paid time is in the fields).
                max(order.paid_at, order.created_at),
                "match",
                f"paid: payment {order.whop_payment_id} matched by "
                f"{order.matched_by or 'an earlier version (rule not recorded)'}",
                {
                    "payment_id": order.whop_payment_id,
                    "membership_id": order.whop_membership_id,
                    "rule": order.matched_by,
                    "paid_at": iso(order.paid_at),
                    "billing_reason": order.billing_reason,
                    "amount": order.amount,
                    "currency": order.currency,
                },
            )
        )
    if order.delivered_at is not None:
        entries.append(
            TimelineEntry(
                order.delivered_at,
                "delivery",
                f"delivered by {order.delivery_method or 'unknown method'}",
                {"method": order.delivery_method},
            )
        )
    elif order.delivery_error and order.paid_at is not None:
        entries.append(
            TimelineEntry(
                max(order.paid_at, order.created_at),
                "delivery",
                f"delivery failed: {order.delivery_error}",
                {"method": order.delivery_method, "waiting_for_stock": order.waiting_for_stock},
            )
        )
    return entries


def _event_entries(session: Session, order: Order) -> list[TimelineEntry]:
    events = list(session.scalars(select(WebhookEvent).where(WebhookEvent.order_id == order.id)))
    ids = {
        value
        for value in (
            order.id,
            order.whop_payment_id,
            order.whop_membership_id,
            order.checkout_configuration_id,
        )
        if value
    }
    unlinked = session.scalars(
        select(WebhookEvent)
        .where(
            WebhookEvent.order_id.is_(None),
            WebhookEvent.status.in_([EventStatus.FAILED.value, EventStatus.RECEIVED.value]),
        )
        .order_by(WebhookEvent.received_at.desc())
        .limit(UNLINKED_EVENTS_SEARCHED)
    )
    events += [event for event in unlinked if _payload_ids(event.payload) & ids]
    return [
        TimelineEntry(
            event.received_at,
            "event",
            f"webhook {event.type} {event.id} received: {event.status}",
            {
                "event_id": event.id,
                "type": event.type,
                "status": event.status,
                "attempts": event.attempts,
                "last_error": event.last_error,
                "handled_at": iso(event.handled_at),
            },
        )
        for event in events
    ]


def _stock_entries(session: Session, order: Order) -> list[TimelineEntry]:
    item = session.scalars(select(StockItem).where(StockItem.order_id == order.id)).first()
    if item is None:
        return []
    entries = []
    if item.assigned_at is not None:
        entries.append(
            TimelineEntry(
                item.assigned_at,
                "stock",
                f"stock item #{item.id} of pool {item.pool} assigned",
                {"item_id": item.id, "pool": item.pool, "status": item.status},
            )
        )
    if item.voided_at is not None:
        entries.append(
            TimelineEntry(
                item.voided_at,
                "stock",
                f"stock item #{item.id} voided: {item.void_reason or 'no reason given'}",
                {"item_id": item.id, "pool": item.pool},
            )
        )
    return entries


def email_status(email: Email) -> str:
    if email.sent_at is not None:
        return "sent"
    if email.failed_at is not None:
        return "failed"
    return "pending"


def _email_entries(session: Session, order: Order) -> list[TimelineEntry]:
    entries = []
    for email in session.scalars(
        select(Email).where(Email.order_id == order.id).order_by(Email.id)
    ):
        fields: dict[str, Value] = {
            "email_id": email.id,
            "kind": email.kind,
            # A chat message's address is its webhook URL, which holds the channel's token.
            "to": CHAT_ADDRESS if email.kind == CHAT_KIND else email.to_address,
            "status": email_status(email),
            "attempts": email.attempts,
            "smtp_answer": email.last_error,
        }
        entries.append(
            TimelineEntry(
                email.created_at, "email", f"{email.kind} email #{email.id} queued", fields
            )
        )
        if email.sent_at is not None:
            entries.append(
                TimelineEntry(
                    email.sent_at,
                    "email",
                    f"{email.kind} email #{email.id} accepted by the SMTP server",
                    fields,
                )
            )
        if email.failed_at is not None:
            entries.append(
                TimelineEntry(
                    email.failed_at,
                    "email",
                    f"{email.kind} email #{email.id} failed: {email.last_error or 'given up'}",
                    fields,
                )
            )
    return entries


def _cancellation_entries(session: Session, row: Cancellation) -> list[TimelineEntry]:
    entries = [
        TimelineEntry(
            row.created_at,
            "cancellation",
            f"cancellation #{row.id} created for membership {row.membership_id or '(unknown yet)'}",
            {"cancellation_id": row.id, "status": row.status},
        )
    ]
    for attempt in session.scalars(
        select(CancellationAttempt)
        .where(CancellationAttempt.cancellation_id == row.id)
        .order_by(CancellationAttempt.id)
    ):
        status = attempt.http_status if attempt.http_status is not None else "no answer"
        entries.append(
            TimelineEntry(
                attempt.at,
                "attempt",
                f"{attempt.request.replace('{id}', attempt.membership_id or '?')} → {status} "
                f"({attempt.outcome}); cancellation {attempt.result}",
                {
                    "http_status": attempt.http_status,
                    "outcome": attempt.outcome,
                    "result": attempt.result,
                    "idempotency_key": attempt.idempotency_key,
                    "generation": attempt.generation,
                    "attempt": attempt.attempt,
                    "detail": attempt.detail,
                },
            )
        )
    if row.canceled_at is not None:
        entries.append(
            TimelineEntry(
                row.canceled_at,
                "cancellation",
                f"membership {row.membership_id} {row.status.replace('_', ' ')}",
                {"cancellation_id": row.id, "status": row.status},
                rank=AFTER_ATTEMPTS,
            )
        )
    elif row.status == "failed":
        entries.append(
            TimelineEntry(
                row.updated_at,
                "cancellation",
                f"cancellation #{row.id} failed: {row.last_error or 'no error recorded'}",
                {"cancellation_id": row.id, "status": row.status},
                rank=AFTER_ATTEMPTS,
            )
        )
    return entries


def _alert_entries(session: Session, order: Order) -> list[TimelineEntry]:
    return [
        TimelineEntry(
            alert.created_at,
            "alert",
            f"alert {alert.kind}: {alert.subject}",
            {
                "alert_id": alert.id,
                "kind": alert.kind,
                "notified_at": iso(alert.notified_at),
                "resolved_at": iso(alert.resolved_at),
            },
        )
        for alert in session.scalars(
            select(Alert).where(Alert.order_id == order.id).order_by(Alert.id)
        )
    ]


def view_json(view: PurchaseView) -> dict[str, Any]:
    """The purchase as one JSON-able document."""
    return {
        "order": view.order,
        "cancellation": view.cancellation,
        "timeline": [
            {"at": iso(entry.at), "source": entry.source, "title": entry.title, **entry.fields}
            for entry in view.entries
        ],
    }


def dumps(view: PurchaseView) -> str:
    return json.dumps(view_json(view), ensure_ascii=False)
