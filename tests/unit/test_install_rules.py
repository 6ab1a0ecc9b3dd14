"""What the Whop sweep, `recover` and `backfill` refuse, judged from what Whop returned alone
(DESIGN §5, "Install time"). The database side (known orders) is tested in integration."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from whop_autocancel.reconcile.backfill import LiveMembership, whop_side_reason
from whop_autocancel.reconcile.whop_sweep import payment_refusal
from whop_autocancel.whop.payloads import payment_facts

WATCHING = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
PLAN = "plan_Stock1"


def payment(**fields: Any) -> dict[str, Any]:
    return {"id": "pay_x", "status": "paid", "substatus": "succeeded", **fields}


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        (payment(), None),
        (payment(refunded_amount=0.0), None),
        (payment(refunded_amount=None), None),
        (payment(refunded_amount=25.0, substatus="refunded"), "refunded 25.00"),
        (payment(refunded_amount=0.01), "refunded 0.01"),
        (payment(refunded_amount={"amount": "5.00", "currency": "usd"}), "refunded 5.00"),
        (payment(substatus="refunded"), "substatus refunded"),
        (payment(substatus="partially_refunded"), "substatus partially_refunded"),
        (payment(substatus="auto_refunded"), "substatus auto_refunded"),
        (payment(status="open"), "status 'open', not paid"),
        (payment(status=None), "status None, not paid"),
    ],
)
def test_a_payment_with_any_refund_or_not_paid_is_refused(
    item: dict[str, Any], reason: str | None
) -> None:
    refusal = payment_refusal(item, payment_facts(item))
    if reason is None:
        assert refusal is None
    else:
        assert refusal is not None
        assert reason in refusal


def membership(**fields: Any) -> LiveMembership:
    item = {"id": "mem_x", "status": "completed", "plan": {"id": PLAN}, **fields}
    found = LiveMembership.from_item(item)
    assert found is not None
    return found


@pytest.mark.parametrize(
    ("found", "reason"),
    [
        (membership(created_at="2026-11-30T08:00:00Z"), None),
        (membership(plan=None, plan_id=PLAN, created_at="2026-11-30T08:00:00Z"), None),
        (membership(created_at="2026-12-01T12:00:00Z"), "created after the service started"),
        (membership(created_at="2026-12-02T08:00:00Z"), "created after the service started"),
        (membership(created_at=None), "no created_at"),
        (membership(created_at="last tuesday"), "unreadable created_at"),
        (
            membership(plan={"id": "plan_Other1"}, created_at="2026-11-30T08:00:00Z"),
            f"plan plan_Other1, not {PLAN}",
        ),
        (
            membership(plan=None, plan_id="plan_Other1", created_at="2026-11-30T08:00:00Z"),
            f"plan plan_Other1, not {PLAN}",
        ),
        (membership(plan=None, created_at="2026-11-30T08:00:00Z"), "names no plan"),
    ],
)
def test_backfill_judges_each_membership_itself(found: LiveMembership, reason: str | None) -> None:
    judged = whop_side_reason(found, PLAN, WATCHING)
    if reason is None:
        assert judged is None
    else:
        assert judged is not None
        assert reason in judged


def test_an_inactive_or_id_less_membership_is_not_live() -> None:
    assert LiveMembership.from_item({"id": "mem_x", "status": "canceled"}) is None
    assert LiveMembership.from_item({"id": "mem_x", "status": "expired"}) is None
    assert LiveMembership.from_item({"status": "completed"}) is None
