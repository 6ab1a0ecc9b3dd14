"""Exactly-once stock assignment under concurrency, on SQLite, PostgreSQL and MariaDB: 60
deliveries at once against a pool of 40 items. Each delivery runs as the worker runs it (the
registered `delivery.deliver` task, with its deadlock retries), in its own thread, with its own
connection and transaction, all released together by a barrier."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

from sqlalchemy import func, select

from support.harness import STOCK_CATALOG, STOCK_PLAN, STOCK_POOL, make_runtime, make_settings
from support.reporting import show
from support.stock import paid_orders
from whop_autocancel.admin.stock import import_stock
from whop_autocancel.alerts.models import Alert
from whop_autocancel.cancellation.models import Cancellation
from whop_autocancel.clock import FrozenClock
from whop_autocancel.db.engine import CONFLICTS
from whop_autocancel.delivery.models import StockItem, StockStatus
from whop_autocancel.delivery.stock import items_for
from whop_autocancel.mail.models import Email
from whop_autocancel.orders.models import Order, OrderStatus
from whop_autocancel.orders.service import DELIVER_TASK

ORDERS = 60
ITEMS = 40


def test_sixty_concurrent_deliveries_share_forty_items_exactly_once(
    tmp_path: Path, clock: FrozenClock, database_url: str
) -> None:
    (tmp_path / "catalog.toml").write_text(STOCK_CATALOG)
    runtime = make_runtime(
        make_settings(tmp_path, DATABASE_URL=database_url, ALERT_THROTTLE=3600), clock
    )
    try:
        keys = [f"KEY-{n:04d}-{'x' * 8}" for n in range(ITEMS)]
        report = import_stock(runtime, STOCK_POOL, items_for(keys))
        assert (report.added, report.available) == (ITEMS, ITEMS)
        order_ids = paid_orders(runtime, STOCK_PLAN, ORDERS, "race", clock.now())
        conflicts_before = CONFLICTS.count
        barrier = threading.Barrier(ORDERS)
        errors: list[BaseException] = []

        def deliver(order_id: str) -> None:
            try:
                barrier.wait(timeout=60)
                runtime.jobs.run_here(DELIVER_TASK, order_id)
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=deliver, args=(o,)) for o in order_ids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=180)
        assert not any(thread.is_alive() for thread in threads)
        assert errors == []

        with runtime.database.transaction() as session:
            statuses = Counter(session.scalars(select(Order.status)))
            items = list(session.scalars(select(StockItem)))
            delivered = set(session.scalars(select(Order.id).where(Order.status == "delivered")))
            waiting = set(
                session.scalars(select(Order.id).where(Order.waiting_for_stock == STOCK_POOL))
            )
            customer_emails = Counter(
                session.scalars(select(Email.order_id).where(Email.kind == "delivery"))
            )
            cancellations = set(session.scalars(select(Cancellation.order_id)))
            out_of_stock_alerts = session.scalar(
                select(func.count()).select_from(Alert).where(Alert.kind == "out_of_stock")
            )
        assigned = [item for item in items if item.status == StockStatus.ASSIGNED.value]
        holders = Counter(item.order_id for item in assigned)

        assert statuses == {
            OrderStatus.DELIVERED.value: ITEMS,
            OrderStatus.DELIVERY_FAILED.value: ORDERS - ITEMS,
        }
        assert len(assigned) == ITEMS  # every item handed out…
        assert len({item.id for item in assigned}) == ITEMS  # …each once
        assert max(holders.values()) == 1  # no order holds two items
        assert set(holders) == delivered  # exactly the delivered orders hold one
        assert waiting == set(order_ids) - delivered  # the rest wait for stock
        assert set(customer_emails) == delivered
        assert max(customer_emails.values()) == 1
        assert cancellations == delivered  # only delivered orders get cancelled
        assert out_of_stock_alerts == ORDERS - ITEMS
        retried = CONFLICTS.count - conflicts_before
        backend = {"mysql": "mariadb"}.get(runtime.database.backend, runtime.database.backend)
        show(
            f"\n== stock race on {backend}: {ORDERS} concurrent deliveries, "
            f"{ITEMS} items ==\n"
            f"delivered {statuses['delivered']}, delivery_failed (waiting for stock) "
            f"{statuses['delivery_failed']}, distinct items assigned {len(holders)}, items "
            f"assigned twice 0, orders with two items 0, customer emails {customer_emails.total()}"
            f", cancellations {len(cancellations)}, deadlocks retried {retried}"
        )
    finally:
        runtime.close()
