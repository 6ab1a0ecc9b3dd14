"""The dashboard's pages and actions over real HTTP, on data made by the real webhook,
delivery and cancellation paths: each action is the admin layer's, audited as `web:admin@…`,
and what a page shows is escaped (and never a stock item's content, an email's body or a chat
webhook's URL)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from support.dashboard import AdminClient, dashboard_settings
from support.harness import STOCK_CATALOG, STOCK_POOL, drain
from support.shop import Shop, open_shop
from whop_autocancel.clock import FrozenClock
from whop_autocancel.db.audit import AdminAction
from whop_autocancel.delivery.models import StockItem
from whop_autocancel.simulator import SimulatorServer
from whop_autocancel.webhooks.models import WebhookEvent

SECRET_ITEMS = ["SECRET-KEY-7F3A-0001", "SECRET-KEY-7F3A-0002"]
CHAT_TOKEN = "chat-token-never-on-a-page-91d2"
CHAT_URL = f"http://127.0.0.1:9/api/webhooks/1/{CHAT_TOKEN}"  # nobody listens: stays pending


@pytest.fixture
def shop(tmp_path: Path, clock: FrozenClock, simulator: SimulatorServer) -> Iterator[Shop]:
    yield from open_shop(
        tmp_path,
        clock,
        simulator,
        STOCK_CATALOG,
        ALERT_WEBHOOK_URL=CHAT_URL,
        **dashboard_settings(),
    )


@pytest.fixture
def admin(shop: Shop) -> Iterator[AdminClient]:
    webhook_url = shop.simulator.state.webhook_url
    assert webhook_url is not None
    client = AdminClient(webhook_url.removesuffix("/webhooks/whop"))
    assert client.login().status_code == 303
    try:
        yield client
    finally:
        client.close()


def actions(shop: Shop) -> list[AdminAction]:
    with shop.runtime.database.transaction() as session:
        return list(session.scalars(select(AdminAction).order_by(AdminAction.id)))


def follow(admin: AdminClient, response: object) -> str:
    location = response.headers["location"]  # type: ignore[attr-defined]
    page = admin.get(location)
    assert page.status_code == 200, page.text
    return page.text


def test_every_page_shows_real_data_escaped(shop: Shop, admin: AdminClient) -> None:
    shop.smtp_up()
    odd = "<b>odd</b>@example.com"
    bought = shop.buy(email=odd)
    for path in ["/admin", "/admin/orders", "/admin/cancellations", "/admin/emails"]:
        page = admin.get(path)
        assert page.status_code == 200, path
        assert "<b>odd</b>" not in page.text, path
    assert "&lt;b&gt;odd&lt;/b&gt;@example.com" in admin.get("/admin/orders").text
    assert bought["order_id"] in admin.get("/admin/orders").text
    overview = admin.get("/admin").text
    assert "Purchases" in overview
    assert "<svg" in overview
    assert "Queue lag" in overview
    assert admin.get("/admin/orders/ord_does_not_exist").status_code == 404


def test_a_search_by_email_opens_the_purchase_timeline(shop: Shop, admin: AdminClient) -> None:
    shop.smtp_up()
    bought = shop.buy(email="Timeline.Buyer@Example.com")
    shop.run_cancellation(bought, after=5)
    found = admin.get("/admin/orders", params={"q": "timeline.buyer@example.com"})
    assert found.status_code == 303
    assert found.headers["location"] == f"/admin/orders/{bought['order_id']}"
    page = follow(admin, found)
    assert "payment.succeeded" in page
    assert "delivered by message" in page
    assert "delivery email" in page
    assert f"POST /memberships/{bought['membership_id']}/cancel" in page
    assert "canceled" in page
    by_payment = admin.get("/admin/orders", params={"q": bought["payment_id"]})
    assert by_payment.headers["location"] == f"/admin/orders/{bought['order_id']}"


def test_a_failed_cancellation_is_retried_from_the_page(shop: Shop, admin: AdminClient) -> None:
    shop.smtp_up()
    bought = shop.buy()
    shop.simulator.state.reject(bought["membership_id"], 404)
    assert shop.run_cancellation(bought, after=5).status == "failed"
    listing = admin.get("/admin/cancellations").text
    assert f'action="/admin/cancellations/{bought["cancellation_id"]}/retry"' in listing
    shop.simulator.state.unreject(bought["membership_id"])
    response = admin.post(f"/admin/cancellations/{bought['cancellation_id']}/retry")
    assert response.status_code == 303
    assert "scheduled again as attempt generation 2" in follow(admin, response)
    row = shop.cancellation(bought)
    assert (row.status, row.generation) == ("scheduled", 2)
    assert shop.run_cancellation(bought).status == "canceled"
    [retried] = [a for a in actions(shop) if a.action == "cancellation.retry"]
    assert retried.actor == "web:admin@127.0.0.1"
    assert retried.order_id == bought["order_id"]
    # Again, now that it is done: refused, said on the page, and audited as refused.
    again = admin.post(f"/admin/cancellations/{bought['cancellation_id']}/retry")
    assert "only failed or skipped ones can be retried" in follow(admin, again)
    assert [a.outcome for a in actions(shop) if a.action == "cancellation.retry"] == [
        "done",
        "refused",
    ]


def test_an_event_is_ignored_and_replayed_from_the_inbox(shop: Shop, admin: AdminClient) -> None:
    with shop.runtime.database.transaction() as session:
        session.add(
            WebhookEvent(
                id="msg_broken_1",
                type="membership.activated",
                payload='{"id": "msg_broken_1", "type": "membership.activated", "data": {}}',
                received_at=shop.clock.now(),
                status="failed",
                attempts=5,
                last_error="KeyError: 'id'",
            )
        )
    inbox = admin.get("/admin/events", params={"status": "failed"}).text
    assert "msg_broken_1" in inbox
    ignored = admin.post(
        "/admin/events/msg_broken_1/ignore", {"back": "/admin/events?status=failed"}
    )
    assert ignored.headers["location"] == "/admin/events?status=failed"
    assert "marked ignored (it was failed)" in follow(admin, ignored)
    replayed = admin.post("/admin/events/msg_broken_1/replay")
    assert "msg_broken_1" in follow(admin, replayed)
    assert [(a.action, a.actor) for a in actions(shop) if a.action.startswith("event.")] == [
        ("event.ignore", "web:admin@127.0.0.1"),
        ("event.replay", "web:admin@127.0.0.1"),
    ]
    outside = admin.post("/admin/events/msg_broken_1/ignore", {"back": "https://evil.example/"})
    assert outside.headers["location"] == "/admin/events"


def test_a_delivery_email_is_resent_from_the_emails_page(shop: Shop, admin: AdminClient) -> None:
    shop.smtp_up()
    bought = shop.buy()
    page = admin.get("/admin/emails").text
    assert f'action="/admin/orders/{bought["order_id"]}/resend"' in page
    response = admin.post(f"/admin/orders/{bought['order_id']}/resend")
    assert "delivery email is queued again" in follow(admin, response)
    assert len(shop.customer_emails(bought)) == 2
    assert [a.action for a in actions(shop)][-1] == "delivery.resend"


def test_a_failed_email_is_retried_from_the_emails_page(shop: Shop, admin: AdminClient) -> None:
    bouncing = "typo.buyer@example.invalid"
    sink = shop.smtp_up()
    sink.reject(bouncing)  # 550: the delivery email is given up at once
    bought = shop.buy(email=bouncing)
    [failed] = shop.customer_emails(bought)
    assert failed.failed_at is not None
    assert "550" in (failed.last_error or "")
    retry = f'action="/admin/emails/{failed.id}/retry"'
    page = admin.get("/admin/emails").text
    assert retry in page
    assert page.count('/retry"') == 1  # only a failed email has a Retry button
    assert "(chat webhook)" in page  # the email_failed alert's chat message, pending
    assert CHAT_TOKEN not in page  # a chat webhook's URL holds its token
    assert "Here is your pack" not in page  # never a body
    only_failed = admin.get("/admin/emails", params={"status": "failed"}).text
    assert retry in only_failed
    assert "(chat webhook)" not in only_failed

    # Without its CSRF token: refused, and nothing changed.
    refused = admin.post(f"/admin/emails/{failed.id}/retry", token=False)
    assert refused.status_code == 403
    [unchanged] = shop.customer_emails(bought)
    assert (unchanged.failed_at, unchanged.attempts) == (failed.failed_at, failed.attempts)
    assert not [a for a in actions(shop) if a.action == "email.retry"]

    # The address is fixed at the mail server; the admin presses Retry.
    sink.accept(bouncing)
    response = admin.post(
        f"/admin/emails/{failed.id}/retry", {"back": "/admin/emails?status=failed"}
    )
    assert response.status_code == 303
    assert response.headers["location"] == "/admin/emails?status=failed"
    assert (
        f"Email #{failed.id} (delivery to {bouncing}, order {bought['order_id']}) is queued "
        "again (attempts start over)"
    ) in follow(admin, response)
    [again] = shop.customer_emails(bought)
    assert (again.failed_at, again.sent_at, again.attempts) == (None, None, 0)
    [retried] = [a for a in actions(shop) if a.action == "email.retry"]
    assert (retried.actor, retried.target, retried.order_id, retried.outcome) == (
        "web:admin@127.0.0.1",
        f"#{failed.id}",
        bought["order_id"],
        "done",
    )

    # The outbox's own job sends it; sent, it has no Retry button, and a retry is refused.
    drain(shop.runtime)
    [sent] = shop.customer_emails(bought)
    assert sent.sent_at is not None
    assert len(sink.to(bouncing)) == 1
    assert retry not in admin.get("/admin/emails").text
    twice = admin.post(f"/admin/emails/{failed.id}/retry")
    assert "only failed emails are retried" in follow(admin, twice)
    assert [a.outcome for a in actions(shop) if a.action == "email.retry"] == [
        "done",
        "refused",
    ]


def test_stock_is_imported_and_voided_from_the_page_and_never_shown(
    shop: Shop, admin: AdminClient
) -> None:
    text = "\n".join([*SECRET_ITEMS, "", SECRET_ITEMS[0]]) + "\n"
    response = admin.post(
        "/admin/stock/import",
        {"pool": STOCK_POOL},
        files={"file": ("keys.txt", text.encode(), "text/plain")},
    )
    assert response.status_code == 303
    page = follow(admin, response)
    assert "2 item(s) added" in page
    assert "Available now: 2" in page
    with shop.runtime.database.transaction() as session:
        first = session.scalars(select(StockItem).order_by(StockItem.id)).first()
        assert first is not None
        item_id = first.id
    voided = admin.post("/admin/stock/void", {"item": f"#{item_id}", "reason": "leaked"})
    assert f"Item #{item_id} (pool {STOCK_POOL}, was available) voided." in follow(admin, voided)
    pasted = admin.post(
        "/admin/stock/import", {"pool": STOCK_POOL, "items": "SECRET-KEY-7F3A-0003"}
    )
    assert "1 item(s) added" in follow(admin, pasted)
    unknown = admin.post("/admin/stock/import", {"pool": "nope", "items": "x"})
    assert "no plan in the catalog delivers from pool" in follow(admin, unknown)
    for path in ["/admin", "/admin/stock", "/admin/emails", "/admin/orders"]:
        body = admin.get(path).text
        assert "SECRET-KEY" not in body, path
    assert [a.action for a in actions(shop) if a.action.startswith("stock.")] == [
        "stock.import",
        "stock.void",
        "stock.import",
    ]
