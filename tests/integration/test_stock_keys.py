"""Stock under a wrong, rotated or lost key, and the cases the first review found: a delivery
that meets an item it cannot decrypt waits (item kept, one alert) until the right key is back;
`stock rekey` moves everything to the new key; orders that waited only for their turn are
alerted when the pool runs dry again; an unset optional value never prints as "None"."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import SecretStr

from support.harness import (
    STOCK_CATALOG,
    STOCK_KEY,
    STOCK_POOL,
    drain,
    make_runtime,
    make_settings,
)
from support.stock import StockWorld, stock_world
from whop_autocancel.admin.stock import import_stock, rekey_stock, show_item
from whop_autocancel.clock import FrozenClock
from whop_autocancel.delivery import stock
from whop_autocancel.delivery.service import unreadable_key
from whop_autocancel.delivery.stock import items_for
from whop_autocancel.mail.sink import SmtpSink
from whop_autocancel.sealing import Sealer, SealError, generate_key
from whop_autocancel.simulator import SimulatorServer

OTHER_KEY = generate_key()


def import_with(world: StockWorld, key: str, *items: str) -> None:
    """Items imported by a process that had another key (a misconfigured machine), or without
    the import command's `stock.serve` job."""
    with world.runtime.database.transaction() as session:
        stock.import_items(session, Sealer(key), STOCK_POOL, items_for(items), world.clock.now())


def with_key(world: StockWorld, keys: str) -> None:
    """The settings of a restarted process with STOCK_ENCRYPTION_KEY = `keys`."""
    world.runtime.settings = world.runtime.settings.model_copy(
        update={"STOCK_ENCRYPTION_KEY": SecretStr(keys)}
    )
    world.runtime.sealer = world.runtime.settings.sealer


def test_an_item_the_key_cannot_open_waits_with_one_alert_until_the_key_is_back(
    world: StockWorld, tmp_path: Path
) -> None:
    import_with(world, OTHER_KEY, "ACCOUNT-ONE", "ACCOUNT-TWO")
    start = world.clock.now()
    first = world.pay(paid_at=start - timedelta(minutes=2))
    second = world.pay(paid_at=start - timedelta(minutes=1))
    world.drain()
    for buyer in (first, second):
        order = world.order(buyer["order_id"])
        assert (order.status, order.waiting_for_stock) == ("delivery_failed", STOCK_POOL)
        assert world.item_of(buyer["order_id"]) is None  # the assignment was rolled back
    assert "cannot be read" in (world.order(first["order_id"]).delivery_error or "")
    assert [i.status for i in world.items()] == ["available", "available"]
    [alert] = world.alerts("delivery_failed")
    assert alert.dedupe_key == unreadable_key(STOCK_POOL)
    assert "cannot be decrypted" in alert.subject
    assert "STOCK_ENCRYPTION_KEY" in alert.text_body
    assert world.admin_mail("Stock of pool keys cannot be decrypted")
    assert world.alerts("out_of_stock") == []  # the pool is not empty: the key is wrong
    assert world.cancellation(first["order_id"]) is None

    # The operator puts the other key back (after the current one) and restarts.
    fixed = make_runtime(
        make_settings(
            tmp_path,
            DATABASE_URL=world.runtime.settings.DATABASE_URL,
            SMTP_URL=world.runtime.settings.SMTP_URL.get_secret_value(),
            WHOP_API_URL=world.runtime.settings.WHOP_API_URL,
            STOCK_ENCRYPTION_KEY=f"{STOCK_KEY} {OTHER_KEY}",
        ),
        world.clock,
    )
    try:
        assert fixed.stuck_sweep.run(force=True).stock_pools == 1  # enqueues `stock.serve`
        drain(fixed)  # delivered, emails sent
        world.clock.advance(10)  # past CANCEL_DELAY
        drain(fixed, include_scheduled=True)  # cancelled
    finally:
        fixed.close()
    assert [world.order(b["order_id"]).status for b in (first, second)] == ["delivered"] * 2
    [alert] = world.alerts("delivery_failed")
    assert alert.resolved_at is not None
    [mail] = world.mail_to(first["email"])
    assert "ACCOUNT-ONE" in mail.text  # in payment order
    assert world.simulator.state.membership(first["membership_id"])["status"] == "canceled"


