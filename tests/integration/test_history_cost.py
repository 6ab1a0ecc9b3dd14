"""A purchase costs the same database work in a shop with a long history as on its first day.

Every purchase leaves its rows for ever: the order, its payment, its webhooks, its emails, its
cancellation; every checkout nobody paid leaves an order that ends abandoned. A statement that
reads any of them to serve a new purchase (a status or plan index walked past its key, `IS NULL`
taken for a lookup, a sort of a whole backlog) makes each purchase dearer than the one before,
which no test on a fresh database shows. So this test runs purchases, from the payment to the
webhook of the cancelled membership, in a fresh shop and again after hundreds of paid and
unpaid checkouts, and counts the work SQLite does for them: its virtual-machine steps
(`sqlite_steps`), which do not depend on the machine's speed or load.

SQLite keeps no statistics, so it ties indexes of equal promise and takes the one created last,
which differs between installs (migrations re-create tables, their indexes in the order of a
Python set). The plan index goes last here: an install where it did would otherwise walk every
order of the plan ever, at each purchase that names no order.

Real parts: SQLite (file), the service over HTTP, the Whop simulator over HTTP, an aiosmtpd sink."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from support.harness import MESSAGE_PLAN, drain, wait_for
from support.shop import Shop, open_shop
from support.statements import create_last, sqlite_steps
from whop_autocancel.clock import FrozenClock
from whop_autocancel.orders.models import Order, OrderStatus
from whop_autocancel.simulator import SimulatorServer

# Paid purchases (and as many checkouts nobody paid) between the two measures: reading their
# rows costs several steps a row, far more than the tolerance below.
HISTORY = 300
MEASURED = 20  # purchases a measure
TOLERANCE = 1.15  # deeper B-trees and the apply jobs' chunking move the count a little


@pytest.fixture
def shop(tmp_path: Path, clock: FrozenClock, simulator: SimulatorServer) -> Iterator[Shop]:
    # (SQLite: the default.) Checkouts nobody paid are abandoned after a minute, not a day: the
    # service's clock must not run far ahead of the simulator's, which dates the payments.
    yield from open_shop(tmp_path, clock, simulator, PENDING_ORDER_TTL=60)


def purchases(shop: Shop, tag: str, paid: int, *, unpaid: int = 0) -> None:
    """`paid` purchases, every other one through the merchant's checkout (its metadata names
    its order) and the others made on Whop directly (matched by the window rule, or a new
    order), and `unpaid` checkouts nobody completes; every job run, the cancellations made
    and their webhooks applied."""
    state = shop.simulator.state
    memberships = []
    for n in range(paid):
        email = f"{tag}-{n}@example.com"
        if n % 2:
            checkout = shop.runtime.checkouts.create(MESSAGE_PLAN, email)
            purchase = state.complete_checkout(checkout.checkout_configuration_id, email=email)
        else:
            purchase = state.create_purchase(MESSAGE_PLAN, email=email)
        memberships.append(purchase["membership_id"])
    for n in range(unpaid):
        shop.runtime.checkouts.create(MESSAGE_PLAN, f"{tag}-unpaid-{n}@example.com")
    wait_for(lambda: state.pending_webhooks() == 0, 60, "the purchases' webhooks")
    drain(shop.runtime)
    shop.clock.advance(shop.runtime.settings.CANCEL_DELAY + 1)
    drain(shop.runtime, include_scheduled=True)
    wait_for(lambda: state.pending_webhooks() == 0, 60, "the cancellations' webhooks")
    drain(shop.runtime, include_scheduled=True)
    assert [state.membership(m)["status"] for m in memberships] == ["canceled"] * paid


def pending_orders(shop: Shop) -> int:
    with shop.runtime.database.transaction() as session:
        count = session.scalar(
            select(func.count()).where(Order.status == OrderStatus.PENDING.value)
        )
        return int(count or 0)


def steps_a_purchase(shop: Shop, tag: str) -> float:
    with sqlite_steps(shop.runtime.database.engine) as steps:
        purchases(shop, tag, MEASURED)
    return steps[0] / MEASURED


def test_a_purchase_costs_the_same_after_a_long_history(shop: Shop) -> None:
    plan_index = {str(i.name): i for i in Order.__table__.indexes if i.name == "ix_orders_plan_id"}
    create_last(shop.runtime.database.engine, plan_index)
    shop.smtp_up()
    purchases(shop, "warm-up", 6)
    first_day = steps_a_purchase(shop, "first")
    purchases(shop, "history", HISTORY, unpaid=HISTORY)
    # The checkouts nobody paid end abandoned once PENDING_ORDER_TTL has passed.
    shop.clock.advance(shop.runtime.settings.PENDING_ORDER_TTL + 1)
    for _ in range(HISTORY):
        if pending_orders(shop) == 0:
            break
        shop.runtime.stuck_sweep.run(force=True)
    assert pending_orders(shop) == 0
    drain(shop.runtime, include_scheduled=True)
    later = steps_a_purchase(shop, "later")
    assert later <= first_day * TOLERANCE, (
        f"a purchase took {first_day:.0f} steps in a fresh shop and {later:.0f} after "
        f"{HISTORY} paid and {HISTORY} unpaid checkouts"
    )
