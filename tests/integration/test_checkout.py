"""POST/GET /api/checkouts over real HTTP, with the simulator as Whop."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import select

from support.harness import (
    MESSAGE_PLAN,
    STOCK_CATALOG,
    STOCK_PLAN,
    UNLISTED_PLAN,
    ServiceServer,
    apply_webhooks,
    deliver_event,
    drain,
    event_body,
    free_port,
    make_runtime,
    make_settings,
    wait_for,
)
from whop_autocancel.admin.stock import import_stock
from whop_autocancel.cancellation.models import Cancellation
from whop_autocancel.clock import FrozenClock
from whop_autocancel.delivery.stock import items_for
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
    apply_webhooks(runtime)  # what the worker does with the stored webhooks
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
        ([MESSAGE_PLAN], 422),
        (b'{"plan_id": "plan_Message1"', 400),  # not JSON
        (b"\xff\xfe", 400),  # not even text
    ],
)
def test_bad_requests_create_nothing_and_answer_the_error_shape(
    service: tuple[Runtime, httpx.Client], body: Any, status: int
) -> None:
    runtime, http = service
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = http.post(
        "/api/checkouts", content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"}, response.text
    with runtime.database.transaction() as session:
        assert session.scalars(select(Order)).first() is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"plan_id": "plan_" + "Echo" * 1500}, "plan_id"),
        ({"plan_id": "Echo" * 1500}, "plan_id"),
        ({"plan_id": MESSAGE_PLAN, "email": "Echo" * 1500 + "@example.com"}, "email"),
        ({"plan_id": MESSAGE_PLAN, "email": "Echo" * 1500}, "email"),
        ({"plan_id": MESSAGE_PLAN, "Echo" * 1500: 1}, "unknown field"),
        ({"plan_id": ["Echo" * 1500]}, "plan_id"),
    ],
)
def test_a_validation_failure_names_the_field_and_never_echoes_the_input(
    service: tuple[Runtime, httpx.Client], body: dict[str, Any], field: str
) -> None:
    _, http = service
    response = http.post("/api/checkouts", json=body)
    assert response.status_code == 422, response.text
    assert set(response.json()) == {"error"}
    assert field in response.json()["error"]
    assert "EchoEcho" not in response.text
    assert len(response.content) < 500


def test_a_body_that_is_not_json_by_its_content_type_is_refused(
    service: tuple[Runtime, httpx.Client],
) -> None:
    """A browser may send text/plain cross-site without asking (no CORS preflight): such a
    request must never create a checkout."""
    runtime, http = service
    response = http.post(
        "/api/checkouts",
        content=json.dumps({"plan_id": MESSAGE_PLAN}).encode(),
        headers={"Content-Type": "text/plain"},
    )
    assert response.status_code == 415, response.text
    assert set(response.json()) == {"error"}
    with runtime.database.transaction() as session:
        assert session.scalars(select(Order)).first() is None


def raw_post(url: str, headers: dict[str, str], chunks: Iterable[bytes]) -> tuple[int, bytes]:
    """POST over a bare socket, sending only `chunks` of the body, then read the answer: a
    server that waited for the rest of the body would time the test out (5 s) instead."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    request = f"POST /api/checkouts HTTP/1.1\r\nHost: {parts.netloc}\r\n{head}\r\n"
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as connection:
        connection.sendall(request.encode())
        for chunk in chunks:
            connection.sendall(chunk)
        answer = connection.makefile("rb")
        status = int(answer.readline().split(b" ", 2)[1])
        length = 0
        while (line := answer.readline().strip()) != b"":
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, answer.read(length)


def test_a_large_body_is_refused_by_its_declared_length_without_reading_it(
    service: tuple[Runtime, httpx.Client],
) -> None:
    runtime, http = service
    status, body = raw_post(
        str(http.base_url),
        {"Content-Type": "application/json", "Content-Length": str(10 * 1024 * 1024)},
        [b'{"plan_id": "' + b"A" * 1024],  # 1 KiB of the 10 MiB announced
    )
    assert status == 413
    assert set(json.loads(body)) == {"error"}
    response = http.post("/api/checkouts", json={"plan_id": MESSAGE_PLAN, "pad": "x" * 9000})
    assert response.status_code == 413
    with runtime.database.transaction() as session:
        assert session.scalars(select(Order)).first() is None


