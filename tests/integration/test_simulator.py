"""The Whop simulator over real HTTP: API semantics, faults, idempotency and webhook delivery."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from whop_autocancel.simulator import SUPPORTED_VERSIONS, SimulatorServer

API_KEY = "sim_test_key"
SECRET = "ws_0f3a9c27e4b14d8fa6c2b5e81d907a3c5e6f1b2d4c8a9e07"
PINNED = "2026-09-29"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


# ----- a tiny webhook receiver --------------------------------------------------------------


class Receiver:
    """An HTTP server on 127.0.0.1 that records deliveries and fails the first `fail_first`."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.received: list[tuple[dict[str, str], bytes]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver._lock:
                    receiver.received.append((dict(self.headers.items()), body))
                    failing = len(receiver.received) <= receiver.fail_first
                self.send_response(500 if failing else 200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/webhooks/whop"

    def bodies(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(body) for _, body in self.received]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# ----- fixtures and helpers -----------------------------------------------------------------


@pytest.fixture
def sim() -> Iterator[SimulatorServer]:
    with SimulatorServer(api_key=API_KEY, webhook_secret=SECRET, time_scale=0.01) as server:
        yield server


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    yield rec
    rec.close()


@pytest.fixture
def client(sim: SimulatorServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.url, timeout=5.0) as c:
        yield c


def buy(client: httpx.Client, **fields: Any) -> dict[str, Any]:
    response = client.post("/_sim/purchases", json={"plan_id": "plan_Test", **fields})
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def cancel(
    client: httpx.Client,
    membership_id: str,
    body: dict[str, Any] | None = None,
    *,
    version: str | None = None,
    key: str | None = None,
    auth: dict[str, str] = AUTH,
) -> httpx.Response:
    headers = dict(auth)
    if version is not None:
        headers["Api-Version-Date"] = version
    if key is not None:
        headers["Idempotency-Key"] = key
    path = f"/api/v1/memberships/{membership_id}/cancel"
    if body is None:
        return client.post(path, headers=headers)
    return client.post(path, headers=headers, json=body)


def retrieve(
    client: httpx.Client, membership_id: str, version: str | None = None
) -> httpx.Response:
    headers = dict(AUTH)
    if version is not None:
        headers["Api-Version-Date"] = version
    return client.get(f"/api/v1/memberships/{membership_id}", headers=headers)


def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.01)


