"""One view per purchase (`admin/timeline.py`): found by any id a merchant holds or by the
customer's email, with every event, the matching rule, the delivery, every email, every call to
Whop for the cancellation, every alert and admin action in time order — on SQLite, PostgreSQL
and MariaDB, with data made by the real webhook, delivery, SMTP and cancellation paths."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from support.harness import STOCK_CATALOG, STOCK_PLAN, STOCK_POOL, apply_webhooks, signed_headers
from support.shop import Shop, open_shop
from whop_autocancel.admin.audit import actions_for, record
from whop_autocancel.admin.operations import (
    OpsError,
    ignore_event,
    replay_event,
    resend_delivery,
    retry_cancellation,
)
from whop_autocancel.admin.stock import import_stock
from whop_autocancel.admin.timeline import TimelineEntry, dumps, find_orders, purchase, view_json
from whop_autocancel.cancellation.service import RetryRefused
from whop_autocancel.clock import FrozenClock
from whop_autocancel.db.audit import AdminAction
from whop_autocancel.delivery.stock import items_for
from whop_autocancel.simulator import SimulatorServer
from whop_autocancel.webhooks.models import WebhookEvent


@pytest.fixture
def shop(
    tmp_path: Path, clock: FrozenClock, simulator: SimulatorServer, database_url: str
) -> Iterator[Shop]:
    yield from open_shop(tmp_path, clock, simulator, DATABASE_URL=database_url)


def titles(entries: list[TimelineEntry], source: str) -> list[str]:
    return [entry.title for entry in entries if entry.source == source]


def test_the_timeline_tells_the_whole_purchase_in_time_order(shop: Shop) -> None:
    shop.smtp_up()
    bought = shop.buy(email="Ann.Buyer@Example.com")
    shop.simulator.state.reject(bought["membership_id"], 503)
    first = shop.run_cancellation(bought, after=5)
    assert first.status == "scheduled"  # a 5xx is retried
    shop.simulator.state.unreject(bought["membership_id"])
    with shop.runtime.database.transaction() as session:
        record(
            session,
            at=shop.clock.now(),
            actor="cli:ann@shop",
            action="email.resend",
            target=bought["order_id"],
            order_id=bought["order_id"],
        )
    done = shop.run_cancellation(bought, after=60)
    assert done.status == "canceled"

    with shop.runtime.database.transaction() as session:
        [event_id] = session.scalars(
            select(WebhookEvent.id).where(
                WebhookEvent.order_id == bought["order_id"],
                WebhookEvent.type == "payment.succeeded",
            )
        ).all()
        for ref in (
            bought["order_id"],
            bought["payment_id"],
            bought["membership_id"],
            event_id,
            "ann.buyer@example.com",
            " ANN.BUYER@EXAMPLE.COM ",
        ):
            assert find_orders(session, ref) == [bought["order_id"]], ref
        assert find_orders(session, "nobody@example.com") == []
        assert find_orders(session, "pay_NotOurs") == []
        view = purchase(session, bought["order_id"])
    assert view is not None
    entries = view.entries
    assert [entry.at for entry in entries] == sorted(entry.at for entry in entries)
    assert entries[0].source == "order"
    assert entries[-1].title == f"membership {bought['membership_id']} canceled"

    [match] = [entry for entry in entries if entry.source == "match"]
    assert match.fields["payment_id"] == bought["payment_id"]
    assert match.fields["rule"]  # which rule bound it is recorded
    assert any(
        entry.fields.get("type") == "payment.succeeded" and entry.fields["status"] == "handled"
        for entry in entries
        if entry.source == "event"
    )
    assert titles(entries, "delivery") == ["delivered by message"]
    accepted = [entry for entry in entries if entry.source == "email" and "accepted" in entry.title]
    assert [entry.fields["kind"] for entry in accepted].count("delivery") == 1
    assert str(accepted[0].fields["to"]).lower() == "ann.buyer@example.com"

    attempts = [entry for entry in entries if entry.source == "attempt"]
    assert [entry.fields["http_status"] for entry in attempts] == [503, 200]
    assert [entry.fields["result"] for entry in attempts] == ["scheduled", "canceled"]
    # A 5xx repeats the same Idempotency-Key (Whop may have acted); the generation is the row's.
    keys = {entry.fields["idempotency_key"] for entry in attempts}
    assert len(keys) == 1
    sent = {call["idempotency_key"] for call in shop.whop_cancels(bought)}
    assert keys == sent
    assert {entry.fields["generation"] for entry in attempts} == {1}
    [admin] = [entry for entry in entries if entry.source == "admin"]
    assert admin.fields["actor"] == "cli:ann@shop"
    assert entries.index(admin) < entries.index(attempts[1])  # it came before the second call

    document = json.loads(dumps(view))
    assert document == json.loads(json.dumps(view_json(view)))
    assert document["order"]["status"] == "delivered"
    assert document["cancellation"]["status"] == "canceled"
    for entry in document["timeline"]:
        assert datetime.fromisoformat(entry["at"]).utcoffset() is not None


@pytest.fixture
def stock_shop(
    tmp_path: Path, clock: FrozenClock, simulator: SimulatorServer, database_url: str
) -> Iterator[Shop]:
    yield from open_shop(tmp_path, clock, simulator, STOCK_CATALOG, DATABASE_URL=database_url)


def test_the_timeline_names_the_stock_item_never_its_content(stock_shop: Shop) -> None:
    secret = "login: gamer42 / password: hunter2-SECRET"
    import_stock(stock_shop.runtime, STOCK_POOL, items_for([secret]))
    stock_shop.smtp_up()
    bought = stock_shop.buy(plan=STOCK_PLAN)
    with stock_shop.runtime.database.transaction() as session:
        view = purchase(session, bought["order_id"])
    assert view is not None
    [assigned] = [entry for entry in view.entries if entry.source == "stock"]
    assert assigned.fields["pool"] == STOCK_POOL
    assert "hunter2" not in dumps(view)
    assert "gamer42" not in dumps(view)


def test_a_failed_event_that_never_reached_an_order_is_still_on_its_timeline(
    shop: Shop,
) -> None:
    shop.smtp_up()
    bought = shop.buy()
    # A refund whose handling failed: it is linked to no order, but names the payment.
    body = json.dumps(
        {
            "id": "msg_RefundBroken1",
            "type": "refund.created",
            "timestamp": "2026-11-20T14:03:11Z",
            "data": {"id": None, "payment": {"id": bought["payment_id"]}, "status": "pending"},
        }
    ).encode()
    result = shop.runtime.inbox.ingest(body, signed_headers(body))
    assert result.http_status == 200
    apply_webhooks(shop.runtime)  # as the worker does: it fails, and is stored `failed`
    with shop.runtime.database.transaction() as session:
        stored = session.get(WebhookEvent, "msg_RefundBroken1")
        assert stored is not None
        assert stored.status == "failed"
        assert stored.order_id is None
        view = purchase(session, bought["order_id"])
        assert find_orders(session, "msg_RefundBroken1") == [bought["order_id"]]
    assert view is not None
    assert any(entry.fields.get("event_id") == "msg_RefundBroken1" for entry in view.entries)


def test_every_admin_action_is_audited_with_who_and_what_and_shown_on_the_timeline(
    shop: Shop,
) -> None:
    shop.smtp_up()
    bought = shop.buy()
    shop.simulator.state.reject(bought["membership_id"], 404)  # Whop: no such membership
    assert shop.run_cancellation(bought, after=5).status == "failed"
    shop.simulator.state.unreject(bought["membership_id"])
    with shop.runtime.database.transaction() as session:
        [event_id] = session.scalars(
            select(WebhookEvent.id).where(
                WebhookEvent.order_id == bought["order_id"],
                WebhookEvent.type == "payment.succeeded",
            )
        ).all()
    runtime = shop.runtime
    retried = retry_cancellation(runtime, bought["cancellation_id"], actor="web:ann")
    assert retried.generation == 2
    with pytest.raises(RetryRefused):  # scheduled now: a second retry is refused
        retry_cancellation(runtime, bought["cancellation_id"], actor="web:ann")
    resend_delivery(runtime, bought["order_id"], actor="cli:bob@host")
    replay_event(runtime, event_id, actor="cli:bob@host")
    with pytest.raises(OpsError):  # handled: ignoring it would hide that it was applied
        ignore_event(runtime, event_id, actor="cli:bob@host")

    with runtime.database.transaction() as session:
        actions = [
            (row.actor, row.action, row.target, row.outcome)
            for row in actions_for(session, bought["order_id"])
        ]
        refusals = list(
            session.scalars(select(AdminAction).where(AdminAction.outcome == "refused"))
        )
        view = purchase(session, bought["order_id"])
    assert actions == [
        ("web:ann", "cancellation.retry", f"#{bought['cancellation_id']}", "done"),
        ("cli:bob@host", "delivery.resend", bought["order_id"], "done"),
        ("cli:bob@host", "event.replay", event_id, "done"),
    ]
    assert sorted((row.action, row.target) for row in refusals) == [
        ("cancellation.retry", f"#{bought['cancellation_id']}"),
        ("event.ignore", event_id),
    ]
    assert all(row.detail for row in refusals)  # why it was refused
    assert view is not None
    assert [entry.fields["action"] for entry in view.entries if entry.source == "admin"] == [
        "cancellation.retry",
        "delivery.resend",
        "event.replay",
    ]