def test_a_chunked_body_is_cut_off_at_the_limit(service: tuple[Runtime, httpx.Client]) -> None:
    runtime, http = service
    chunk = b"A" * 1024
    status, body = raw_post(
        str(http.base_url),
        {"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        # 12 KiB of chunks and no final chunk: only a reader that stops at the cap answers.
        [b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(12)],
    )
    assert status == 413
    assert set(json.loads(body)) == {"error"}
    with runtime.database.transaction() as session:
        assert session.scalars(select(Order)).first() is None


@contextmanager
def garbling_server() -> Iterator[str]:
    """An HTTP server that answers every request 200 with a body that is not JSON."""

    class Garbled(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>maintenance</html>")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Garbled)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api/v1"
    finally:
        server.shutdown()
        server.server_close()


def whop_outage(simulator: SimulatorServer, url: str) -> dict[str, Any]:
    simulator.state.set_outage(True)
    return {}


def whop_error(simulator: SimulatorServer, url: str) -> dict[str, Any]:
    simulator.state.set_faults(error_rate=1.0)
    return {}


def whop_timeout(simulator: SimulatorServer, url: str) -> dict[str, Any]:
    # Whop creates the configuration, but our call gives up first.
    simulator.state.set_faults(timeout_rate=1.0, timeout_seconds=1.0)
    return {"CHECKOUT_TIMEOUT": 0.2}


def whop_refuses_the_key(simulator: SimulatorServer, url: str) -> dict[str, Any]:
    return {"WHOP_API_KEY": "sim_wrong_key"}


def whop_unreachable(simulator: SimulatorServer, url: str) -> dict[str, Any]:
    return {"WHOP_API_URL": f"http://127.0.0.1:{free_port()}/api/v1"}


def whop_garbled(simulator: SimulatorServer, url: str) -> dict[str, Any]:
    return {"WHOP_API_URL": url}


@pytest.mark.parametrize(
    "fault",
    [
        whop_outage,
        whop_error,
        whop_timeout,
        whop_refuses_the_key,
        whop_unreachable,
        whop_garbled,
    ],
)
def test_a_checkout_whop_could_not_create_is_503_and_its_order_abandoned(
    tmp_path: Path,
    clock: FrozenClock,
    simulator: SimulatorServer,
    smtp_sink: SmtpSink,
    database_url: str,
    fault: Callable[[SimulatorServer, str], dict[str, Any]],
) -> None:
    with garbling_server() as garbled:
        overrides = fault(simulator, garbled)
        with contextmanager(start)(
            tmp_path, clock, simulator, smtp_sink, DATABASE_URL=database_url, **overrides
        ) as (runtime, http):
            response = http.post(
                "/api/checkouts", json={"plan_id": MESSAGE_PLAN, "email": "caller@example.com"}
            )
            assert response.status_code == 503, response.text
            order_id = response.json()["order_id"]
            abandoned = order(runtime, order_id)
            assert (abandoned.status, abandoned.checkout_configuration_id) == ("abandoned", None)
            assert http.get(f"/api/checkouts/{order_id}").json()["status"] == "abandoned"


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_a_payment_after_a_failed_checkout_never_lands_on_its_order(
    service: tuple[Runtime, httpx.Client], simulator: SimulatorServer, clock: FrozenClock
) -> None:
    """Finding 1: the failed checkout's order was the only pending order of its plan, so the
    window rule handed it the next purchase of the plan, and the product went to the caller."""
    runtime, http = service
    simulator.state.set_outage(True)
    failed = http.post(
        "/api/checkouts", json={"plan_id": MESSAGE_PLAN, "email": "caller@example.com"}
    )
    assert failed.status_code == 503
    simulator.state.set_outage(False)
    for email in (None, "caller@example.com"):  # a stranger's, and the caller's own plain link
        purchase = simulator.state.create_purchase(MESSAGE_PLAN, send_webhooks=False)
        paid = clock.now() + timedelta(seconds=30)
        body = event_body(
            "payment.succeeded.legacy.json",
            id=purchase["payment_id"],
            status="paid",
            billing_reason="one_time",
            created_at=iso(paid - timedelta(seconds=2)),
            paid_at=iso(paid),
            checkout_configuration_id=None,
            metadata={},
            member={"id": purchase["member_id"], "phone": None},
            membership={"id": purchase["membership_id"], "status": "completed"},
            user={"id": purchase["user_id"], "username": "b", "name": "B", "email": email},
            plan={"id": MESSAGE_PLAN, "internal_notes": None, "metadata": {}},
            product={"id": purchase["product_id"], "title": "Product", "metadata": {}},
        )
        response = deliver_event(runtime, http, body)
        assert response.json() == {"status": "received"}, response.text
        with runtime.database.transaction() as session:
            landed = session.scalars(
                select(Order).where(Order.whop_payment_id == purchase["payment_id"])
            ).one()
        assert landed.id != failed.json()["order_id"]
    closed = order(runtime, failed.json()["order_id"])
    assert (closed.status, closed.whop_payment_id, closed.whop_membership_id) == (
        "abandoned",
        None,
        None,
    )


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


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        (None, 401),
        ("Bearer wrong", 401),
        ("Bearer s3cret-token-and-more", 401),
        ("s3cret-token", 401),  # no scheme
        ("Basic s3cret-token", 401),
        ("Bearers3cret-token", 401),
        ("Bearer s3cret-token", 201),
        ("bearer s3cret-token", 201),
    ],
)
def test_the_bearer_token_is_required_when_set(
    guarded: tuple[Runtime, httpx.Client], authorization: str | None, status: int
) -> None:
    _, http = guarded
    headers = {"Authorization": authorization} if authorization is not None else {}
    response = http.post("/api/checkouts", json={"plan_id": MESSAGE_PLAN}, headers=headers)
    assert response.status_code == status, response.text