def parse_at(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def assert_error(response: httpx.Response, status: int, error_type: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == error_type
    assert isinstance(error["message"], str)
    assert error["message"]
    return error


# ----- retrieve -------------------------------------------------------------------------------


def test_retrieve_legacy_and_versioned_shapes(client: httpx.Client) -> None:
    ids = buy(client, email="ann@example.com", metadata={"order_id": "o1"})
    mid = ids["membership_id"]

    legacy = retrieve(client, mid).json()
    assert legacy["id"] == mid
    assert legacy["status"] == "completed"
    assert legacy["user"]["email"] == "ann@example.com"
    assert legacy["member"] == {"id": ids["member_id"]}
    assert legacy["plan"]["id"] == "plan_Test"
    assert legacy["company"]["id"] == "biz_SimStore"
    assert legacy["metadata"] == {"order_id": "o1"}
    assert legacy["initial_price_paid"] == "$25.00"
    assert "plan_id" not in legacy
    assert "account" not in legacy

    for version in SUPPORTED_VERSIONS:
        versioned = retrieve(client, mid, version).json()
        assert versioned["id"] == mid
        assert versioned["plan_id"] == "plan_Test"
        assert versioned["user_id"] == ids["user_id"]
        assert versioned["member_id"] == ids["member_id"]
        assert versioned["account"]["id"] == "biz_SimStore"
        assert versioned["initial_price"] == {
            "amount": "25.00",
            "currency": "usd",
            "decimals": 2,
            "display_decimals": 2,
        }
        assert "user" not in versioned
        assert "plan" not in versioned


def test_subscription_purchase_is_active(client: httpx.Client) -> None:
    mid = buy(client, billing_reason="subscription_create")["membership_id"]
    assert retrieve(client, mid).json()["status"] == "active"


def test_unknown_membership_is_404(client: httpx.Client) -> None:
    assert_error(retrieve(client, "mem_doesnotexist"), 404, "not_found")
    assert_error(cancel(client, "mem_doesnotexist", {}), 404, "not_found")
    assert client.get("/_sim/memberships/mem_doesnotexist").status_code == 404


def test_bad_key_is_401(client: httpx.Client) -> None:
    mid = buy(client)["membership_id"]
    wrong = cancel(client, mid, {"cancellation_mode": "immediate"}, auth={"Authorization": "x"})
    assert_error(wrong, 401, "unauthorized")
    missing = client.get(f"/api/v1/memberships/{mid}")
    assert_error(missing, 401, "unauthorized")
    assert retrieve(client, mid).json()["status"] == "completed"


def test_unknown_version_is_400_listing_supported(client: httpx.Client) -> None:
    mid = buy(client)["membership_id"]
    error = assert_error(retrieve(client, mid, "2025-01-01"), 400, "bad_request")
    for version in SUPPORTED_VERSIONS:
        assert version in error["message"]


# ----- cancel semantics -----------------------------------------------------------------------


def test_legacy_cancel_without_mode_only_flags_period_end(client: httpx.Client) -> None:
    mid = buy(client)["membership_id"]
    bodies: list[dict[str, Any] | None] = [None, {}]
    for body in bodies:
        response = cancel(client, mid, body)
        assert response.status_code == 200
        data = response.json()
        assert data["status"] == "completed"
        assert data["cancel_at_period_end"] is True
        assert data["canceled_at"] is None
    assert client.get(f"/_sim/memberships/{mid}").json()["membership"]["status"] == "completed"


def test_legacy_immediate_cancel(client: httpx.Client) -> None:
    mid = buy(client)["membership_id"]
    response = cancel(client, mid, {"cancellation_mode": "immediate", "reason": "auto"})
    assert response.status_code == 200
    data = response.json()
    assert data["status"] == "canceled"
    assert data["canceled_at"] is not None
    assert data["cancellation_reason"] == "auto"
    assert "user" in data  # the legacy shape comes back
    view = client.get(f"/_sim/memberships/{mid}").json()
    assert view["membership"]["status"] == "canceled"
    assert view["membership"]["plan_id"] == "plan_Test"
    assert [c["status"] for c in view["calls"]] == [200]


@pytest.mark.parametrize("body", [None, {}, {"cancel_at_period_end": False}])
def test_versioned_cancel_omitted_or_false_is_immediate(
    client: httpx.Client, body: dict[str, Any] | None
) -> None:
    mid = buy(client)["membership_id"]
    response = cancel(client, mid, body, version=PINNED)
    assert response.status_code == 200
    data = response.json()
    assert data["status"] == "canceled"
    assert data["canceled_at"] is not None
    assert data["cancellation_reason"]
    assert data["plan_id"] == "plan_Test"  # the versioned shape comes back


def test_versioned_cancel_at_period_end_only_flags(client: httpx.Client) -> None:
    mid = buy(client)["membership_id"]
    data = cancel(client, mid, {"cancel_at_period_end": True}, version=PINNED).json()
    assert data["status"] == "completed"
    assert data["cancel_at_period_end"] is True


def test_second_cancel_is_409(client: httpx.Client) -> None:
    mid = buy(client)["membership_id"]
    assert cancel(client, mid, {"cancellation_mode": "immediate"}).status_code == 200
    error = assert_error(cancel(client, mid, {"cancellation_mode": "immediate"}), 409, "conflict")
    assert error["message"] == "Membership is already canceled"
    assert_error(cancel(client, mid, {}, version=PINNED), 409, "conflict")


def test_invalid_cancel_mode_is_400(client: httpx.Client) -> None:
    mid = buy(client)["membership_id"]
    assert_error(cancel(client, mid, {"cancellation_mode": "now"}), 400, "bad_request")
    assert retrieve(client, mid).json()["cancel_at_period_end"] is False


def test_idempotent_replay(client: httpx.Client, sim: SimulatorServer) -> None:
    mid = buy(client, send_webhooks=False)["membership_id"]
    body = {"cancellation_mode": "immediate"}
    first = cancel(client, mid, body, key="cancel-1-1")
    second = cancel(client, mid, body, key="cancel-1-1")
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    other_key = cancel(client, mid, body, key="cancel-1-2")
    assert other_key.status_code == 409

    calls = client.get("/_sim/calls", params={"membership_id": mid}).json()["calls"]
    assert [(c["idempotency_key"], c["status"], c["replayed"]) for c in calls] == [
        ("cancel-1-1", 200, False),
        ("cancel-1-1", 200, True),
        ("cancel-1-2", 409, False),
    ]
    wait_for(lambda: sim.state.pending_webhooks() == 0)
    echoes = [d for d in sim.state.deliveries() if d["type"] == "membership.deactivated"]
    assert len(echoes) == 1  # the replay changed nothing and sent nothing


def test_calls_are_recorded(client: httpx.Client) -> None:
    mid = buy(client)["membership_id"]
    cancel(client, mid, {"cancellation_mode": "immediate"}, version=PINNED, key="k1")
    (call,) = client.get("/_sim/calls", params={"membership_id": mid}).json()["calls"]
    assert call["method"] == "POST"
    assert call["path"] == f"/api/v1/memberships/{mid}/cancel"
    assert call["membership_id"] == mid
    assert call["status"] == 200
    assert call["idempotency_key"] == "k1"
    assert call["api_version_date"] == PINNED
    assert call["body"] == {"cancellation_mode": "immediate"}
    assert call["replayed"] is False
    assert call["at"].endswith("Z")
    assert isinstance(call["seq"], int)


# ----- faults ---------------------------------------------------------------------------------


def test_outage_answers_503(client: httpx.Client) -> None:
    mid = buy(client)["membership_id"]
    assert client.post("/_sim/outage", json={"enabled": True}).status_code == 200
    assert_error(retrieve(client, mid), 503, "service_unavailable")
    assert_error(
        cancel(client, mid, {"cancellation_mode": "immediate"}), 503, "service_unavailable"
    )
    client.post("/_sim/outage", json={"enabled": False})
    assert retrieve(client, mid).json()["status"] == "completed"
    calls = client.get("/_sim/calls", params={"membership_id": mid}).json()["calls"]
    assert [c["status"] for c in calls] == [503, 503, 200]


def test_forbidden_answers_403_on_cancel(client: httpx.Client) -> None:
    mid = buy(client)["membership_id"]
    client.post("/_sim/forbidden", json={"enabled": True})
    error = assert_error(cancel(client, mid, {"cancellation_mode": "immediate"}), 403, "forbidden")
    assert "membership:cancel" in error["message"]
    assert retrieve(client, mid).status_code == 200
    client.post("/_sim/forbidden", json={"enabled": False})
    assert cancel(client, mid, {"cancellation_mode": "immediate"}).status_code == 200


def test_rejected_membership(client: httpx.Client) -> None:
    mid = buy(client)["membership_id"]
    assert client.post(f"/_sim/memberships/{mid}/reject", json={}).status_code == 200
    error = assert_error(cancel(client, mid, {}, version=PINNED), 422, "unprocessable_entity")
    assert error["message"] == "This membership cannot be canceled"
    assert retrieve(client, mid).json()["status"] == "completed"

    client.post(f"/_sim/memberships/{mid}/reject", json={"status": 400})
    assert cancel(client, mid, {}, version=PINNED).status_code == 400

    assert client.delete(f"/_sim/memberships/{mid}/reject").status_code == 200
    assert cancel(client, mid, {}, version=PINNED).json()["status"] == "canceled"


# ----- purchases and webhooks -----------------------------------------------------------------


def test_legacy_purchase_webhooks(client: httpx.Client, receiver: Receiver) -> None:
    client.post("/_sim/config", json={"webhook_url": receiver.url})
    ids = buy(client, email="bo@example.com", checkout_configuration_id="ch_X", metadata={"o": 1})
    wait_for(lambda: len(receiver.received) == 2)
    payment, activation = receiver.bodies()
    assert [payment["id"], activation["id"]] == ids["webhook_ids"]
    assert payment["type"] == "payment.succeeded"
    assert payment["api_version"] == "v1"
    assert payment["api_version_date"] is None
    assert payment["company_id"] == "biz_SimStore"
    assert "account_id" not in payment
    data = payment["data"]
    assert data["id"] == ids["payment_id"]
    assert (data["status"], data["substatus"], data["billing_reason"]) == (
        "paid",
        "succeeded",
        "one_time",
    )
    assert data["membership"]["id"] == ids["membership_id"]
    assert data["membership"]["status"] == "completed"
    assert data["user"] == {
        "id": ids["user_id"],
        "username": data["user"]["username"],
        "name": data["user"]["name"],
        "email": "bo@example.com",
    }
    assert data["plan"]["id"] == "plan_Test"
    assert data["total"] == 25.0
    assert data["checkout_configuration_id"] == "ch_X"
    assert data["metadata"] == {"o": 1}
    assert parse_at(data["created_at"]) < parse_at(data["paid_at"])
    assert data["paid_at"].endswith("Z")
    assert len(data["paid_at"]) == len("2026-11-20T14:03:09.877Z")
    assert activation["type"] == "membership.activated"
    assert activation["data"]["id"] == ids["membership_id"]
    assert activation["data"]["user"]["email"] == "bo@example.com"


def test_pinned_purchase_webhooks(client: httpx.Client, receiver: Receiver) -> None:
    client.post("/_sim/config", json={"webhook_url": receiver.url})
    ids = buy(client, shape="pinned", email="cy@example.com", amount="9.5")
    wait_for(lambda: len(receiver.received) == 2)
    payment, activation = receiver.bodies()
    assert payment["api_version_date"] == PINNED
    assert payment["account_id"] == "biz_SimStore"
    assert "company_id" not in payment
    data = payment["data"]
    assert data["membership_id"] == ids["membership_id"]
    assert data["customer_email"] == "cy@example.com"
    assert data["plan_id"] == "plan_Test"
    assert data["total"] == {
        "amount": "9.50",
        "currency": "usd",
        "decimals": 2,
        "display_decimals": 2,
    }
    assert "email" not in data["user"]
    assert activation["type"] == "membership.activated"
    assert activation["data"]["plan_id"] == "plan_Test"
    assert activation["data"]["member_id"] == ids["member_id"]


def test_activation_first_order(client: httpx.Client, receiver: Receiver) -> None:
    client.post("/_sim/config", json={"webhook_url": receiver.url})
    buy(client, activation_first=True)
    wait_for(lambda: len(receiver.received) == 2)
    assert [b["type"] for b in receiver.bodies()] == ["membership.activated", "payment.succeeded"]


def test_echo_webhook_type_per_shape(client: httpx.Client, receiver: Receiver) -> None:
    client.post("/_sim/config", json={"webhook_url": receiver.url})
    legacy = buy(client, send_webhooks=False)["membership_id"]
    pinned = buy(client, shape="pinned", send_webhooks=False)["membership_id"]
    # The echo follows the purchase's webhook shape, not the cancel request's version header.
    cancel(client, legacy, {}, version=PINNED)
    cancel(client, pinned, {"cancellation_mode": "immediate"})
    wait_for(lambda: len(receiver.received) == 2)
    by_member = {b["data"]["id"]: b for b in receiver.bodies()}

    deactivated = by_member[legacy]
    assert deactivated["type"] == "membership.deactivated"
    assert deactivated["company_id"] == "biz_SimStore"
    assert deactivated["data"]["status"] == "canceled"
    assert "previous_attributes" not in deactivated

    updated = by_member[pinned]
    assert updated["type"] == "membership.updated"
    assert updated["account_id"] == "biz_SimStore"
    assert updated["api_version_date"] == PINNED
    assert updated["data"]["status"] == "canceled"
    assert updated["previous_attributes"] == {
        "status": "completed",
        "canceled_at": None,
        "cancellation_reason": None,
    }


def test_no_echo_for_period_end_cancel(client: httpx.Client, sim: SimulatorServer) -> None:
    mid = buy(client, send_webhooks=False)["membership_id"]
    cancel(client, mid, {"cancellation_mode": "at_period_end"})
    cancel(client, mid, {"cancellation_mode": "immediate"})
    wait_for(lambda: len(sim.state.deliveries()) == 1)
    assert sim.state.deliveries()[0]["type"] == "membership.deactivated"


def test_signatures_verify(client: httpx.Client, receiver: Receiver) -> None:
    client.post("/_sim/config", json={"webhook_url": receiver.url})
    buy(client)
    buy(client, shape="pinned")
    wait_for(lambda: len(receiver.received) == 4)
    verifier = Webhook(SECRET.encode())
    for headers, body in receiver.received:
        assert headers["content-type"] == "application/json"
        assert headers["webhook-signature"].startswith("v1,")
        parsed = verifier.verify(body, headers)
        assert parsed["id"] == headers["webhook-id"]
        assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
        with pytest.raises(WebhookVerificationError):
            verifier.verify(body.replace(b'"v1"', b'"v2"'), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(b"ws_wrong").verify(receiver.received[0][1], receiver.received[0][0])


def test_redelivery_follows_scaled_schedule() -> None:
    receiver = Receiver(fail_first=2)
    try:
        with SimulatorServer(
            api_key=API_KEY, webhook_secret=SECRET, webhook_url=receiver.url, time_scale=0.02
        ) as sim:
            sim.state.create_purchase("plan_Test", send_activation=False)
            wait_for(lambda: len(sim.state.deliveries()) == 3 and sim.state.pending_webhooks() == 0)
            attempts = sim.state.deliveries()
    finally:
        receiver.close()
    assert [(d["attempt"], d["status"]) for d in attempts] == [(1, 500), (2, 500), (3, 200)]
    assert attempts[0]["error"] == "HTTP 500"
    assert attempts[2]["error"] is None
    assert len({d["webhook_id"] for d in attempts}) == 1
    assert len({body for _, body in receiver.received}) == 1  # identical bytes each time
    at = [parse_at(d["at"]) for d in attempts]
    first_gap, second_gap = at[1] - at[0], at[2] - at[1]
    assert first_gap >= 10 * 0.02 - 0.002
    assert 1.6 < second_gap / first_gap < 2.4


def test_dropped_after_four_failed_attempts() -> None:
    receiver = Receiver(fail_first=100)
    try:
        with SimulatorServer(api_key=API_KEY, webhook_secret=SECRET, time_scale=0.02) as sim:
            sim.state.set_webhook_url(receiver.url)
            sim.state.create_purchase("plan_Test", send_activation=False)
            wait_for(lambda: len(sim.state.deliveries()) == 4 and sim.state.pending_webhooks() == 0)
            time.sleep(0.1)
            attempts = sim.state.deliveries()
            assert sim.state.pending_webhooks() == 0  # nothing is scheduled any more: dropped
    finally:
        receiver.close()
    assert [d["attempt"] for d in attempts] == [1, 2, 3, 4]
    assert all(d["status"] == 500 for d in attempts)
    at = [parse_at(d["at"]) for d in attempts]
    gaps = [b - a for a, b in itertools.pairwise(at)]
    assert 1.5 < gaps[1] / gaps[0] < 2.5
    assert 1.5 < gaps[2] / gaps[1] < 2.5


def test_unreachable_receiver_is_recorded_as_error() -> None:
    receiver = Receiver()
    url = receiver.url
    receiver.close()
    with SimulatorServer(api_key=API_KEY, webhook_secret=SECRET, webhook_url=url) as sim:
        sim.state.create_purchase("plan_Test", send_activation=False)
        wait_for(lambda: len(sim.state.deliveries()) == 1)
        (attempt,) = sim.state.deliveries()
        assert attempt["status"] is None
        assert attempt["error"]
        assert sim.state.pending_webhooks() == 1  # the redelivery is scheduled at +10 s


def test_duplicate_payment_webhook_reuses_the_id(client: httpx.Client, receiver: Receiver) -> None:
    client.post("/_sim/config", json={"webhook_url": receiver.url})
    ids = buy(client, duplicate_payment_webhook=True)
    wait_for(lambda: len(receiver.received) == 3)
    payments = [(h["webhook-id"], b) for h, b in receiver.received if b"payment.succeeded" in b]
    assert len(payments) == 2
    assert payments[0] == payments[1]
    assert ids["webhook_ids"].count(payments[0][0]) == 2


def test_pinned_payment_without_membership_id(client: httpx.Client, receiver: Receiver) -> None:
    client.post("/_sim/config", json={"webhook_url": receiver.url})
    ids = buy(client, shape="pinned", payment_has_membership_id=False)
    wait_for(lambda: len(receiver.received) == 2)
    by_type = {b["type"]: b for b in receiver.bodies()}
    assert "membership_id" in by_type["payment.succeeded"]["data"]
    assert by_type["payment.succeeded"]["data"]["membership_id"] is None
    assert by_type["membership.activated"]["data"]["id"] == ids["membership_id"]


def test_no_webhook_url_is_recorded_as_undeliverable(client: httpx.Client) -> None:
    ids = buy(client)
    wait_for(lambda: client.get("/_sim/webhooks").json()["pending"] == 0)
    deliveries = client.get("/_sim/webhooks").json()["deliveries"]
    assert [d["webhook_id"] for d in deliveries] == ids["webhook_ids"]
    assert all(d["error"] == "no webhook_url" and d["status"] is None for d in deliveries)


def test_server_lifecycle() -> None:
    sim = SimulatorServer(api_key=API_KEY, webhook_secret=SECRET)
    with pytest.raises(RuntimeError):
        _ = sim.url
    sim.start()
    try:
        assert sim.api_url == sim.url + "/api/v1"
        assert sim.url.startswith("http://127.0.0.1:")
        assert httpx.get(sim.url + "/_sim/calls").json() == {"calls": []}
    finally:
        sim.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(sim.url + "/_sim/calls")
