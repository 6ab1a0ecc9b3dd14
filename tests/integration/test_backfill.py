"""`whop-autocancel backfill`: the live memberships of a listed one-time plan sold before the
service started watching, that belong to no order we know, cancelled and recorded like any
other; everything else it is given is listed as skipped with its reason and left alone."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from support.harness import (
    API_KEY,
    MESSAGE_PLAN,
    STOCK_CATALOG,
    STOCK_PLAN,
    UNLISTED_PLAN,
    apply_webhooks,
    drain,
    make_runtime,
    make_settings,
    run_cli,
    service_environment,
    signed_headers,
)
from support.logs import captured_logs
from support.stock import drain_due
from whop_autocancel.cancellation.models import Cancellation
from whop_autocancel.clock import FrozenClock
from whop_autocancel.db.install import start_watching
from whop_autocancel.mail.sink import SmtpSink
from whop_autocancel.orders.models import Order
from whop_autocancel.reconcile.backfill import Backfill
from whop_autocancel.runtime import Runtime
from whop_autocancel.simulator import SimulatorServer

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


def old_sales(simulator: SimulatorServer) -> list[str]:
    """Three live memberships of the listed plan, one already cancelled, one of another plan."""
    live = [
        simulator.state.create_purchase(
            MESSAGE_PLAN, email=f"old{n}@example.com", send_webhooks=False
        )["membership_id"]
        for n in range(3)
    ]
    gone = simulator.state.create_purchase(MESSAGE_PLAN, send_webhooks=False)["membership_id"]
    httpx.post(
        f"{simulator.api_url}/memberships/{gone}/cancel",
        json={"cancellation_mode": "immediate"},
        headers={"Authorization": f"Bearer {simulator.state.api_key}"},
    ).raise_for_status()
    simulator.state.create_purchase(UNLISTED_PLAN, send_webhooks=False)
    return live


def test_backfill_lists_then_cancels_the_live_memberships(
    tmp_path: Path, simulator: SimulatorServer
) -> None:
    live = old_sales(simulator)
    env = service_environment(tmp_path, WHOP_API_URL=simulator.api_url)
    assert run_cli(tmp_path, "migrate", env=env).returncode == 0

    dry = run_cli(tmp_path, "backfill", "--plan", MESSAGE_PLAN, "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert f"3 live membership(s) of {MESSAGE_PLAN}" in dry.stdout
    assert all(membership in dry.stdout for membership in live)
    assert "Dry run: nothing cancelled." in dry.stdout
    assert all(simulator.state.membership(m)["status"] == "completed" for m in live)

    done = run_cli(tmp_path, "backfill", "--plan", MESSAGE_PLAN, "--yes", env=env)
    assert done.returncode == 0, done.stderr
    assert "Done: 3 canceled." in done.stdout
    assert all(simulator.state.membership(m)["status"] == "canceled" for m in live)

    runtime = make_runtime(make_settings(tmp_path, DATABASE_URL=env["DATABASE_URL"]))
    with runtime.database.transaction() as session:
        orders = list(session.scalars(select(Order)))
        rows = list(session.scalars(select(Cancellation)))
    runtime.close()
    assert sorted(o.whop_membership_id or "" for o in orders) == sorted(live)
    assert all(o.order_metadata.get("backfill") for o in orders)
    assert [r.status for r in rows] == ["canceled"] * 3

    again = run_cli(tmp_path, "backfill", "--plan", MESSAGE_PLAN, "--yes", env=env)
    assert "0 live membership(s)" in again.stdout
    assert "Nothing to cancel." in again.stdout


def test_backfill_refuses_what_the_safety_rule_forbids(
    tmp_path: Path, simulator: SimulatorServer
) -> None:
    simulator.state.create_plan("plan_Monthly1", "renewal")
    env = service_environment(tmp_path, WHOP_API_URL=simulator.api_url)
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(catalog.read_text() + '\n[plans.plan_Monthly1]\ndelivery = "none"\n')
    assert run_cli(tmp_path, "migrate", env=env).returncode == 0
    unlisted = run_cli(tmp_path, "backfill", "--plan", UNLISTED_PLAN, "--yes", env=env)
    assert unlisted.returncode == 1
    assert "is not listed in the catalog" in unlisted.stderr
    renewal = run_cli(tmp_path, "backfill", "--plan", "plan_Monthly1", "--yes", env=env)
    assert renewal.returncode == 1
    assert "'renewal', not one_time" in renewal.stderr
    keep = run_cli(tmp_path, "backfill", "--plan", "plan_KeepMembership1", "--yes", env=env)
    assert keep.returncode == 1
    assert "delivery-only" in keep.stderr
    assert not [c for c in simulator.state.calls() if c["method"] == "POST"]


# What backfill will and will not touch ----------------------------------------------------------


def whop_object(simulator: SimulatorServer, kind: str, object_id: str) -> dict[str, Any]:
    """The payment or membership as Whop's API shows it (legacy shape)."""
    reply = httpx.get(
        f"{simulator.api_url}/{kind}/{object_id}", headers={"Authorization": f"Bearer {API_KEY}"}
    )
    reply.raise_for_status()
    found: dict[str, Any] = reply.json()
    return found