def test_rekey_moves_items_and_sealed_emails_to_the_first_key(world: StockWorld) -> None:
    import_with(world, STOCK_KEY, "OLD-1", "OLD-2")
    buyer = world.pay()
    world.drain()  # OLD-1 delivered; its email row is sealed under STOCK_KEY
    new_key = generate_key()
    with_key(world, f"{new_key} {STOCK_KEY}")  # rotated: the new key first
    report = rekey_stock(world.runtime)
    assert (report.items, report.emails) == (2, 1)
    only_new = Sealer(new_key)
    for (content,) in world.raw("SELECT content FROM stock_items"):
        assert only_new.open(content).startswith("OLD-")
        with pytest.raises(SealError):
            Sealer(STOCK_KEY).open(content)
    sealed = [row for row in world.raw("SELECT text_body, html_body, sealed FROM emails") if row[2]]
    assert len(sealed) == 1
    assert "OLD-1" in only_new.open(sealed[0][0])
    assert "OLD-1" in only_new.open(sealed[0][1])
    with_key(world, new_key)  # the old key removed: duplicates are still recognised
    again = import_stock(world.runtime, STOCK_POOL, items_for(["OLD-1", "OLD-2", "NEW-3"]))
    assert (again.added, again.already_in_stock) == (1, 2)
    item, content = show_item(world.runtime, buyer["order_id"])
    assert (content, item.order_id) == ("OLD-1", buyer["order_id"])


def test_orders_that_waited_for_their_turn_are_alerted_when_the_pool_runs_dry(
    world: StockWorld,
) -> None:
    start = world.clock.now()
    early = world.pay(paid_at=start - timedelta(minutes=10))
    middle = world.pay(paid_at=start - timedelta(minutes=5))
    world.drain()  # both wait: the pool is empty
    assert len(world.alerts("out_of_stock")) == 2
    # One item arrives (no serve job yet); a new order's own delivery job runs first: it waits
    # its turn (no alert: stock was there) and asks for a serve job, which serves `early` and
    # finds the pool empty again: `late` now waits for stock, and the admin hears of it.
    import_with(world, STOCK_KEY, "ONLY")
    late = world.pay()
    world.drain()
    assert world.order(early["order_id"]).status == "delivered"
    assert world.order(middle["order_id"]).status == "delivery_failed"
    assert "out of stock" in (world.order(late["order_id"]).delivery_error or "")
    alerted = {alert.order_id for alert in world.alerts("out_of_stock")}
    assert alerted == {early["order_id"], middle["order_id"], late["order_id"]}


def test_an_unset_optional_value_never_prints_as_none(
    tmp_path: Path,
    clock: FrozenClock,
    simulator: SimulatorServer,
    smtp_sink: SmtpSink,
    database_url: str,
) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "delivery_stock.txt").write_text(
        "{{ item }}|link={{ link }}|support={{ support_email }}\n"
    )
    with stock_world(
        tmp_path, clock, simulator, smtp_sink, database_url, EMAIL_TEMPLATES_DIR=str(templates)
    ) as world:
        world.import_items("THE-ITEM")
        buyer = world.pay()
        world.drain()
        [mail] = world.mail_to(buyer["email"])
        assert mail.text.strip() == "THE-ITEM|link=|support="


def test_orders_follow_their_plan_to_a_renamed_pool(world: StockWorld, tmp_path: Path) -> None:
    waiting = world.pay()
    world.drain()
    assert world.order(waiting["order_id"]).waiting_for_stock == STOCK_POOL
    renamed = tmp_path / "renamed.toml"  # the merchant renamed the pool while it was empty
    renamed.write_text(STOCK_CATALOG.replace(f"stock:{STOCK_POOL}", "stock:accounts"))
    restarted = make_runtime(
        make_settings(
            tmp_path,
            DATABASE_URL=world.runtime.settings.DATABASE_URL,
            SMTP_URL=world.runtime.settings.SMTP_URL.get_secret_value(),
            CATALOG_PATH=str(renamed),
        ),
        world.clock,
    )
    try:
        report = import_stock(restarted, "accounts", items_for(["RENAMED-1"]))
        assert report.waiting == 0  # still filed under the old name until the sweep
        assert restarted.stuck_sweep.run(force=True).stock_pools == 1
        assert world.order(waiting["order_id"]).waiting_for_stock == "accounts"
        drain(restarted)
    finally:
        restarted.close()
    assert world.order(waiting["order_id"]).status == "delivered"
    [mail] = world.mail_to(waiting["email"])
    assert "RENAMED-1" in mail.text
