"""Chaos with stock, on SQLite, PostgreSQL (+ Redis queue) and MariaDB (+ PostgreSQL queue):
real web and worker processes sell 60 items from a pool of 40 while
workers are killed with SIGKILL; then the merchant imports 20 more with the CLI while the
service runs. Every buyer gets exactly one item, no item goes to two buyers, the 20 who waited
are served in payment order, and every membership is cancelled once, after its delivery."""

from __future__ import annotations

import random
import re
import uuid
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select

from support import backends
from support.chaos import RESENDS_PER_KILL, Cluster, report, wait
from support.harness import STOCK_CATALOG, STOCK_PLAN, STOCK_POOL, run_cli
from whop_autocancel.delivery.models import StockItem
from whop_autocancel.orders.models import Order

pytestmark = pytest.mark.e2e

KEY = re.compile(r"KEY-\d{4}-[a-z]{6}")


def keys(start: int, count: int) -> list[str]:
    rng = random.Random(start)
    return [
        f"KEY-{n:04d}-{''.join(rng.choices('abcdefghij', k=6))}"
        for n in range(start, start + count)
    ]


@pytest.mark.parametrize(
    ("database_kind", "queue_kind"),
    [("sqlite", "sqlite"), ("postgresql", "redis"), ("mariadb", "postgresql")],
)
def test_stock_sells_out_under_kill_9_and_refills_while_running(
    tmp_path: Path, server_databases: dict[str, str], database_kind: str, queue_kind: str
) -> None:
    (tmp_path / "catalog.toml").write_text(STOCK_CATALOG)
    first, second = keys(0, 40), keys(40, 20)
    rng = random.Random(7)
    backend: dict[str, str] = {}
    if database_kind != "sqlite":  # real processes on the server backends too
        if database_kind not in server_databases:
            server_databases[database_kind] = backends.create_database(database_kind)
        backends.empty_tables(server_databases[database_kind])
        backend = {
            "DATABASE_URL": server_databases[database_kind],
            "QUEUE_URL": backends.queue_url(queue_kind, tmp_path),
            "QUEUE_NAME": f"{backends.RUN_ID}-{uuid.uuid4().hex[:8]}",
        }
    with Cluster(tmp_path, web=2, workers=3, **backend) as cluster:
        cluster.state.create_plan(STOCK_PLAN)
        stock_file = tmp_path / "keys-1.txt"
        stock_file.write_text("\n".join(first) + "\n")
        imported = run_cli(
            tmp_path, "stock", "import", STOCK_POOL, str(stock_file), env=cluster.env
        )
        assert imported.returncode == 0, imported.stderr
        for _ in range(3):
            cluster.buy(20, plan=STOCK_PLAN)
            wait(lambda: cluster.count(Order) >= len(cluster.purchases) // 2, 60, "orders")
            cluster.kill_worker(rng.randrange(len(cluster.workers)))
            cluster.start_worker()

        def sold_out() -> bool:
            return (
                cluster.count(Order, Order.status == "delivered") == 40
                and cluster.count(Order, Order.waiting_for_stock == STOCK_POOL) == 20
            )

        wait(sold_out, 120, "40 orders delivered and 20 waiting for stock")
        assert cluster.count_status("canceled") <= 40  # nobody waiting was cancelled
        waiting_memberships = {
            o.whop_membership_id for o in _orders(cluster) if o.waiting_for_stock == STOCK_POOL
        }
        refill = tmp_path / "keys-2.txt"
        refill.write_text("\n".join(second) + "\n")
        imported = run_cli(tmp_path, "stock", "import", STOCK_POOL, str(refill), env=cluster.env)
        assert imported.returncode == 0, imported.stderr
        assert "20 order(s) were waiting for this pool" in imported.stdout
        wait(lambda: cluster.settled(60), 180, "every purchase delivered, cancelled, emailed")

        orders = _orders(cluster)
        with cluster._db().transaction() as session:
            items = list(session.scalars(select(StockItem).order_by(StockItem.id)))
            session.expunge_all()
        buyers = {p["email"] for p in cluster.purchases}
        owners: dict[str, set[str]] = {}  # key → the buyers it reached
        keys_of: dict[str, set[str]] = {}  # buyer → the keys they received
        for message in cluster.sink.messages:
            found = set(KEY.findall(message.text))
            for recipient in message.recipients:
                if recipient in buyers:
                    keys_of.setdefault(recipient, set()).update(found)
                    for key in found:
                        owners.setdefault(key, set()).add(recipient)
                else:
                    assert not found, "an item leaked into an admin email"
        by_order = {item.order_id: item for item in items}
        # Payment order as the service defines it: (paid_at, id), compared by the database
        # (Whop's times are in milliseconds, so ties happen; MariaDB compares ids ignoring case).
        late = [o for o in _orders(cluster) if by_order[o.id].id > 40]
        cancel_calls = cluster.fresh_cancels()

        assert Counter(o.status for o in orders) == {"delivered": 60}
        assert [item.status for item in items] == ["assigned"] * 60
        assert len({item.order_id for item in items}) == 60  # one item per order
        assert set(owners) == set(first) | set(second)  # every key went out…
        assert {len(reached) for reached in owners.values()} == {1}  # …to one buyer
        assert len(keys_of) == 60
        assert {len(received) for received in keys_of.values()} == {1}  # one key per buyer
        # One delivery email row per buyer; SMTP is at least once: a worker killed after the
        # server took a batch's messages but before their `sent_at` was written sends those
        # same rows again (at most the batches in flight).
        deliveries = [e for e in cluster.emails() if e.kind == "delivery"]
        assert Counter(e.to_address for e in deliveries) == Counter(dict.fromkeys(buyers, 1))
        outbox_ids = cluster.outbox_ids()
        assert all(len(outbox_ids[buyer]) == 1 for buyer in buyers)
        resent = sum(count - 1 for count in cluster.delivery_counts().elements())
        assert resent <= cluster.kills * RESENDS_PER_KILL
        assert [by_order[o.id].id for o in late] == sorted(by_order[o.id].id for o in late)
        assert {o.whop_membership_id for o in late} == waiting_memberships
        assert cluster.canceled_at_whop() == 60
        assert set(cancel_calls.values()) == {1}
        report(
            f"stock on {database_kind} + {queue_kind} queue: 60 sold from 40 + 20 imported "
            "while running, 3 workers killed",
            {
                "orders delivered": Counter(o.status for o in orders)["delivered"],
                "distinct items assigned": len({item.id for item in items}),
                "items that reached two buyers": sum(1 for r in owners.values() if len(r) > 1),
                "buyers with exactly one item": sum(1 for k in keys_of.values() if len(k) == 1),
                "same email re-sent (kill after SMTP)": resent,
                "waited for stock, served in payment order": len(late),
                "canceled at Whop": cluster.canceled_at_whop(),
                "workers killed": cluster.kills,
                "out_of_stock alerts": len(cluster.alerts("out_of_stock")),
                "low_stock alerts": len(cluster.alerts("low_stock")),
            },
        )


def _orders(cluster: Cluster) -> list[Order]:
    """Every order, in payment order."""
    with cluster._db().transaction() as session:
        rows = list(session.scalars(select(Order).order_by(Order.paid_at, Order.id)))
        session.expunge_all()
    return rows
