"""The five matching steps of DESIGN §5 against a real SQLite file."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from support.facts import payment_facts
from support.harness import MESSAGE_PLAN, make_runtime, make_settings
from whop_autocancel.clock import FrozenClock
from whop_autocancel.orders.models import Order
from whop_autocancel.orders.service import new_order_id
from whop_autocancel.runtime import Runtime
from whop_autocancel.whop.payloads import PaymentFacts


@pytest.fixture
def runtime(tmp_path: Path, clock: FrozenClock, database_url: str) -> Iterator[Runtime]:
    runtime = make_runtime(make_settings(tmp_path, DATABASE_URL=database_url), clock)
    yield runtime
    runtime.close()


def facts(created_at: datetime, **changes: Any) -> PaymentFacts:
    """The payment `pay_Match1` of membership `mem_Match1`, paid 10 s after it was created."""
    fixed: dict[str, Any] = {
        "payment_id": "pay_Match1",
        "membership_id": "mem_Match1",
        "paid_at": created_at + timedelta(seconds=10),
    }
    return payment_facts(created_at, **(fixed | changes))


# What the window rule needs of a pending order: a Whop checkout that exists, and the buyer's
# email (the payment's).
CHECKOUT = {"checkout_configuration_id": "ch_Win", "email": "buyer@example.com"}


def pending(runtime: Runtime, created_at: datetime, **fields: object) -> str:
    order_id = new_order_id()
    with runtime.database.transaction() as session:
        session.add(
            Order(
                id=order_id,
                status="pending",
                created_at=created_at,
                plan_id=fields.pop("plan_id", MESSAGE_PLAN),
                order_metadata={},
                **fields,
            )
        )
    return order_id


def apply(runtime: Runtime, payment: PaymentFacts, now: datetime) -> str:
    with runtime.database.transaction() as session:
        return runtime.orders.apply_payment(session, payment, now).id


def test_metadata_order_id_wins(runtime: Runtime, clock: FrozenClock) -> None:
    now = clock.now()
    target = pending(runtime, now - timedelta(hours=5))  # far outside the window: still ours
    pending(runtime, now - timedelta(seconds=30))
    assert apply(runtime, facts(now, metadata={"order_id": target}), now) == target


def test_checkout_configuration_id_matches(runtime: Runtime, clock: FrozenClock) -> None:
    now = clock.now()
    target = pending(runtime, now - timedelta(hours=1), checkout_configuration_id="ch_A")
    assert apply(runtime, facts(now, checkout_configuration_id="ch_A"), now) == target


def test_the_only_pending_order_in_the_window_matches(runtime: Runtime, clock: FrozenClock) -> None:
    now = clock.now()
    target = pending(runtime, now - timedelta(seconds=599), **CHECKOUT)
    assert apply(runtime, facts(now), now) == target


def test_window_counts_from_the_payment_created_at_not_now(
    runtime: Runtime, clock: FrozenClock
) -> None:
    now = clock.now()
    created = now - timedelta(days=2)  # a sweep applying an old payment
    target = pending(runtime, created - timedelta(seconds=60), **CHECKOUT)
    assert apply(runtime, facts(created), now) == target


def test_an_order_older_than_the_window_is_not_matched(
    runtime: Runtime, clock: FrozenClock
) -> None:
    now = clock.now()
    old = pending(runtime, now - timedelta(seconds=601), **CHECKOUT)
    assert apply(runtime, facts(now), now) != old


def test_two_candidates_make_a_new_order(runtime: Runtime, clock: FrozenClock) -> None:
    now = clock.now()
    first = pending(runtime, now - timedelta(seconds=30), **CHECKOUT)
    second = pending(runtime, now - timedelta(seconds=20), **CHECKOUT)
    assert apply(runtime, facts(now), now) not in (first, second)


def test_disagreeing_email_is_not_matched(runtime: Runtime, clock: FrozenClock) -> None:
    now = clock.now()
    other = pending(
        runtime,
        now - timedelta(seconds=30),
        email="someone@else.com",
        checkout_configuration_id="ch_Win",
    )
    assert apply(runtime, facts(now), now) != other


def test_agreeing_email_in_any_case_is_matched(runtime: Runtime, clock: FrozenClock) -> None:
    now = clock.now()
    target = pending(
        runtime,
        now - timedelta(seconds=30),
        email="Buyer@Example.com",
        checkout_configuration_id="ch_Win",
    )
    assert apply(runtime, facts(now), now) == target


def test_a_pending_order_of_another_membership_is_not_matched(
    runtime: Runtime, clock: FrozenClock
) -> None:
    now = clock.now()
    other = pending(
        runtime, now - timedelta(seconds=30), whop_membership_id="mem_Other", **CHECKOUT
    )
    assert apply(runtime, facts(now), now) != other


def test_an_order_of_another_plan_is_not_matched(runtime: Runtime, clock: FrozenClock) -> None:
    now = clock.now()
    other = pending(runtime, now - timedelta(seconds=30), plan_id="plan_Other", **CHECKOUT)
    assert apply(runtime, facts(now), now) != other


def test_a_renewal_payment_of_the_same_membership_is_its_own_order(
    runtime: Runtime, clock: FrozenClock
) -> None:
    now = clock.now()
    first = apply(runtime, facts(now), now)
    second = apply(
        runtime, facts(now, payment_id="pay_Match2", billing_reason="subscription_cycle"), now
    )
    assert first != second
