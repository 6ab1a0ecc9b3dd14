"""The dashboard as a merchant uses it, in headless Chromium: log in (a wrong password is
refused, then throttled), a POST without its CSRF token changes nothing, find a purchase by
email and read its timeline, retry a failed cancellation until Whop cancels it, retry a failed
email until it is sent, replay an event from the inbox, import stock; every page fits a phone,
and each is photographed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.browser import DESKTOP, PHONE, Shop
from support.dashboard import PASSWORD
from support.harness import MESSAGE_PLAN, STOCK_PLAN, STOCK_POOL, wait_for
from whop_autocancel.webhooks.models import WebhookEvent

pytestmark = pytest.mark.browser


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    made = browser.new_context(viewport=DESKTOP)
    made.set_default_timeout(15_000)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def page(context: Any) -> Any:
    return context.new_page()


def log_in(page: Any, shop: Shop, password: str = PASSWORD) -> Any:
    page.goto(f"{shop.url}/admin/login")
    page.fill("#password", password)
    with page.expect_navigation() as navigation:
        page.click("button[type=submit]")
    return navigation.value


def event_status(shop: Shop, event_id: str) -> str:
    with shop.database.transaction() as session:
        stored = session.get(WebhookEvent, event_id)
        assert stored is not None
        return stored.status


def test_log_in_and_out(shop: Shop, page: Any) -> None:
    page.goto(f"{shop.url}/admin")
    assert page.url == f"{shop.url}/admin/login"  # no session: the login form
    response = log_in(page, shop)
    assert response.status == 200
    assert page.url == f"{shop.url}/admin"
    assert page.locator("h1").inner_text() == "Overview"
    [cookie] = [c for c in page.context.cookies() if c["name"] == "wa_admin"]
    # Secure cookies work over http://127.0.0.1: Chromium counts loopback as a secure origin.
    assert (cookie["secure"], cookie["httpOnly"], cookie["sameSite"]) == (True, True, "Strict")
    assert cookie["path"] == "/admin"
    page.click("text=Log out")
    page.wait_for_url(f"{shop.url}/admin/login")
    assert "Logged out." in page.content()
    page.goto(f"{shop.url}/admin/stock")
    assert page.url == f"{shop.url}/admin/login"


def test_a_wrong_password_is_refused_then_throttled(shop: Shop, browser: Any) -> None:
    # Its own client address (the server trusts X-Forwarded-For from loopback, as from a
    # proxy): the throttle holds this address back, and no other test.
    context = browser.new_context(
        viewport=DESKTOP, extra_http_headers={"X-Forwarded-For": "203.0.113.77"}
    )
    try:
        page = context.new_page()
        for attempt in range(5):
            response = log_in(page, shop, f"not the password {attempt}")
            assert response.status == 401
            assert page.locator("[role=alert]").inner_text() == "Wrong password."
        response = log_in(page, shop)  # the right one, too late
        assert response.status == 429
        assert 890 <= int(response.headers["retry-after"]) <= 900
        assert "Too many wrong passwords" in page.locator("[role=alert]").inner_text()
        assert not [c for c in context.cookies() if c["name"] == "wa_admin"]
    finally:
        context.close()


def test_a_post_without_the_csrf_token_is_refused_and_changes_nothing(
    shop: Shop, page: Any
) -> None:
    log_in(page, shop)
    page.goto(f"{shop.url}/admin/events?status=failed")
    row = page.locator("tr", has_text="payment.succeeded").first
    event_id = row.locator("td.id").inner_text()
    assert event_status(shop, event_id) == "failed"
    page.eval_on_selector_all("input[name=csrf_token]", "inputs => inputs.forEach(i => i.remove())")
    with page.expect_navigation() as navigation:
        row.locator("button", has_text="Ignore").click()
    assert navigation.value.status == 403
    assert "security token is missing" in page.content()
    assert event_status(shop, event_id) == "failed"


def test_find_a_purchase_by_email_and_read_its_timeline(shop: Shop, page: Any) -> None:
    log_in(page, shop)
    page.click("nav >> text=Purchases")
    page.fill("#q", "Grace@Example.com")
    page.click("button:has-text('Search')")
    page.wait_for_url(f"{shop.url}/admin/orders/ord_*")
    timeline = page.locator("ol.timeline")
    text = timeline.inner_text()
    assert "webhook payment.succeeded" in text
    assert "webhook membership.activated" in text
    assert "matched by" in text
    assert "delivered by message" in text
    assert "delivery email" in text
    assert "accepted by the SMTP server" in text
    assert "/cancel → 200" in text
    assert "canceled" in page.locator("section", has_text="Cancellation").first.inner_text()


def test_a_failed_cancellation_is_retried_from_the_page(shop: Shop, page: Any) -> None:
    bought = shop.buy(email="retry-me@example.com")
    shop.simulator.state.reject(bought["membership_id"], 404)  # before its delayed cancel
    cancellation_id = shop.wait_cancellation(bought["payment_id"], "failed")
    log_in(page, shop)
    page.goto(f"{shop.url}/admin/cancellations")
    failed_row = page.locator(f"#failed-{cancellation_id}")
    assert "404" in failed_row.inner_text()
    shop.simulator.state.unreject(bought["membership_id"])  # the cause is fixed
    with page.expect_navigation():
        failed_row.locator("button", has_text="Retry").click()
    assert "scheduled again as attempt generation 2" in page.locator(".flash").inner_text()
    row = page.locator(f"#cancellation-{cancellation_id}")

    def shows_canceled() -> bool:
        page.reload()
        return "canceled" in row.locator("td[data-label=Status]").inner_text()

    wait_for(shows_canceled, 30, "the row to show canceled", every=0.3)
    assert shop.simulator.state.membership(bought["membership_id"])["status"] == "canceled"


def test_a_failed_email_is_retried_from_the_page(shop: Shop, page: Any) -> None:
    bouncing = "typo.buyer@example.invalid"
    shop.sink.reject(bouncing)  # 550: the delivery email is given up at once
    bought = shop.buy(email=bouncing)
    order_id = shop.wait_order(bought["payment_id"], "delivered")
    failed = shop.wait_delivery_email(order_id, "failed")
    log_in(page, shop)
    page.goto(f"{shop.url}/admin/emails?status=failed")
    row = page.locator(f"#email-{failed.id}")
    assert "550" in row.locator("td[data-label='Last error']").inner_text()
    shop.sink.accept(bouncing)  # the cause is fixed at the mail server
    with page.expect_navigation():
        row.locator("button", has_text="Retry").click()
    assert page.url == f"{shop.url}/admin/emails?status=failed"
    assert f"Email #{failed.id} (delivery to {bouncing}" in page.locator(".flash").inner_text()
    shop.wait_delivery_email(order_id, "sent")
    # Accepted: the cancellation that waited for the delivery email runs.
    shop.wait_cancellation(bought["payment_id"], "canceled")
    page.goto(f"{shop.url}/admin/emails")
    row = page.locator(f"#email-{failed.id}")
    assert "sent" in row.locator("td[data-label=Status]").inner_text()
    assert row.locator("button", has_text="Retry").count() == 0


def test_an_event_is_ignored_then_replayed_from_the_inbox(shop: Shop, page: Any) -> None:
    # A dispute that arrives before its payment waits for it (it fails to apply for now).
    bought = shop.buy(email="disputer@example.com", send_webhooks=False)
    dispute = f"dp_{bought['payment_id'][4:]}"
    event_id = shop.post_event(
        "dispute.created",
        {
            "id": dispute,
            "payment": {"id": bought["payment_id"]},
            "status": "needs_response",
            "amount": 25.0,
            "reason": "fraudulent",
        },
    )
    shop.wait_event(event_id, "failed")
    log_in(page, shop)
    page.goto(f"{shop.url}/admin/events")
    row = page.locator("tr", has_text=event_id)
    with page.expect_navigation():
        row.locator("button", has_text="Ignore").click()
    assert "marked ignored (it was failed)" in page.locator(".flash").inner_text()
    assert event_status(shop, event_id) == "ignored"
    # The Whop sweep finds the payment whose webhooks never came; then the dispute applies.
    shop.cli("sweep")
    shop.wait_order(bought["payment_id"], "delivered", "paid")
    with page.expect_navigation():
        page.locator("tr", has_text=event_id).locator("button", has_text="Replay").click()
    assert "ignored → handled" in page.locator(".flash").inner_text()
    assert event_status(shop, event_id) == "handled"


def test_stock_is_imported_from_the_page(shop: Shop, page: Any) -> None:
    waiting = shop.order_ids_waiting()
    assert waiting  # the buyer who found the pool empty
    log_in(page, shop)
    page.goto(f"{shop.url}/admin/stock")
    level = page.locator("table.rows tr", has_text=STOCK_POOL).first
    assert level.locator("td[data-label=Available]").inner_text() == "0"
    page.fill("#items", "GAME-KEY-1001-PAGE\nGAME-KEY-1002-PAGE\n\nGAME-KEY-1003-PAGE\n")
    with page.expect_navigation():
        page.click("button:has-text('Import')")
    assert "3 item(s) added" in page.locator(".flash").inner_text()
    for order_id in waiting:
        wait_for(lambda order_id=order_id: shop.order_delivered(order_id), 30, "delivery")
    page.reload()
    level = page.locator("table.rows tr", has_text=STOCK_POOL).first
    assert level.locator("td[data-label=Available]").inner_text() == str(3 - len(waiting))
    assert level.locator("td[data-label='Waiting orders']").inner_text() == "0"
    assert "GAME-KEY" not in page.content()  # an item's content is never shown


PAGES = {
    "overview": "/admin",
    "purchases": "/admin/orders",
    "cancellations": "/admin/cancellations",
    "inbox": "/admin/events",
    "emails": "/admin/emails",
    "stock": "/admin/stock",
}


def test_every_page_fits_a_phone_and_is_photographed(
    shop: Shop, browser: Any, screenshots: Path
) -> None:
    # One more failure left as it is, so the pages show one.
    refused = shop.buy(MESSAGE_PLAN, email="still-refused@example.com")
    shop.simulator.state.reject(refused["membership_id"], 404)
    shop.wait_cancellation(refused["payment_id"], "failed")
    shop.buy(STOCK_PLAN, email="late-buyer@example.com")
    for viewport, suffix in ((DESKTOP, ""), (PHONE, "-phone")):
        context = browser.new_context(viewport=viewport)
        try:
            page = context.new_page()
            page.goto(f"{shop.url}/admin/login")
            assert_fits(page, "login", viewport)
            page.screenshot(path=str(screenshots / f"login{suffix}.png"))  # the first screen
            log_in(page, shop)
            order_id = shop.order_of_email("grace@example.com")
            for name, path in {**PAGES, "purchase": f"/admin/orders/{order_id}"}.items():
                page.goto(f"{shop.url}{path}")
                assert page.locator("h1").count() == 1, name
                assert_fits(page, name, viewport)
                page.screenshot(path=str(screenshots / f"{name}{suffix}.png"))
        finally:
            context.close()


def assert_fits(page: Any, name: str, viewport: dict[str, int]) -> None:
    width = page.evaluate("document.scrollingElement.scrollWidth")
    inner = page.evaluate("window.innerWidth")
    assert inner == viewport["width"]
    assert width <= inner, f"{name} scrolls sideways at {inner} px: {width} px wide"
