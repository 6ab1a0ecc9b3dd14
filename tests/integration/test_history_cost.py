"""A purchase, and a stuck-work sweep, cost the same database work in a shop with a long history
as on its first day.

Every purchase leaves its rows for ever: the order, its payment, its webhooks, its emails, its
cancellation; every checkout nobody paid leaves an order that ends abandoned; every bounced
email stays given up, every refund stays recorded. A statement that
reads any of them to serve a new purchase (a status or plan index walked past its key, `IS NULL`
taken for a lookup, a sort of a whole backlog) makes each purchase dearer than the one before,
which no test on a fresh database shows. So this test runs purchases, from the payment to the
webhook of the cancelled membership, in a fresh shop and again after hundreds of paid and
unpaid checkouts (a third of the paid ones with a bounced delivery email, a fifth refunded, some
checkout links paid twice), and counts the work SQLite does for them: its virtual-machine steps
(`sqlite_steps`), which do not depend on the machine's speed or load.

SQLite keeps no statistics, so it ties indexes of equal promise and takes the one created last,
which differs between installs (migrations re-create tables, their indexes in the order of a
Python set). The plan index goes last here: an install where it did would otherwise walk every
order of the plan ever, at each purchase that names no order.

Real parts: SQLite (file), the service over HTTP, the Whop simulator over HTTP, an aiosmtpd sink."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from support.harness import MESSAGE_PLAN, claim_event, drain, post_event, wait_for
from support.shop import Shop, open_shop
from support.statements import Steps, create_last, sqlite_steps
from whop_autocancel.admin.operations import cancel_membership
from whop_autocancel.clock import FrozenClock
from whop_autocancel.mail.models import Email
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
    # A row whose job ran too early is overdue again after a second (STUCK_GRACE).
    yield from open_shop(tmp_path, clock, simulator, PENDING_ORDER_TTL=60, STUCK_GRACE=1)


def purchases(
    shop: Shop,
    tag: str,
    paid: int,
    *,
    unpaid: int = 0,
    edges: bool = False,
    steps: Steps | None = None,
) -> None:
    """`paid` purchases, every other one through the merchant's checkout (its metadata names
    its order) and the others made on Whop directly (matched by the window rule, or a new
    order), and `unpaid` checkouts nobody completes; every job run, the cancellations made
    and their webhooks applied. `edges`: some purchases meet the edges a shop's history is
    made of too: a checkout link paid twice, a delivery email that bounces (its membership
    then cancelled by hand), a refund."""
    state = shop.simulator.state
    memberships, bounced, refunds = [], [], []
    for n in range(paid):
        email = f"{tag}-{n}@example.com"
        if edges and n % 3 == 1:
            assert shop.sink is not None
            shop.sink.reject(email)
        if n % 2:
            checkout = shop.runtime.checkouts.create(MESSAGE_PLAN, email)
            purchase = state.complete_checkout(checkout.checkout_configuration_id, email=email)
            if edges and n % 10 == 1:  # the link reused by another buyer
                again = state.complete_checkout(
                    checkout.checkout_configuration_id, email=f"{tag}-{n}-again@example.com"
                )
                memberships.append(again["membership_id"])
        else:
            purchase = state.create_purchase(MESSAGE_PLAN, email=email)
        (bounced if edges and n % 3 == 1 else memberships).append(purchase["membership_id"])
        if edges and n % 5 == 4:
            refunds.append(purchase["payment_id"])
    for n in range(unpaid):
        shop.runtime.checkouts.create(MESSAGE_PLAN, f"{tag}-unpaid-{n}@example.com")
    wait_for(lambda: state.pending_webhooks() == 0, 60, "the purchases' webhooks")
    drain(shop.runtime)
    for membership_id in bounced:  # the admin's answer to each email_failed alert
        cancel_membership(shop.runtime, membership_id, actor="test")
    # Time passes, CANCEL_DELAY at a time, until every membership is cancelled: most go at the
    # first step, a purchase whose webhooks came out of order (applied on a retry) later. The
    # queue's delays are real time and the service's clock is the test's: a job the queue ran
    # before its row was due (the drain above took longer than CANCEL_DELAY) did nothing, and
    # the stuck-work sweep enqueues its row again, as it would in production. The sweep is
    # periodic work, not the purchases': it is not counted.
    for _ in range(5):
        shop.clock.advance(shop.runtime.settings.CANCEL_DELAY + 1)
        with steps.paused() if steps is not None else nullcontext():
            shop.runtime.stuck_sweep.run(force=True)
        drain(shop.runtime, include_scheduled=True)
        wait_for(lambda: state.pending_webhooks() == 0, 60, "the cancellations' webhooks")
        drain(shop.runtime, include_scheduled=True)
        live = [m for m in memberships + bounced if state.membership(m)["status"] != "canceled"]
        if not live:
            break
    assert live == []
    if refunds:  # refunded at Whop after the delivery: its webhook comes
        webhook_url = state.webhook_url
        assert webhook_url is not None
        with httpx.Client(base_url=webhook_url.removesuffix("/webhooks/whop")) as client:
            for payment_id in refunds:
                state.refund_payment(payment_id)
                post_event(client, claim_event("refund", payment_id, "succeeded", event="created"))
        drain(shop.runtime, include_scheduled=True)


def pending_orders(shop: Shop) -> int:
    with shop.runtime.database.transaction() as session:
        count = session.scalar(
            select(func.count()).where(Order.status == OrderStatus.PENDING.value)
        )
        return int(count or 0)


def held(shop: Shop) -> dict[str, int]:
    """What the shop's tables hold: orders by status, and the emails given up."""
    with shop.runtime.database.transaction() as session:
        by_status = select(Order.status, func.count()).group_by(Order.status)
        counts: dict[str, int] = {status: count for status, count in session.execute(by_status)}
        counts["emails given up"] = session.scalar(select(func.count(Email.failed_at))) or 0
        return counts


