"""POST/GET /api/checkouts over real HTTP, with the simulator as Whop."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from support.harness import (
    MESSAGE_PLAN,
    UNLISTED_PLAN,
    ServiceServer,
    drain,
    make_runtime,
    make_settings,
    wait_for,
)
from whop_autocancel.cancellation.models import Cancellation
from whop_autocancel.clock import FrozenClock
from whop_autocancel.mail.sink import SmtpSink
from whop_autocancel.orders.models import Order
from whop_autocancel.runtime import Runtime
from whop_autocancel.simulator import SimulatorServer

COMPANY = "biz_SimStore"


def start(
    tmp_path: Path, clock: FrozenClock, simulator: SimulatorServer, sink: SmtpSink, **settings: Any
) -> Iterator[tuple[Runtime, httpx.Client]]:
    values: dict[str, Any] = {
        "WHOP_API_URL": simulator.api_url,
        "SMTP_URL": sink.url,
        "WHOP_COMPANY_ID": COMPANY,
        "CHECKOUT_REDIRECT_URL": "https://shop.example.com/thanks",
    }
    runtime = make_runtime(make_settings(tmp_path, **{**values, **settings}), clock)
    server = ServiceServer(runtime)
    with server.running(), httpx.Client(base_url=server.url, timeout=10) as http:
        simulator.state.set_webhook_url(f"{server.url}/webhooks/whop")
        yield runtime, http
    runtime.close()


@pytest.fixture
def service(
    tmp_path: Path,
    clock: FrozenClock,
    simulator: SimulatorServer,
    smtp_sink: SmtpSink,
    database_url: str,
) -> Iterator[tuple[Runtime, httpx.Client]]:
    yield from start(tmp_path, clock, simulator, smtp_sink, DATABASE_URL=database_url)


def order(runtime: Runtime, order_id: str) -> Order:
    with runtime.database.transaction() as session:
        found = session.get(Order, order_id)
        assert found is not None
        return found


def test_a_checkout_creates_a_pending_order_and_a_whop_configuration_naming_it(
    service: tuple[Runtime, httpx.Client], simulator: SimulatorServer
) -> None:
    runtime, http = service
    response = http.post(
        "/api/checkouts", json={"plan_id": MESSAGE_PLAN, "email": "Buyer@Example.com"}
    )
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["order_id"].startswith("ord_")
    assert len(created["order_id"]) >= 24  # unguessable
    assert created["purchase_url"].startswith(simulator.url)
    pending = order(runtime, created["order_id"])
    assert (pending.status, pending.email, pending.checkout_configuration_id) == (
        "pending",
        "buyer@example.com",
        created["checkout_configuration_id"],
    )
    [call] = [c for c in simulator.state.calls() if c["path"].endswith("/checkout_configurations")]
    assert call["body"]["metadata"] == {"order_id": created["order_id"]}
    assert call["body"]["plan_id"] == MESSAGE_PLAN
    assert call["body"]["redirect_url"] == "https://shop.example.com/thanks"
    assert call["body"]["company_id"] == COMPANY
    state = http.get(f"/api/checkouts/{created['order_id']}").json()
    assert (state["status"], state["purchase_url"]) == ("pending", created["purchase_url"])
    assert "email" not in state


def test_the_paid_checkout_is_the_same_order_delivered_and_cancelled(
    service: tuple[Runtime, httpx.Client], simulator: SimulatorServer, clock: FrozenClock
) -> None:
    runtime, http = service
    created = http.post("/api/checkouts", json={"plan_id": MESSAGE_PLAN}).json()
    purchase = simulator.state.complete_checkout(
        created["checkout_configuration_id"], email="payer@example.com"
    )
    wait_for(lambda: simulator.state.pending_webhooks() == 0)
    assert http.get(f"/api/checkouts/{created['order_id']}").json()["status"] == "paid"
    drain(runtime)
    paid = order(runtime, created["order_id"])
    assert (paid.status, paid.whop_payment_id, paid.email) == (
        "delivered",
        purchase["payment_id"],
        "payer@example.com",
    )
    with runtime.database.transaction() as session:
        cancellation = session.scalars(select(Cancellation)).one()
    clock.advance(5)
    runtime.cancellations.run(cancellation.id)
    assert simulator.state.membership(purchase["membership_id"])["status"] == "canceled"
    assert http.get(f"/api/checkouts/{created['order_id']}").json()["status"] == "delivered"


def test_a_missing_membership_id_is_found_by_listing_the_customers_memberships(
    service: tuple[Runtime, httpx.Client], simulator: SimulatorServer, clock: FrozenClock
) -> None:
    runtime, http = service
    created = http.post("/api/checkouts", json={"plan_id": MESSAGE_PLAN}).json()
    purchase = simulator.state.complete_checkout(
        created["checkout_configuration_id"],
        email="quiet@example.com",
        shape="pinned",
        payment_has_membership_id=False,
        send_activation=False,
    )
    wait_for(lambda: simulator.state.pending_webhooks() == 0)
    drain(runtime)
    with runtime.database.transaction() as session:
        cancellation = session.scalars(select(Cancellation)).one()
    assert cancellation.membership_id is None
    clock.advance(301)
    runtime.cancellations.run(cancellation.id)
    with runtime.database.transaction() as session:
        row = session.get(Cancellation, cancellation.id)
        assert row is not None
        assert (row.status, row.membership_id) == ("canceled", purchase["membership_id"])
    lists = [
        c
        for c in simulator.state.calls()
        if c["method"] == "GET" and c["path"].endswith("/memberships")
    ]
    assert len(lists) == 1


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"plan_id": UNLISTED_PLAN}, 404),
        ({"plan_id": "not-a-plan"}, 422),
        ({"plan_id": MESSAGE_PLAN, "email": "nope"}, 422),
        ({"plan_id": MESSAGE_PLAN, "surprise": 1}, 422),
        ({}, 422),
    ],
)
def test_bad_requests_create_nothing(
    service: tuple[Runtime, httpx.Client], body: dict[str, Any], status: int
) -> None:
    runtime, http = service
    assert http.post("/api/checkouts", json=body).status_code == status
    with runtime.database.transaction() as session:
        assert session.scalars(select(Order)).first() is None


def test_whop_unreachable_is_503_and_the_order_stays_pending(
    service: tuple[Runtime, httpx.Client], simulator: SimulatorServer
) -> None:
    runtime, http = service
    simulator.state.set_outage(True)
    response = http.post("/api/checkouts", json={"plan_id": MESSAGE_PLAN})
    assert response.status_code == 503
    assert order(runtime, response.json()["order_id"]).status == "pending"


def test_unknown_orders_are_404(service: tuple[Runtime, httpx.Client]) -> None:
    _, http = service
    assert http.get("/api/checkouts/ord_doesnotexist").status_code == 404


@pytest.fixture
def guarded(
    tmp_path: Path,
    clock: FrozenClock,
    simulator: SimulatorServer,
    smtp_sink: SmtpSink,
    database_url: str,
) -> Iterator[tuple[Runtime, httpx.Client]]:
    yield from start(
        tmp_path,
        clock,
        simulator,
        smtp_sink,
        DATABASE_URL=database_url,
        CHECKOUT_TOKEN="s3cret-token",
        CHECKOUT_RATE_LIMIT="3/minute",
        CHECKOUT_CORS_ORIGINS="https://shop.example.com",
    )


def test_the_bearer_token_is_required_when_set(guarded: tuple[Runtime, httpx.Client]) -> None:
    _, http = guarded
    body = {"plan_id": MESSAGE_PLAN}
    assert http.post("/api/checkouts", json=body).status_code == 401
    assert (
        http.post(
            "/api/checkouts", json=body, headers={"Authorization": "Bearer wrong"}
        ).status_code
        == 401
    )
    assert (
        http.post(
            "/api/checkouts", json=body, headers={"Authorization": "Bearer s3cret-token"}
        ).status_code
        == 201
    )


def test_checkouts_are_rate_limited_per_client(guarded: tuple[Runtime, httpx.Client]) -> None:
    _, http = guarded
    headers = {"Authorization": "Bearer s3cret-token"}
    codes = [
        http.post("/api/checkouts", json={"plan_id": MESSAGE_PLAN}, headers=headers)
        for _ in range(4)
    ]
    assert [r.status_code for r in codes] == [201, 201, 201, 429]
    assert 1 <= int(codes[-1].headers["Retry-After"]) <= 61


def test_cors_allows_only_the_listed_origins(guarded: tuple[Runtime, httpx.Client]) -> None:
    _, http = guarded
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    allowed = http.options(
        "/api/checkouts", headers={**preflight, "Origin": "https://shop.example.com"}
    )
    assert allowed.headers.get("access-control-allow-origin") == "https://shop.example.com"
    other = http.options("/api/checkouts", headers={**preflight, "Origin": "https://evil.test"})
    assert "access-control-allow-origin" not in other.headers