def deliver_webhook(
    runtime: Runtime, simulator: SimulatorServer, event_type: str, object_id: str
) -> None:
    """A signed webhook of this payment or membership reaches the inbox, as Whop sends it, and
    is applied, as the worker does."""
    kind = "payments" if event_type.startswith("payment.") else "memberships"
    body = json.dumps(
        {
            "id": f"msg_{uuid.uuid4().hex[:20]}",
            "type": event_type,
            "timestamp": "2026-11-20T14:03:11Z",
            "company_id": "biz_SimStore",
            "data": whop_object(simulator, kind, object_id),
        }
    ).encode()
    result = runtime.inbox.ingest(body, signed_headers(body))
    assert result.http_status == 200, result.body
    apply_webhooks(runtime)


def sale(simulator: SimulatorServer, plan: str, at: datetime, email: str) -> dict[str, Any]:
    made: dict[str, Any] = simulator.state.create_purchase(
        plan, email=email, at=at, send_webhooks=False
    )
    return made


def membership_status(simulator: SimulatorServer, membership_id: str) -> str:
    return str(simulator.state.membership(membership_id)["status"])


def posts(simulator: SimulatorServer) -> list[dict[str, Any]]:
    return [call for call in simulator.state.calls() if call["method"] == "POST"]


def orders(runtime: Runtime) -> dict[str, Order]:
    with runtime.database.transaction() as session:
        return {o.whop_membership_id or o.id: o for o in session.scalars(select(Order))}


@pytest.fixture
def shop(
    tmp_path: Path,
    clock: FrozenClock,
    simulator: SimulatorServer,
    smtp_sink: SmtpSink,
    database_url: str,
) -> Iterator[Runtime]:
    """The service with a stock plan (no stock yet), installed an hour ago."""
    (tmp_path / "catalog.toml").write_text(STOCK_CATALOG)
    runtime = make_runtime(
        make_settings(
            tmp_path,
            DATABASE_URL=database_url,
            WHOP_API_URL=simulator.api_url,
            WHOP_COMPANY_ID="biz_SimStore",
            SMTP_URL=smtp_sink.url,
        ),
        clock,
    )
    start_watching(runtime.database, clock.now() - HOUR)
    yield runtime
    runtime.close()


def backfill(runtime: Runtime) -> Backfill:
    return runtime.backfill()


