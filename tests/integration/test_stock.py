"""Delivery from stock (issue 6), with real parts: the web app on loopback receiving signed
webhooks, a real database (SQLite, PostgreSQL, MariaDB), the huey queue run in-process, the Whop
simulator over HTTP for the cancellations and a real SMTP sink. Time moves by the test's clock."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from support.harness import (
    ADMIN,
    CATALOG,
    MESSAGE_PLAN,
    NONE_PLAN,
    STOCK_CATALOG,
    STOCK_KEY,
    STOCK_PLAN,
    STOCK_POOL,
    claim_event,
    make_runtime,
    make_settings,
    wait_for,
)
from support.stock import StockWorld, stock_world
from whop_autocancel.admin.stock import (
    empty_listed_pools,
    import_stock,
    list_stock,
    preview_import,
    show_item,
    stock_levels,
    void_stock,
    void_stocks,
)
from whop_autocancel.clock import FrozenClock
from whop_autocancel.delivery import stock
from whop_autocancel.delivery.models import StockItem
from whop_autocancel.delivery.service import ResendError
from whop_autocancel.delivery.stock import StockedItem, StockError, items_for
from whop_autocancel.errors import ConfigurationError
from whop_autocancel.logs import configure_logging
from whop_autocancel.mail.models import Email
from whop_autocancel.mail.sink import SmtpSink
from whop_autocancel.orders.models import Order
from whop_autocancel.orders.service import DELIVER_TASK
from whop_autocancel.runtime import build_runtime
from whop_autocancel.sealing import Sealer
from whop_autocancel.simulator import SimulatorServer

KEEP_STOCK_PLAN = "plan_StockKeep1"
ITEMS = [f"player{n}@game.example:Secr3t-{uuid.uuid4().hex[:12]}" for n in range(1, 9)]


def membership_status(world: StockWorld, membership_id: str) -> str:
    return str(world.simulator.state.membership(membership_id)["status"])


# 1. The happy path ----------------------------------------------------------------------------


def test_a_paid_stock_order_gets_one_item_by_email_and_is_then_cancelled(
    world: StockWorld,
) -> None:
    world.import_items(*ITEMS[:4])
    ids = world.item_ids(*ITEMS[:4])
    # The purchase's webhooks come from the simulator itself, like Whop's would.
    world.simulator.state.set_webhook_url(f"{world.server_url}/webhooks/whop")
    email = "gamer@example.com"
    purchase = world.simulator.state.create_purchase(STOCK_PLAN, email=email)
    wait_for(lambda: world.simulator.state.pending_webhooks() == 0)
    world.drain()

    with world.runtime.database.transaction() as session:
        order = session.scalars(
            select(Order).where(Order.whop_payment_id == purchase["payment_id"])
        ).one()
    assert order.status == "delivered"
    assert order.delivery_method == f"stock:{STOCK_POOL}"
    assert order.waiting_for_stock is None
    # Exactly one item, the oldest, assigned to this order.
    assigned = [i for i in world.items() if i.status == "assigned"]
    assert [(i.id, i.order_id) for i in assigned] == [(ids[ITEMS[0]], order.id)]
    assert assigned[0].assigned_at == world.clock.now()
    assert sorted(i.status for i in world.items()) == ["assigned"] + ["available"] * 3

    # The customer's email (through the real SMTP server) carries the item in both parts.
    [mail] = world.mail_to(email)
    assert mail.subject == "Your purchase: Game account"
    assert ITEMS[0] in mail.text
    assert ITEMS[0] in mail.html
    assert "Log in at https://game.example" in mail.text
    assert order.id in mail.text
    for other in ITEMS[1:]:
        assert other not in mail.text
    # The admin notice says what was delivered, but never the item itself.
    [notice] = world.admin_mail("Delivered")
    assert f"stock item #{ids[ITEMS[0]]} from pool {STOCK_POOL}" in notice.text
    assert ITEMS[0] not in notice.text
    assert ITEMS[0] not in notice.html
    assert world.alerts() == []  # 3 left, above the threshold of 2

    # The cancellation is scheduled, then runs against "Whop" once CANCEL_DELAY is over.
    cancellation = world.cancellation(order.id)
    assert cancellation is not None
    assert cancellation.status == "scheduled"
    assert world.simulator.state.calls(purchase["membership_id"]) == []
    world.settle()
    cancellation = world.cancellation(order.id)
    assert cancellation is not None
    assert cancellation.status == "canceled"
    [call] = world.simulator.state.calls(purchase["membership_id"])
    assert call["method"] == "POST"
    assert membership_status(world, purchase["membership_id"]) == "canceled"
    assert len(world.mail_to(email)) == 1  # nothing sent twice


# 2. Encrypted at rest -------------------------------------------------------------------------


def test_items_and_the_emails_carrying_them_are_encrypted_at_rest(
    world: StockWorld, capfd: pytest.CaptureFixture[str]
) -> None:
    # Log to this test's captured stderr (an earlier in-process test may have pointed the
    # handler at its own, finished capture). INFO: at DEBUG the test's own SMTP sink
    # (aiosmtpd, logger mail.log) echoes every line it receives, the item included.
    configure_logging("INFO", "console")
    world.import_items(*ITEMS[:3])
    buyer = world.pay()
    world.drain()
    assert world.order(buyer["order_id"]).status == "delivered"
    world.runtime.delivery.resend(buyer["order_id"])  # a resent email is sealed as well
    world.drain()

    contents = [row[0] for row in world.raw("SELECT content FROM stock_items")]
    assert len(contents) == 3
    for content in contents:
        assert content.startswith("gAAAAA")  # a Fernet token
        for item in ITEMS:
            assert item not in content
            assert item.split(":")[1] not in content  # not even the password alone
    prints = [row[0] for row in world.raw("SELECT fingerprint FROM stock_items")]
    assert all(item not in p for p in prints for item in ITEMS)

    bodies = world.raw("SELECT text_body, html_body, subject FROM emails")
    assert len(bodies) >= 3  # two customer emails and the admin notice at least
    for row in bodies:
        for value in row:
            for item in ITEMS:
                assert item not in (value or "")
    # The customer's rows are sealed (and they do decrypt to the item); the admin's are not.
    with world.runtime.database.transaction() as session:
        rows = list(session.scalars(select(Email).order_by(Email.id)))
    customer = [r for r in rows if r.to_address == buyer["email"]]
    assert len(customer) == 2
    assert all(r.sealed and r.sent_at is not None for r in customer)
    sealer = Sealer(STOCK_KEY)
    assert ITEMS[0] in sealer.open(customer[0].text_body)
    assert ITEMS[0] in sealer.open(customer[0].html_body or "")
    assert not any(r.sealed for r in rows if r.to_address == ADMIN)

    # …and yet the customer reads the plaintext, twice.
    mails = world.mail_to(buyer["email"])
    assert len(mails) == 2
    assert all(ITEMS[0] in m.text and ITEMS[0] in m.html for m in mails)
    # The admin can read an item on purpose; nothing was ever logged.
    item_id = world.item_ids(ITEMS[0])[ITEMS[0]]
    assert show_item(world.runtime, item_id)[1] == ITEMS[0]
    logged = capfd.readouterr()
    assert "delivered" in logged.out + logged.err  # the logs were captured…
    for item in ITEMS:
        assert item not in logged.out + logged.err  # …and hold no item


# 3. Out of stock, then served in payment order ------------------------------------------------


def test_out_of_stock_orders_wait_then_are_served_in_payment_order(world: StockWorld) -> None:
    start = world.clock.now()
    paid = {"first": start - timedelta(minutes=30), "second": start - timedelta(minutes=20)}
    paid["third"] = start - timedelta(minutes=10)
    buyers = {}
    # They arrive in another order than they paid: the payment time decides, not the arrival.
    for name in ("second", "third", "first"):
        buyers[name] = world.pay(paid_at=paid[name])
        world.drain()
    for buyer in buyers.values():
        order = world.order(buyer["order_id"])
        assert order.status == "delivery_failed"
        assert order.waiting_for_stock == STOCK_POOL
        assert order.delivery_error is not None
        assert world.cancellation(buyer["order_id"]) is None  # paid, nothing delivered: no cancel
    assert world.simulator.state.calls() == []  # not a single Whop call

    # One alert per order; only the first one mailed at once, the others folded (throttled).
    alerts = world.alerts("out_of_stock")
    assert [a.order_id for a in alerts] == [buyers[n]["order_id"] for n in ("second", "third")] + [
        buyers["first"]["order_id"]
    ]
    assert alerts[0].notified_at is not None
    assert [a.notified_at for a in alerts[1:]] == [None, None]
    [mailed] = world.admin_mail("Out of stock")
    assert buyers["second"]["order_id"] in mailed.subject
    assert world.mail_to(buyers["first"]["email"]) == []
    [level] = stock_levels(world.runtime)
    assert (level.pool, level.available, level.waiting) == (STOCK_POOL, 0, 3)

    # Two items for three waiting orders: the two who paid first get them, in payment order.
    report = world.import_items(ITEMS[0], ITEMS[1])
    assert (report.added, report.waiting) == (2, 3)
    world.drain()
    first, second, third = (buyers[n]["order_id"] for n in ("first", "second", "third"))
    assert world.order(first).status == "delivered"
    assert world.order(second).status == "delivered"
    first_item, second_item = world.item_of(first), world.item_of(second)
    assert first_item is not None
    assert second_item is not None
    assert first_item.id < second_item.id  # item ids increase with payment time
    ids = world.item_ids(ITEMS[0], ITEMS[1])
    assert (first_item.id, second_item.id) == (ids[ITEMS[0]], ids[ITEMS[1]])
    assert ITEMS[0] in world.mail_to(buyers["first"]["email"])[0].text
    assert ITEMS[1] in world.mail_to(buyers["second"]["email"])[0].text
    # The third keeps waiting: no item, no email, no cancellation, no new alert.
    assert world.order(third).status == "delivery_failed"
    assert world.order(third).waiting_for_stock == STOCK_POOL
    assert world.item_of(third) is None
    assert world.mail_to(buyers["third"]["email"]) == []
    assert world.cancellation(third) is None
    assert len(world.alerts("out_of_stock")) == 3

    # The delivered ones are cancelled at Whop; the waiting one is left alone.
    world.settle()
    for name in ("first", "second"):
        row = world.cancellation(buyers[name]["order_id"])
        assert row is not None
        assert row.status == "canceled"
        assert membership_status(world, buyers[name]["membership_id"]) == "canceled"
    assert world.simulator.state.calls(buyers["third"]["membership_id"]) == []
    assert membership_status(world, buyers["third"]["membership_id"]) != "canceled"

    # A second import serves the rest.
    assert world.import_items(ITEMS[2]).waiting == 1
    world.drain()
    assert world.order(third).status == "delivered"
    third_item = world.item_of(third)
    assert third_item is not None
    assert third_item.id > second_item.id
    assert ITEMS[2] in world.mail_to(buyers["third"]["email"])[0].text
    world.settle()
    row = world.cancellation(third)
    assert row is not None
    assert row.status == "canceled"
    assert membership_status(world, buyers["third"]["membership_id"]) == "canceled"
    # Every order was served: their out-of-stock alerts are resolved.
    assert all(a.resolved_at is not None for a in world.alerts("out_of_stock"))
    [level] = stock_levels(world.runtime)
    assert (level.available, level.assigned, level.waiting) == (0, 3, 0)


# 4. Fairness ------------------------------------------------------------------------------------


def test_a_new_order_does_not_jump_the_queue_when_stock_arrives(world: StockWorld) -> None:
    start = world.clock.now()
    early = world.pay(paid_at=start - timedelta(minutes=20))
    later = world.pay(paid_at=start - timedelta(minutes=10))
    world.drain()
    assert world.order(early["order_id"]).waiting_for_stock == STOCK_POOL
    assert world.order(later["order_id"]).waiting_for_stock == STOCK_POOL

    # Stock arrives (its serve job is queued, not run yet) and a new order is paid meanwhile.
    world.import_items(*ITEMS[:3])
    newest = world.pay(paid_at=start)
    # The newest order's delivery job runs first, with items available: it must wait its turn.
    world.runtime.jobs.run_here(DELIVER_TASK, newest["order_id"])
    order = world.order(newest["order_id"])
    assert order.status == "delivery_failed"
    assert order.waiting_for_stock == STOCK_POOL
    assert "earlier order(s)" in (order.delivery_error or "")
    assert world.item_of(newest["order_id"]) is None
    assert [i.status for i in world.items()] == ["available"] * 3

    world.drain()
    taken = [world.item_of(b["order_id"]) for b in (early, later, newest)]
    assert all(t is not None for t in taken)
    ids = [t.id for t in taken if t is not None]
    ids_by_item = world.item_ids(*ITEMS[:3])
    assert ids == [ids_by_item[item] for item in ITEMS[:3]]  # in payment order
    for buyer, item in zip((early, later, newest), ITEMS[:3], strict=True):
        assert world.order(buyer["order_id"]).status == "delivered"
        [mail] = world.mail_to(buyer["email"])
        assert item in mail.text
    # Waiting in line behind orders that are being served is not "out of stock".
    assert newest["order_id"] not in {a.order_id for a in world.alerts("out_of_stock")}


# 5. Low-stock alert -----------------------------------------------------------------------------


def test_the_low_stock_alert_is_raised_once_and_rearmed_by_an_import(
    tmp_path: Path,
    clock: FrozenClock,
    simulator: SimulatorServer,
    smtp_sink: SmtpSink,
    database_url: str,
) -> None:
    with stock_world(
        tmp_path, clock, simulator, smtp_sink, database_url, ALERT_THROTTLE=0
    ) as world:

        def sell() -> None:
            buyer = world.pay()
            world.drain()
            assert world.order(buyer["order_id"]).status == "delivered"

        world.import_items(*ITEMS[:4])
        sell()  # 3 left > 2
        assert world.alerts("low_stock") == []
        sell()  # 2 left: at the threshold
        [alert] = world.alerts("low_stock")
        assert alert.dedupe_key == stock.low_stock_key(STOCK_POOL)
        assert alert.subject == f"Low stock: pool {STOCK_POOL} has 2 item(s) left"
        assert [m.subject for m in world.admin_mail("Low stock")] == [alert.subject]
        sell()  # 1 left: still low, not raised again
        assert len(world.alerts("low_stock")) == 1
        assert len(world.admin_mail("Low stock")) == 1

        world.import_items(ITEMS[4])  # 2: not above the threshold, the alert stays open
        [alert] = world.alerts("low_stock")
        assert alert.resolved_at is None
        world.import_items(ITEMS[5], ITEMS[6])  # 4: above it, the alert is resolved
        [alert] = world.alerts("low_stock")
        assert alert.resolved_at is not None
        assert alert.dedupe_key != stock.low_stock_key(STOCK_POOL)

        sell()  # 3 left: fine
        assert len(world.alerts("low_stock")) == 1
        sell()  # 2 left: low again, a new alert
        old, new = world.alerts("low_stock")
        assert old.resolved_at is not None
        assert (new.resolved_at, new.dedupe_key) == (None, stock.low_stock_key(STOCK_POOL))
        assert len(world.admin_mail("Low stock")) == 2
        for mail in world.admin_mail("Low stock"):
            assert all(item not in mail.text for item in ITEMS)


# 6. Refunds, disputes and voided items ----------------------------------------------------------


def test_a_refund_or_dispute_voids_the_item_or_keeps_it_as_the_plan_says(
    tmp_path: Path,
    clock: FrozenClock,
    simulator: SimulatorServer,
    smtp_sink: SmtpSink,
    database_url: str,
) -> None:
    catalog = STOCK_CATALOG + (
        f'\n[plans.{KEEP_STOCK_PLAN}]\nname = "Gift code"\ndelivery = "stock:{STOCK_POOL}"\n'
    )
    with stock_world(tmp_path, clock, simulator, smtp_sink, database_url, catalog=catalog) as world:
        assert world.runtime.catalog.get(KEEP_STOCK_PLAN).on_refund == "keep"  # type: ignore[union-attr]
        world.import_items(*ITEMS[:6])
        refunded, disputed = world.pay(), world.pay()
        kept = world.pay(plan=KEEP_STOCK_PLAN)
        world.drain()
        items = {}
        for buyer in (refunded, disputed, kept):
            assert world.order(buyer["order_id"]).status == "delivered"
            item = world.item_of(buyer["order_id"])
            assert item is not None
            assert item.status == "assigned"
            items[buyer["order_id"]] = item.id

        # on_refund = "void": a pending refund does not void yet (it may fail)…
        response = world.deliver(claim_event("refund", refunded["payment_id"], claim_id="rf_S1"))
        assert response.json() == {"status": "received"}
        item = world.item_of(refunded["order_id"])
        assert item is not None
        assert item.status == "assigned"
        [alert] = world.alerts("order_refunded")
        assert "voided only if the refund succeeds" in alert.text_body
        # …once it succeeds, the item is void and a second alert says to rotate it.
        world.clock.advance(60)
        world.deliver(claim_event("refund", refunded["payment_id"], "succeeded", claim_id="rf_S1"))
        item = world.item_of(refunded["order_id"])
        assert item is not None
        assert (item.status, item.void_reason) == ("void", "refund rf_S1")
        assert item.voided_at == world.clock.now()
        [_, alert] = world.alerts("order_refunded")
        assert alert.order_id == refunded["order_id"]
        assert f"#{items[refunded['order_id']]} ({STOCK_POOL}), voided now" in alert.text_body
        assert "will never be handed out again" in alert.text_body
        assert "Rotate it" in alert.text_body
        # The same update again changes nothing and raises nothing more.
        world.deliver(claim_event("refund", refunded["payment_id"], "succeeded", claim_id="rf_S1"))
        assert len(world.alerts("order_refunded")) == 2
        assert world.order(refunded["order_id"]).status == "refunded"

        # A dispute voids it only once lost; one the merchant wins keeps it.
        world.deliver(claim_event("dispute", disputed["payment_id"], "won", claim_id="dp_S1"))
        item = world.item_of(disputed["order_id"])
        assert item is not None
        assert item.status == "assigned"
        world.deliver(claim_event("dispute", disputed["payment_id"], "lost", claim_id="dp_S1"))
        item = world.item_of(disputed["order_id"])
        assert item is not None
        assert (item.status, item.void_reason) == ("void", "dispute dp_S1")
        [_, alert] = world.alerts("order_disputed")
        assert f"#{items[disputed['order_id']]} ({STOCK_POOL}), voided now" in alert.text_body
        assert "Rotate it" in alert.text_body

        # on_refund = "keep": the customer keeps it, and the alert says how to retire it.
        world.deliver(claim_event("refund", kept["payment_id"], claim_id="rf_S2"))
        item = world.item_of(kept["order_id"])
        assert item is not None
        assert (item.status, item.order_id) == ("assigned", kept["order_id"])
        [_, _, alert] = world.alerts("order_refunded")
        assert alert.order_id == kept["order_id"]
        assert "kept by the customer" in alert.text_body
        assert f"whop-autocancel stock void {items[kept['order_id']]}" in alert.text_body
        assert "will never be handed out again" not in alert.text_body
        for raised in world.alerts():
            assert all(secret not in raised.text_body for secret in ITEMS)

        # The refunded/disputed orders' cancellations are skipped; the items stay void.
        world.settle()
        for buyer in (refunded, disputed):
            row = world.cancellation(buyer["order_id"])
            assert row is not None
            assert row.status == "skipped"
        statuses = {i.id: i.status for i in world.items()}
        assert statuses[items[refunded["order_id"]]] == "void"
        assert statuses[items[disputed["order_id"]]] == "void"


def test_an_order_refunded_while_waiting_for_stock_is_never_served(world: StockWorld) -> None:
    start = world.clock.now()
    refunded = world.pay(paid_at=start - timedelta(minutes=5))
    world.drain()
    assert world.order(refunded["order_id"]).waiting_for_stock == STOCK_POOL
    world.deliver(claim_event("refund", refunded["payment_id"], "succeeded", claim_id="rf_W1"))
    assert world.order(refunded["order_id"]).status == "refunded"

    report = world.import_items(ITEMS[0], ITEMS[1])
    assert report.waiting == 0  # a refunded order is not waiting any more
    assert world.runtime.stuck_sweep.run(force=True).stock_pools == 0
    buyer = world.pay()
    world.drain()
    assert world.item_of(refunded["order_id"]) is None
    assert world.mail_to(refunded["email"]) == []
    item = world.item_of(buyer["order_id"])
    assert item is not None
    assert item.id == world.item_ids(ITEMS[0])[ITEMS[0]]
    world.settle()
    assert world.cancellation(refunded["order_id"]) is None
    assert world.simulator.state.calls(refunded["membership_id"]) == []


def test_a_void_item_is_never_handed_out(world: StockWorld) -> None:
    world.import_items(ITEMS[0], ITEMS[1])
    ids = world.item_ids(ITEMS[0], ITEMS[1])
    result = void_stock(world.runtime, ids[ITEMS[0]], "leaked in a screenshot")
    assert (result.changed, result.was, result.order_id) == (True, "available", None)
    assert void_stock(world.runtime, ids[ITEMS[0]], "again").changed is False

    buyer = world.pay()
    world.drain()
    item = world.item_of(buyer["order_id"])
    assert item is not None
    assert item.id == ids[ITEMS[1]]
    [mail] = world.mail_to(buyer["email"])
    assert ITEMS[1] in mail.text
    assert ITEMS[0] not in mail.text

    # The pool is now empty as far as customers go: the void item stays out of circulation.
    late = world.pay()
    world.drain()
    assert world.order(late["order_id"]).waiting_for_stock == STOCK_POOL
    assert world.item_of(late["order_id"]) is None
    void = {i.id: i for i in world.items()}[ids[ITEMS[0]]]
    assert (void.status, void.order_id, void.void_reason) == (
        "void",
        None,
        "leaked in a screenshot",
    )
    [level] = stock_levels(world.runtime)
    assert (level.available, level.assigned, level.void, level.waiting) == (0, 1, 1, 1)


def test_a_dry_run_reports_what_the_import_then_does_past_one_lookup_batch(
    world: StockWorld,
) -> None:
    """The preview and the import share one duplicate rule, also for files bigger than one
    lookup batch (500 fingerprints a query), and the preview writes nothing."""
    sealer = world.runtime.settings.sealer
    assert sealer is not None
    held = [f"HELD-{n:05d}-KEY" for n in range(700)]
    world.import_items(*held)
    file = items_for([*held[::2], "", *(f"NEW-{n:05d}-KEY" for n in range(800)), held[0]])
    preview = preview_import(world.runtime, STOCK_POOL, file)
    assert len(world.items()) == 700
    with world.runtime.database.transaction() as session:
        report = stock.import_items(session, sealer, STOCK_POOL, file, world.clock.now())
    assert preview.report == report
    assert (report.added, report.already_in_stock, report.blank) == (800, 350, 1)
    assert (report.duplicate_in_file, report.available) == (1, 1500)
    assert preview.available_now == 700
    ids = world.item_ids(held[0], held[2], held[698])
    assert preview.in_stock[:2] == [
        (1, StockedItem(item_id=ids[held[0]], pool=STOCK_POOL, status="available")),
        (2, StockedItem(item_id=ids[held[2]], pool=STOCK_POOL, status="available")),
    ]
    assert preview.in_stock[-1] == (
        350,
        StockedItem(item_id=ids[held[698]], pool=STOCK_POOL, status="available"),
    )
    assert preview.repeats == [(1152, 1)]
    assert [item.position for item in preview.new_items] == [352, 353, 354, 355, 356]
    assert {(item.begins, item.length) for item in preview.new_items} == {("NE", 13)}


def test_voiding_many_items_is_all_or_none_past_one_batch(world: StockWorld) -> None:
    keys = [f"BATCH-{n:05d}-KEY" for n in range(1200)]
    world.import_items(*keys)
    ids = sorted(item.id for item in world.items())
    unknown = ids[-1] + 1

    with pytest.raises(StockError) as refused:
        void_stocks(world.runtime, [*ids, unknown], "batch")
    assert str(refused.value) == (
        f"no stock item #{unknown} (see `whop-autocancel stock list POOL`): nothing was voided"
    )
    assert {item.status for item in world.items()} == {"available"}

    first = void_stocks(world.runtime, ids[:10], "first ten")
    results = void_stocks(world.runtime, [*reversed(ids), ids[0]], "the rest")
    assert [result.item_id for result in results] == list(reversed(ids))  # as given, once
    assert sum(result.changed for result in results) == 1190
    assert all(result.changed for result in first)
    reasons = {item.id: (item.status, item.void_reason) for item in world.items()}
    assert {reasons[item_id] for item_id in ids[:10]} == {("void", "first ten")}
    assert {reasons[item_id] for item_id in ids[10:]} == {("void", "the rest")}
    listed = list_stock(world.runtime, STOCK_POOL, status="void", limit=3)
    assert [row.id for row in listed] == ids[-1:-4:-1]


# 7. Resend ----------------------------------------------------------------------------------------


def test_resend_sends_the_same_item_again_and_refuses_what_it_cannot_send(
    world: StockWorld,
) -> None:
    world.import_items(*ITEMS[:4])
    buyer, other = world.pay(), world.pay()
    nothing = world.pay(plan=NONE_PLAN)
    no_email = world.pay(email=None)
    world.drain()
    assert world.order(buyer["order_id"]).status == "delivered"
    item = world.item_of(buyer["order_id"])
    assert item is not None

    resent = world.runtime.delivery.resend(buyer["order_id"])
    assert resent.to == buyer["email"]
    assert f"stock item #{item.id}" in resent.summary
    world.drain()
    first, second = world.mail_to(buyer["email"])
    assert ITEMS[0] in first.text
    assert ITEMS[0] in second.text
    assert ITEMS[0] in second.html
    assert world.item_of(buyer["order_id"]).id == item.id  # type: ignore[union-attr]
    assert sum(i.status == "assigned" for i in world.items()) == 2  # no new item taken

    with world.runtime.database.transaction() as session:
        emails_before = len(list(session.scalars(select(Email))))
    with pytest.raises(ResendError, match="is delivery_failed, not delivered"):
        world.runtime.delivery.resend(no_email["order_id"])
    with pytest.raises(ResendError, match=r"no order ord_missing"):
        world.runtime.delivery.resend("ord_missing")
    with pytest.raises(ResendError, match=r"delivers nothing \(delivery = none\)"):
        world.runtime.delivery.resend(nothing["order_id"])
    other_item = world.item_of(other["order_id"])
    assert other_item is not None
    void_stock(world.runtime, other_item.id, "customer shared it")
    with pytest.raises(ResendError, match=rf"item #{other_item.id} .* was voided"):
        world.runtime.delivery.resend(other["order_id"])
    with world.runtime.database.transaction() as session:
        assert len(list(session.scalars(select(Email)))) == emails_before
    world.drain()
    assert len(world.mail_to(other["email"])) == 1


# 8. The stuck-work sweep serves a pool whose serve job was lost ----------------------------------


def test_the_stuck_sweep_serves_waiting_orders_when_the_serve_job_was_lost(
    world: StockWorld,
) -> None:
    start = world.clock.now()
    early = world.pay(paid_at=start - timedelta(minutes=2))
    late = world.pay(paid_at=start - timedelta(minutes=1))
    world.drain()
    assert world.runtime.stuck_sweep.run(force=True).stock_pools == 0  # waiting, but no stock
    world.drain()

    # Items added without the serve job (as if it was lost with the queue).
    sealer = world.runtime.settings.sealer
    assert sealer is not None
    with world.runtime.database.transaction() as session:
        stock.import_items(session, sealer, STOCK_POOL, items_for(ITEMS[:2]), world.clock.now())
    assert world.runtime.jobs.pending() == 0
    assert world.drain() == 0
    assert world.order(early["order_id"]).status == "delivery_failed"

    assert world.runtime.stuck_sweep.run(dry_run=True).stock_pools == 1
    report = world.runtime.stuck_sweep.run(force=True)
    assert report.stock_pools == 1
    world.drain()
    early_item, late_item = world.item_of(early["order_id"]), world.item_of(late["order_id"])
    assert early_item is not None
    assert late_item is not None
    assert early_item.id < late_item.id
    assert world.order(early["order_id"]).status == "delivered"
    assert world.order(late["order_id"]).status == "delivered"
    assert ITEMS[0] in world.mail_to(early["email"])[0].text
    assert world.runtime.stuck_sweep.run(force=True).stock_pools == 0  # nothing left to serve
    world.settle()
    for buyer in (early, late):
        assert membership_status(world, buyer["membership_id"]) == "canceled"


# 9. The encryption key --------------------------------------------------------------------------


def test_the_empty_pools_are_the_listed_ones_with_no_item_to_hand_out(
    tmp_path: Path, database_url: str
) -> None:
    """What `serve` warns of at start and `check` fails on: a pool a listed plan sells from
    with nothing available (void items do not count); a pool no plan lists is never one."""
    (tmp_path / "catalog.toml").write_text(
        STOCK_CATALOG
        + '[plans.plan_Codes1]\nname = "Gift code"\ndelivery = "stock:codes"\n\n'
        + '[plans.plan_Vouchers1]\nname = "Voucher"\ndelivery = "stock:vouchers"\n'
    )
    runtime = make_runtime(make_settings(tmp_path, DATABASE_URL=database_url))
    try:
        assert empty_listed_pools(runtime) == ["codes", STOCK_POOL, "vouchers"]
        import_stock(runtime, STOCK_POOL, items_for(ITEMS[:2]))
        import_stock(runtime, "retired", items_for(ITEMS[2:3]), any_pool=True)
        import_stock(runtime, "vouchers", items_for(ITEMS[3:4]))
        [voucher] = [level for level in stock_levels(runtime) if level.pool == "vouchers"]
        assert voucher.available == 1
        with runtime.database.transaction() as session:
            voucher_id = session.scalars(
                select(StockItem.id).where(StockItem.pool == "vouchers")
            ).one()
        void_stock(runtime, voucher_id, "printed on the wrong card")
        assert empty_listed_pools(runtime) == ["codes", "vouchers"]
    finally:
        runtime.close()


def test_a_stock_catalog_without_an_encryption_key_is_refused(tmp_path: Path) -> None:
    (tmp_path / "catalog.toml").write_text(STOCK_CATALOG)
    settings = make_settings(tmp_path, STOCK_ENCRYPTION_KEY=None)
    assert settings.STOCK_ENCRYPTION_KEY is None
    with pytest.raises(ConfigurationError) as raised:
        build_runtime(settings)
    message = str(raised.value)
    assert "STOCK_ENCRYPTION_KEY is not set" in message
    assert "whop-autocancel stock keygen" in message
    assert STOCK_PLAN in message
    assert not (tmp_path / "service.db").exists()  # refused before touching anything


def test_a_catalog_without_stock_needs_no_key(tmp_path: Path) -> None:
    (tmp_path / "catalog.toml").write_text(CATALOG)
    runtime = make_runtime(make_settings(tmp_path, STOCK_ENCRYPTION_KEY=None))
    try:
        assert runtime.settings.sealer is None
    finally:
        runtime.close()


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("not-a-fernet-key", "key 1 is not a Fernet key"),
        (STOCK_KEY[:-4], "key 1 is not a Fernet key"),
        (f"{STOCK_KEY} also-not-a-key", "key 2 is not a Fernet key"),
    ],
)
def test_an_invalid_encryption_key_is_refused_by_load_settings(
    tmp_path: Path, key: str, expected: str
) -> None:
    with pytest.raises(ConfigurationError) as raised:
        make_settings(tmp_path, STOCK_ENCRYPTION_KEY=key)
    message = str(raised.value)
    assert message.startswith("STOCK_ENCRYPTION_KEY: ")
    assert expected in message
    assert "whop-autocancel stock keygen" in message
    assert key.split()[-1] not in message  # the bad key is not echoed


# 10. EMAIL_TEMPLATES_DIR ------------------------------------------------------------------------


def test_email_templates_dir_overrides_the_stock_email(
    tmp_path: Path,
    clock: FrozenClock,
    simulator: SimulatorServer,
    smtp_sink: SmtpSink,
    database_url: str,
) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "delivery_stock.txt").write_text(
        "CUSTOM TEXT for {{ order_id }} ({{ plan_name }}): [[{{ item }}]]\n"
    )
    (templates / "delivery_stock.html").write_text(
        "<p>CUSTOM HTML <b>{{ item }}</b> for {{ email }}</p>\n"
    )
    with stock_world(
        tmp_path, clock, simulator, smtp_sink, database_url, EMAIL_TEMPLATES_DIR=str(templates)
    ) as world:
        world.import_items(*ITEMS[:3])
        buyer = world.pay()
        message_buyer = world.pay(plan=MESSAGE_PLAN)
        world.drain()
        [mail] = world.mail_to(buyer["email"])
        assert mail.text.strip() == (
            f"CUSTOM TEXT for {buyer['order_id']} (Game account): [[{ITEMS[0]}]]"
        )
        assert f"<p>CUSTOM HTML <b>{ITEMS[0]}</b> for {buyer['email']}</p>" in mail.html
        assert "Keep it safe" not in mail.text  # not the package's template
        # Templates not overridden still come from the package.
        [message] = world.mail_to(message_buyer["email"])
        assert f"Here is your pack, order {message_buyer['order_id']}." in message.text


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("delivery_stock.txt", "{% if item %}no end\n", "delivery_stock.txt:1"),
        ("delivery_stock.html", "<p>{{ itme }}</p>\n", "delivery_stock.html: 'itme' is undefined"),
        ("delivery_message.txt", "{{ message | nosuchfilter }}\n", "delivery_message.txt"),
    ],
)
def test_a_broken_template_override_stops_start_up(
    tmp_path: Path, name: str, text: str, expected: str
) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / name).write_text(text)
    (tmp_path / "catalog.toml").write_text(STOCK_CATALOG)
    settings = make_settings(tmp_path, EMAIL_TEMPLATES_DIR=str(templates))
    with pytest.raises(ConfigurationError) as raised:
        build_runtime(settings)
    message = str(raised.value)
    assert message.startswith("EMAIL_TEMPLATES_DIR: ")
    assert expected in message


def test_email_templates_dir_must_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"EMAIL_TEMPLATES_DIR: .* is not a directory"):
        make_settings(tmp_path, EMAIL_TEMPLATES_DIR=str(tmp_path / "missing"))


# 11. No customer email --------------------------------------------------------------------------


def test_a_stock_order_without_a_customer_email_fails_and_takes_no_item(
    world: StockWorld,
) -> None:
    world.import_items(*ITEMS[:4])
    anonymous = world.pay(email=None)
    world.drain()
    order = world.order(anonymous["order_id"])
    assert order.email is None
    assert order.status == "delivery_failed"
    assert order.waiting_for_stock is None  # not waiting for stock: nothing would come of it
    assert "no customer email" in (order.delivery_error or "")
    assert [i.status for i in world.items()] == ["available"] * 4  # no item taken
    assert world.item_of(anonymous["order_id"]) is None
    [alert] = world.alerts()
    assert (alert.kind, alert.order_id) == ("delivery_failed", anonymous["order_id"])
    assert len(world.admin_mail(f"Order {anonymous['order_id']} could not be delivered")) == 1
    assert world.cancellation(anonymous["order_id"]) is None
    assert world.runtime.stuck_sweep.run(force=True).stock_pools == 0  # not served later either
    world.settle()
    assert world.simulator.state.calls() == []

    # The next customer gets the first item: none was lost to the order without an email.
    buyer = world.pay()
    world.drain()
    item = world.item_of(buyer["order_id"])
    assert item is not None
    assert item.id == world.item_ids(ITEMS[0])[ITEMS[0]]
