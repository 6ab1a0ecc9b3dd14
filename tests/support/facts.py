"""What the apply path reads from a Whop event (`PaymentFacts`, `MembershipFacts`), built for
tests that call the orders service directly: a listed one-time purchase by default, fresh ids
each time, any field changed by keyword. And an outbox row as a previous version (or a test of
the schema) writes it, without the outbox."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from support.harness import MESSAGE_PLAN
from whop_autocancel.whop.payloads import MembershipFacts, PaymentFacts


def payment_facts(now: datetime | None, **changes: Any) -> PaymentFacts:
    """A paid one-time payment of the message plan, created and paid at `now`."""
    values: dict[str, Any] = {
        "payment_id": f"pay_{uuid.uuid4().hex[:12]}",
        "status": "paid",
        "billing_reason": "one_time",
        "membership_id": f"mem_{uuid.uuid4().hex[:12]}",
        "plan_id": MESSAGE_PLAN,
        "product_id": "prod_1",
        "user_id": "user_1",
        "email": "buyer@example.com",
        "checkout_configuration_id": None,
        "metadata": {},
        "amount": "25.00",
        "currency": "usd",
        "created_at": now,
        "paid_at": now,
    }
    return PaymentFacts(**(values | changes))


def membership_facts(**changes: Any) -> MembershipFacts:
    """A live membership of the message plan."""
    values: dict[str, Any] = {
        "membership_id": f"mem_{uuid.uuid4().hex[:12]}",
        "status": "active",
        "plan_id": MESSAGE_PLAN,
        "product_id": "prod_1",
        "user_id": "user_1",
        "email": "buyer@example.com",
        "checkout_configuration_id": None,
        "metadata": {},
    }
    return MembershipFacts(**(values | changes))


def email_row(kind: str, at: datetime, **changes: Any) -> dict[str, Any]:
    """The values of an `emails` row of `kind`, queued and tried once at `at`, due at `at`
    (a next attempt kept even where `sent_at` or `failed_at` is set, as before migration
    0011); any column changed by keyword."""
    values: dict[str, Any] = {
        "kind": kind,
        "to_address": "buyer@example.com",
        "subject": "s",
        "text_body": "t",
        "created_at": at,
        "attempts": 1,
        "next_attempt_at": at,
        "sent_at": None,
        "failed_at": None,
    }
    return values | changes
