"""What the apply path reads from a Whop event (`PaymentFacts`, `MembershipFacts`), built for
tests that call the orders service directly: a listed one-time purchase by default, fresh ids
each time, any field changed by keyword."""

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