def test_backfill_cancels_only_unknown_memberships_sold_before_the_install(
    tmp_path: Path, shop: Runtime, simulator: SimulatorServer, clock: FrozenClock
) -> None:
    installed = clock.now() - HOUR
    unknown = sale(simulator, STOCK_PLAN, installed - 2 * DAY, "unknown@example.com")
    waiting = sale(simulator, STOCK_PLAN, installed - DAY, "waiting@example.com")
    fresh = sale(simulator, STOCK_PLAN, installed + timedelta(minutes=10), "new@example.com")
    other = sale(simulator, MESSAGE_PLAN, installed - DAY, "other@example.com")
    # The buyer waiting for stock: the payment came (late), nothing to deliver yet.
    deliver_webhook(shop, simulator, "payment.succeeded", waiting["payment_id"])
    drain(shop)
    assert orders(shop)[waiting["membership_id"]].waiting_for_stock == "keys"
    # Whop's list answers every plan, whatever the filter says.
    simulator.state.set_faults(plan_filter_ignored=True)

    env = service_environment(
        tmp_path,
        WHOP_API_URL=simulator.api_url,
        DATABASE_URL=shop.settings.DATABASE_URL,
    )
    dry = run_cli(tmp_path, "backfill", "--plan", STOCK_PLAN, "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert "1 to cancel, 3 skipped" in dry.stdout
    lines = {line for line in dry.stdout.splitlines()}
    text = "\n".join(lines)
    assert unknown["membership_id"] in text
    for purchase, reason in (
        (waiting, "belongs to order"),
        (fresh, "created after the service started watching"),
        (other, f"plan {MESSAGE_PLAN}, not {STOCK_PLAN}"),
    ):
        [line] = [line for line in lines if purchase["membership_id"] in line]
        assert reason in line, line
    assert "Dry run: nothing cancelled." in dry.stdout
    assert posts(simulator) == []

    done = run_cli(tmp_path, "backfill", "--plan", STOCK_PLAN, "--yes", env=env)
    assert done.returncode == 0, done.stderr
    assert "Done: 1 canceled." in done.stdout
    assert "3 skipped" in done.stdout
    assert membership_status(simulator, unknown["membership_id"]) == "canceled"
    for purchase in (waiting, fresh, other):
        assert membership_status(simulator, purchase["membership_id"]) == "completed"
    assert [call["path"] for call in posts(simulator)] == [
        f"/api/v1/memberships/{unknown['membership_id']}/cancel"
    ]
    known = orders(shop)
    assert known[unknown["membership_id"]].order_metadata["backfill"] is True
    assert known[waiting["membership_id"]].status == "delivery_failed"  # still waiting
    assert fresh["membership_id"] not in known  # the sweep's: it is a purchase of ours
    assert other["membership_id"] not in known
    with shop.database.transaction() as session:
        rows = {row.membership_id: row.status for row in session.scalars(select(Cancellation))}
    assert rows == {unknown["membership_id"]: "canceled"}


def test_a_payment_of_a_backfilled_membership_is_recorded_not_delivered(
    shop: Runtime,
    simulator: SimulatorServer,
    clock: FrozenClock,
    smtp_sink: SmtpSink,
) -> None:
    """A sale made before the install whose membership backfill cancelled: if its payment
    webhook still comes (or `recover --apply` meets it), it is recorded on the backfill's
    order and never delivered as if new; the log says why."""
    old = sale(simulator, MESSAGE_PLAN, clock.now() - 2 * DAY, "old@example.com")
    job = backfill(shop)
    survey = job.survey(MESSAGE_PLAN, None)
    assert [m.membership_id for m in survey.to_cancel] == [old["membership_id"]]
    assert job.cancel(MESSAGE_PLAN, survey.to_cancel[0]) == "canceled"

    with captured_logs() as logs:
        deliver_webhook(shop, simulator, "payment.succeeded", old["payment_id"])
        drain_due(shop)
    order = orders(shop)[old["membership_id"]]
    assert order.whop_payment_id == old["payment_id"]  # recorded on the backfill's order
    assert (order.status, order.delivery_method) == ("delivered", "backfill")
    assert smtp_sink.to("old@example.com") == []
    [line] = logs.events("payment_of_backfilled_membership")
    assert line["payment_id"] == old["payment_id"]
    assert line["order_id"] == order.id
    assert "not delivered" in line["consequence"]


def test_delivery_re_arms_a_cancellation_an_old_backfill_left_skipped(
    shop: Runtime, simulator: SimulatorServer, clock: FrozenClock, smtp_sink: SmtpSink
) -> None:
    """An older backfill cancelled the membership of a pending order: the run-time check said
    no and stored the row `skipped`. Once the order is paid and delivered, that row is armed
    again as a new attempt generation and the membership is cancelled."""
    bought = sale(simulator, MESSAGE_PLAN, clock.now(), "late@example.com")
    deliver_webhook(shop, simulator, "membership.activated", bought["membership_id"])
    order = orders(shop)[bought["membership_id"]]
    assert order.status == "pending"
    now = clock.now()
    with shop.database.transaction() as session:
        session.add(
            Cancellation(
                order_id=order.id,
                membership_id=bought["membership_id"],
                status="skipped",
                attempts=0,
                generation=1,
                generation_started_at=now,
                next_attempt_at=now,
                last_error="billing reason 'None' is not a one-time purchase",
                created_at=now,
                updated_at=now,
            )
        )

    deliver_webhook(shop, simulator, "payment.succeeded", bought["payment_id"])
    drain(shop)
    assert orders(shop)[bought["membership_id"]].status == "delivered"
    with shop.database.transaction() as session:
        row = session.scalars(select(Cancellation)).one()
    assert (row.status, row.generation) == ("scheduled", 2)
    clock.advance(shop.settings.CANCEL_DELAY + 1)
    drain_due(shop)
    with shop.database.transaction() as session:
        row = session.scalars(select(Cancellation)).one()
    assert row.status == "canceled"
    assert membership_status(simulator, bought["membership_id"]) == "canceled"
    assert len(smtp_sink.to("late@example.com")) == 1