@pytest.mark.parametrize(
    "content",
    [b"{not json", b'{"plan_id": "nope"}', b'{"plan_id": "' + b"A" * 20000 + b'"}'],
)
def test_the_token_is_checked_before_the_body_is_read(
    guarded: tuple[Runtime, httpx.Client], content: bytes
) -> None:
    _, http = guarded
    response = http.post(
        "/api/checkouts", content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 401, response.text
    assert response.json() == {"error": "missing or wrong bearer token"}


def test_the_rate_limit_is_checked_before_the_body_is_read(
    guarded: tuple[Runtime, httpx.Client],
) -> None:
    _, http = guarded
    headers = {"Authorization": "Bearer s3cret-token", "Content-Type": "application/json"}
    codes = [
        http.post("/api/checkouts", content=b"{not json", headers=headers).status_code
        for _ in range(4)
    ]
    assert codes == [400, 400, 400, 429]


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


def test_a_buyer_waiting_for_stock_sees_waiting_for_stock_not_a_failure(
    tmp_path: Path,
    clock: FrozenClock,
    simulator: SimulatorServer,
    smtp_sink: SmtpSink,
    database_url: str,
) -> None:
    (tmp_path / "catalog.toml").write_text(STOCK_CATALOG)
    with contextmanager(start)(
        tmp_path, clock, simulator, smtp_sink, DATABASE_URL=database_url
    ) as (runtime, http):
        created = http.post("/api/checkouts", json={"plan_id": STOCK_PLAN}).json()
        simulator.state.complete_checkout(
            created["checkout_configuration_id"], email="waiting@example.com"
        )
        wait_for(lambda: simulator.state.pending_webhooks() == 0)
        drain(runtime)
        waiting = order(runtime, created["order_id"])
        assert (waiting.status, waiting.waiting_for_stock) == ("delivery_failed", "keys")
        assert http.get(f"/api/checkouts/{created['order_id']}").json()["status"] == (
            "waiting_for_stock"
        )
        import_stock(runtime, "keys", items_for(["KEY-0001"]))
        drain(runtime)
        assert http.get(f"/api/checkouts/{created['order_id']}").json()["status"] == "delivered"


def test_the_openapi_schema_documents_the_checkout_body(
    tmp_path: Path, clock: FrozenClock, simulator: SimulatorServer, smtp_sink: SmtpSink
) -> None:
    with contextmanager(start)(tmp_path, clock, simulator, smtp_sink) as (_, http):
        schema = http.get("/openapi.json").json()
    body = schema["paths"]["/api/checkouts"]["post"]["requestBody"]
    assert body["required"] is True
    described = body["content"]["application/json"]["schema"]
    if "$ref" in described:
        described = schema["components"]["schemas"][described["$ref"].rsplit("/", 1)[1]]
    assert described["required"] == ["plan_id"]
    assert set(described["properties"]) == {"plan_id", "email"}
    assert described["additionalProperties"] is False


def test_the_openapi_schema_is_the_public_http_api_and_nothing_else(
    tmp_path: Path, clock: FrozenClock, simulator: SimulatorServer, smtp_sink: SmtpSink
) -> None:
    """`/openapi.json` is served on purpose (README): the contract a storefront codes against.
    It names this version and only what anyone may call; the dashboard and /metrics stay out."""
    import whop_autocancel

    with contextmanager(start)(tmp_path, clock, simulator, smtp_sink) as (_, http):
        response = http.get("/openapi.json")
        assert http.get("/docs").status_code == 404  # no interactive pages to keep safe
    assert response.status_code == 200
    schema = response.json()
    assert schema["info"]["version"] == whop_autocancel.__version__
    assert "storefront" in schema["info"]["description"]
    assert set(schema["paths"]) == {
        "/api/checkouts",
        "/api/checkouts/{order_id}",
        "/webhooks/whop",
        "/healthz",
        "/readyz",
    }
