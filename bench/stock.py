"""What exactly-once stock assignment costs: the same number of deliveries of a stock plan and
of a message plan, run by the same worker threads on the same database, side by side, on
SQLite, PostgreSQL and MariaDB. The stock run sells a pool of ITEMS to ORDERS + 20 % buyers, so
the last ones race for the last items and wait for stock.

    .venv/bin/python bench/stock.py        # needs the local PostgreSQL and MariaDB

BENCH_ORDERS (default 1000), BENCH_THREADS (default 16), BENCH_ONLY=sqlite|postgresql|mariadb.
Prints per database: deliveries per second for each plan, their ratio, and the invariants (every
item once, no order with two, the rest waiting). Timing lives here, never in the test suite.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from sqlalchemy import select

from support import backends
from support.harness import (
    MESSAGE_PLAN,
    STOCK_CATALOG,
    STOCK_PLAN,
    STOCK_POOL,
    make_runtime,
    make_settings,
)
from support.stock import paid_orders
from whop_autocancel.admin.stock import import_stock
from whop_autocancel.delivery.models import StockItem
from whop_autocancel.delivery.stock import items_for
from whop_autocancel.logs import configure_logging
from whop_autocancel.orders.models import Order
from whop_autocancel.orders.service import DELIVER_TASK
from whop_autocancel.runtime import Runtime


def deliver_all(runtime: Runtime, order_ids: list[str], threads: int) -> float:
    """Seconds for `threads` workers to run the delivery job of every order."""
    pending = list(order_ids)
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if not pending:
                    return
                order_id = pending.pop()
            runtime.jobs.run_here(DELIVER_TASK, order_id)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return time.perf_counter() - started


def run(kind: str, orders: int, threads: int) -> tuple[float, float, bool]:
    folder = Path(tempfile.mkdtemp(prefix="wa-bench-stock-"))
    (folder / "catalog.toml").write_text(STOCK_CATALOG)
    url = (
        f"sqlite:///{folder / 'service.db'}" if kind == "sqlite" else backends.create_database(kind)
    )
    cleanup: Callable[[], None] = (
        (lambda: None) if kind == "sqlite" else (lambda: backends.drop_database(kind, url))
    )
    try:
        runtime = make_runtime(make_settings(folder, DATABASE_URL=url, ALERT_THROTTLE=3600))
        try:
            buyers = orders + orders // 5
            import_stock(runtime, STOCK_POOL, items_for(f"KEY-{n:06d}" for n in range(orders)))
            now = datetime.now(UTC)
            stock_ids = paid_orders(runtime, STOCK_PLAN, buyers, "s", now)
            message_ids = paid_orders(runtime, MESSAGE_PLAN, buyers, "m", now)
            message_seconds = deliver_all(runtime, message_ids, threads)
            stock_seconds = deliver_all(runtime, stock_ids, threads)
            with runtime.database.transaction() as session:
                items = list(session.scalars(select(StockItem)))
                statuses = Counter(
                    session.scalars(select(Order.status).where(Order.plan_id == STOCK_PLAN))
                )
        finally:
            runtime.close()
    finally:
        cleanup()
    holders = Counter(item.order_id for item in items if item.order_id)
    ok = (
        len(holders) == orders
        and max(holders.values()) == 1
        and statuses == {"delivered": orders, "delivery_failed": buyers - orders}
    )
    print(
        f"\n== {kind}: {buyers} buyers of {orders} items, {buyers} message orders, "
        f"{threads} threads\n"
        f"message deliveries/s {buyers / message_seconds:8.1f}\n"
        f"stock deliveries/s   {buyers / stock_seconds:8.1f}\n"
        f"stock : message time {stock_seconds / message_seconds:8.2f}\n"
        f"items assigned {len(holders)}, items assigned twice 0 = "
        f"{max(holders.values()) == 1}, delivered {statuses['delivered']}, waiting for stock "
        f"{statuses['delivery_failed']} — {'OK' if ok else 'FAILED'}"
    )
    return message_seconds, stock_seconds, ok


def main() -> int:
    configure_logging("ERROR", "console")  # the waiting-for-stock warnings are expected
    orders = int(os.environ.get("BENCH_ORDERS", "1000"))
    threads = int(os.environ.get("BENCH_THREADS", "16"))
    only = os.environ.get("BENCH_ONLY")
    kinds = [k for k in ("sqlite", "postgresql", "mariadb") if only in (None, k)]
    results = [run(kind, orders, threads) for kind in kinds]
    return 0 if all(ok for _, _, ok in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
