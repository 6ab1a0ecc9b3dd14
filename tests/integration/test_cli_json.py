"""`--json` on every read command (issue 11, item 3), run as real processes through a pipe:
a listing prints one JSON object per line and nothing else on stdout; any other read command
prints one JSON document. Each field is checked against the rows the test made (on SQLite,
PostgreSQL and MariaDB for the database listings), and every time is ISO 8601 in UTC with its
zone. `alerts --json` and `emails --json` are in their commands' own test files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from support.cli_shop import BROKEN_EVENT, Shop, cli_shop
from support.harness import MESSAGE_PLAN, STOCK_POOL, UNLISTED_PLAN, make_runtime, make_settings
from support.terminal import Run
from whop_autocancel.db.engine import Database
from whop_autocancel.db.install import watching_since
from whop_autocancel.delivery.models import StockItem
from whop_autocancel.mail.sink import SmtpSink
from whop_autocancel.simulator import SimulatorServer


def json_lines(run: Run) -> list[dict[str, Any]]:
    """Every line of stdout is one JSON object (an empty listing: no line)."""
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert all(isinstance(row, dict) for row in rows)
    return rows


def json_document(run: Run, returncode: int = 0) -> dict[str, Any]:
    assert run.returncode == returncode, run.stdout + run.stderr
    document = json.loads(run.stdout)
    assert isinstance(document, dict)
    return document


def time_of(moment: datetime | None) -> str | None:
    """How the JSON writes a stored time: UTC, to the second, with its zone."""
    return None if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parses(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    assert moment.utcoffset() == timedelta(0)
    return moment


@pytest.fixture
def shop(
    tmp_path: Path, simulator: SimulatorServer, smtp_sink: SmtpSink, database_url: str
) -> Iterator[Shop]:
    with cli_shop(tmp_path, simulator, smtp_sink, database_url) as built:
        yield built


def test_orders_events_and_failed_cancellations_as_json_lines(shop: Shop) -> None:
    orders = json_lines(shop.pipe("orders", "--json"))
    assert [row["id"] for row in orders] == [
        order.id for order in sorted(shop.orders, key=lambda o: (o.created_at, o.id), reverse=True)
    ]
    cancellations = {row.order_id: row for row in shop.cancellations}
    for row in orders:
        [order] = [order for order in shop.orders if order.id == row["id"]]
        assert row == {
            "id": order.id,
            "status": order.status,
            "waiting_for_stock": None,
            "plan_id": order.plan_id,
            "email": order.email,
            "payment_id": order.whop_payment_id,
            "membership_id": order.whop_membership_id,
            "cancellation_id": row["cancellation_id"],
            "cancellation_status": row["cancellation_status"],
            "created_at": time_of(order.created_at),
            "paid_at": time_of(order.paid_at),
            "delivered_at": time_of(order.delivered_at),
        }
        parses(row["created_at"])
        if order.id in cancellations:
            failed = cancellations[order.id]
            assert (row["cancellation_id"], row["cancellation_status"]) == (failed.id, "failed")
        if order.plan_id == UNLISTED_PLAN:
            assert (row["status"], row["cancellation_id"], row["delivered_at"]) == (
                "paid",
                None,
                None,
            )
    delivered = json_lines(shop.pipe("orders", "--status", "delivered", "--json"))
    assert {row["id"] for row in delivered} == {
        order.id for order in shop.orders if order.status == "delivered"
    }
    assert json_lines(shop.pipe("orders", "--email", "nobody@example.com", "--json")) == []

    events = json_lines(shop.pipe("events", "list", "--json"))
    assert {row["id"] for row in events} == {event.id for event in shop.events}
    [broken] = [row for row in events if row["id"] == BROKEN_EVENT]
    [stored] = [event for event in shop.events if event.id == BROKEN_EVENT]
    assert broken == {
        "id": BROKEN_EVENT,
        "type": "payment.succeeded",
        "status": "failed",
        "attempts": stored.attempts,
        "received_at": time_of(stored.received_at),
        "handled_at": None,
        "next_attempt_at": time_of(stored.next_attempt_at),
        "last_error": stored.last_error,  # whole, never shortened
    }
    assert "EventDataError" in (stored.last_error or "")
    failed_only = json_lines(shop.pipe("events", "list", "--status", "failed", "--json"))
    assert [row["id"] for row in failed_only] == [BROKEN_EVENT]

    [row] = json_lines(shop.pipe("cancellations", "failed", "--json"))
    [failed] = shop.cancellations
    [order] = [order for order in shop.orders if order.id == failed.order_id]
    assert row == {
        "id": failed.id,
        "order_id": order.id,
        "membership_id": failed.membership_id,
        "email": order.email,
        "attempts": failed.attempts,
        "generation": 1,
        "last_http_status": 422,
        "last_error": failed.last_error,
        "failed_at": time_of(failed.updated_at),
    }


def test_stock_levels_and_show_as_json(shop: Shop) -> None:
    items = shop.tmp_path / "items.txt"
    items.write_text("KEY-AAAA-1111\nKEY-BBBB-2222\n")
    assert shop.pipe("stock", "import", STOCK_POOL, str(items)).returncode == 0

    [level] = json_lines(shop.pipe("stock", "levels", "--json"))
    assert level == {
        "pool": STOCK_POOL,
        "available": 2,
        "low": True,  # the test pool's threshold is 2
        "assigned": 0,
        "void": 0,
        "threshold": 2,
        "waiting": 0,
        "plans": ["Game account"],
    }

    # Ids come from the database's sequence, which earlier tests on a server may have moved on.
    database = Database(shop.env["DATABASE_URL"])
    try:
        with database.transaction() as session:
            item_id = session.scalars(
                select(func.min(StockItem.id)).where(StockItem.pool == STOCK_POOL)
            ).one()
    finally:
        database.dispose()
    shown = json_document(shop.pipe("stock", "show", str(item_id), "--json"))
    assert shown.pop("content") in ("KEY-AAAA-1111", "KEY-BBBB-2222")  # the point of `show`
    assert shown.pop("created_at").endswith("Z")
    assert shown == {
        "id": item_id,
        "pool": STOCK_POOL,
        "status": "available",
        "order_id": None,
        "void_reason": None,
        "assigned_at": None,
        "voided_at": None,
    }


def test_whop_reports_as_json_documents(
    tmp_path: Path, simulator: SimulatorServer, smtp_sink: SmtpSink
) -> None:
    """`sweep --dry-run`, `backfill --dry-run`, `recover` and `check`, against the simulator:
    one document each, and nothing changed."""
    with cli_shop(tmp_path, simulator, smtp_sink) as shop:
        old = simulator.state.create_purchase(
            MESSAGE_PLAN,
            email="old.buyer@example.com",
            at=datetime.now(UTC) - timedelta(days=2),
            send_webhooks=False,
        )
        assert shop.pipe("migrate").returncode == 0  # the install time: now
        runtime = make_runtime(make_settings(tmp_path))
        with runtime.database.transaction() as session:
            installed = watching_since(session)
        runtime.close()
        assert installed is not None
        new = simulator.state.create_purchase(  # created and paid after the install time
            MESSAGE_PLAN,
            email="new.buyer@example.com",
            at=installed + timedelta(seconds=5),
            send_webhooks=False,
        )

        swept = json_document(shop.pipe("sweep", "--dry-run", "--json"))
        assert swept["dry_run"] is True
        assert set(swept["stuck"]) == {
            "cancellations",
            "deliveries",
            "emails",
            "events",
            "stock_pools",
        }
        assert swept["whop"]["recovered_payments"] == [new["payment_id"]]
        assert swept["whop"]["stopped"] is None
        assert swept["whop"]["payments_seen"] >= 1
        assert isinstance(swept["whop"]["recancelled_memberships"], list)

        backfill = json_document(
            shop.pipe("backfill", "--plan", MESSAGE_PLAN, "--dry-run", "--json")
        )
        assert backfill["plan_id"] == MESSAGE_PLAN
        assert backfill["watching_since"] == time_of(installed)
        assert backfill["since"] is None
        [live] = backfill["to_cancel"]
        assert live["membership_id"] == old["membership_id"]
        assert live["email"] == "old.buyer@example.com"
        assert parses(live["created_at"]) < installed
        skipped = {item["membership_id"]: item["reason"] for item in backfill["skipped"]}
        ours = {order.whop_membership_id for order in shop.orders if order.plan_id == MESSAGE_PLAN}
        assert ours <= set(skipped)
        assert new["membership_id"] in skipped
        refused = shop.pipe("backfill", "--plan", MESSAGE_PLAN, "--json")
        assert refused.returncode == 2
        assert "--json goes with --dry-run" in refused.stderr

        since = (installed - timedelta(days=3)).strftime("%Y-%m-%d")
        recover = json_document(shop.pipe("recover", "--since", since, "--json"))
        assert recover["since"] == f"{since}T00:00:00Z"
        assert recover["until"] == time_of(installed)
        assert recover["applied"] is None  # a dry run
        [payment] = recover["recoverable"]
        assert payment["payment_id"] == old["payment_id"]
        assert payment["email"] == "old.buyer@example.com"
        assert payment["plan_id"] == MESSAGE_PLAN
        assert payment["delivery"] == "message"
        assert payment["cancels_membership"] is True
        assert parses(payment["created_at"]) < installed
        assert all(set(item) == {"payment_id", "reason"} for item in recover["skipped"])

        checked = shop.pipe("check", "--json")
        document = json_document(checked, checked.returncode)
        assert document["ok"] is (checked.returncode == 0)
        checks = {check["name"]: check for check in document["checks"]}
        assert {"settings", "catalog", "database", "queue", "smtp", "whop payments"} <= set(checks)
        assert all(set(check) == {"name", "ok", "detail"} for check in document["checks"])
        assert checks["database"]["ok"] is True
        assert f"watching Whop since {time_of(installed)}" in checks["database"]["detail"]
        assert checks["smtp"]["ok"] is True
        assert "cannot be proven" in document["note"]

        # Nothing above changed anything: the dry runs recovered and cancelled nothing.
        assert [row["id"] for row in json_lines(shop.pipe("orders", "--json"))] == [
            order.id
            for order in sorted(shop.orders, key=lambda o: (o.created_at, o.id), reverse=True)
        ]
        assert simulator.state.membership(old["membership_id"])["status"] == "completed"