def steps_a_purchase(shop: Shop, tag: str) -> float:
    with sqlite_steps(shop.runtime.database.engine) as steps:
        purchases(shop, tag, MEASURED, steps=steps)
    return steps.count / MEASURED


def steps_a_sweep(shop: Shop) -> int:
    """One stuck-work sweep with nothing to do (it runs every SWEEP_INTERVAL, history or not)."""
    with sqlite_steps(shop.runtime.database.engine) as steps:
        shop.runtime.stuck_sweep.run(force=True)
    return steps.count


def test_a_purchase_costs_the_same_after_a_long_history(shop: Shop) -> None:
    plan_index = {str(i.name): i for i in Order.__table__.indexes if i.name == "ix_orders_plan_id"}
    create_last(shop.runtime.database.engine, plan_index)
    shop.smtp_up()
    purchases(shop, "warm-up", 6)
    first_day = steps_a_purchase(shop, "first")
    first_sweep = steps_a_sweep(shop)
    purchases(shop, "history", HISTORY, unpaid=HISTORY, edges=True)
    # The checkouts nobody paid end abandoned once PENDING_ORDER_TTL has passed.
    shop.clock.advance(shop.runtime.settings.PENDING_ORDER_TTL + 1)
    for _ in range(HISTORY):
        if pending_orders(shop) == 0:
            break
        shop.runtime.stuck_sweep.run(force=True)
    assert pending_orders(shop) == 0
    drain(shop.runtime, include_scheduled=True)
    edges = range(HISTORY)
    reused = sum(1 for n in edges if n % 10 == 1)
    sold = 6 + MEASURED + HISTORY + reused  # (the warm-up's and the first measure's too)
    refunded = sum(1 for n in edges if n % 5 == 4)
    assert held(shop) == {
        "abandoned": HISTORY,
        "delivered": sold - refunded,
        "refunded": refunded,
        "emails given up": sum(1 for n in edges if n % 3 == 1),
    }
    later_sweep = steps_a_sweep(shop)
    later = steps_a_purchase(shop, "later")
    assert later <= first_day * TOLERANCE, (
        f"a purchase took {first_day:.0f} steps in a fresh shop and {later:.0f} after "
        f"{HISTORY} paid and {HISTORY} unpaid checkouts"
    )
    assert later_sweep <= first_sweep * TOLERANCE, (
        f"a stuck-work sweep took {first_sweep} steps in a fresh shop and {later_sweep} after "
        "the history"
    )
