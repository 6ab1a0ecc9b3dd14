"""The Whop simulator over real HTTP: API semantics, faults, idempotency and webhook delivery."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from support.harness import wait_for
from support.receiver import Receiver
from whop_autocancel.simulator import SUPPORTED_VERSIONS, SimulatorServer

API_KEY = "sim_test_key"
SECRET = "ws_0f3a9c27e4b14d8fa6c2b5e81d907a3c5e6f1b2d4c8a9e07"
PINNED = "2026-09-29"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


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


def test_a_wrong_key_is_401_and_a_missing_permission_403(client: httpx.Client) -> None:
    """An unknown key is refused as a whole (401); a known key that lacks a permission is
    refused (403, the permission named) on the endpoints that need it, and only there."""
    mid = buy(client)["membership_id"]
    wrong = {"Authorization": "Bearer not_the_key"}
    error = assert_error(
        client.get("/api/v1/memberships", params={"company_id": "biz_SimStore"}, headers=wrong),
        401,
        "unauthorized",
    )
    assert error["message"] == "Invalid or missing API key"

    answer = client.post("/_sim/permissions", json={"missing": ["member:basic:read"]})
    assert answer.json() == {"missing": ["member:basic:read"]}
    assert client.get("/_sim/faults").json()["missing_permissions"] == ["member:basic:read"]
    for response in (
        api_get(client, "/memberships", {"company_id": "biz_SimStore"}),
        retrieve(client, mid),
        retrieve(client, "mem_Unknown"),  # the permission is checked before the id
    ):
        error = assert_error(response, 403, "forbidden")
        assert error["message"] == "The API key lacks the member:basic:read permission"
    assert api_get(client, "/payments", {"company_id": "biz_SimStore"}).status_code == 200
    assert api_get(client, "/plans/plan_Test").status_code == 200

    calls: dict[str, Callable[[], httpx.Response]] = {
        "payment:basic:read": lambda: api_get(client, "/payments", {"company_id": "biz_SimStore"}),
        "plan:basic:read": lambda: api_get(client, "/plans/plan_Test"),
        "membership:cancel": lambda: cancel(client, mid, {"cancellation_mode": "immediate"}),
        "checkout_configuration:create": lambda: create_checkout(client, {"plan_id": "plan_Test"}),
        "checkout_configuration:basic:read": lambda: api_get(
            client, "/checkout_configurations/ch_Unknown"
        ),
    }
    client.post("/_sim/permissions", json={"missing": sorted(calls)})
    for permission, call in calls.items():
        error = assert_error(call(), 403, "forbidden")
        assert error["message"] == f"The API key lacks the {permission} permission"
    # member:basic:read is granted again; the refused cancel changed nothing.
    assert retrieve(client, mid).json()["status"] == "completed"

    assert client.post("/_sim/permissions", json={"missing": []}).json() == {"missing": []}
    assert cancel(client, mid, {"cancellation_mode": "immediate"}).status_code == 200
    refused = client.post("/_sim/permissions", json={"missing": ["member:basic:raed"]})
    assert refused.status_code == 422
    assert "member:basic:raed" in refused.text


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


def test_a_rejected_membership_can_refuse_reads_too(client: httpx.Client) -> None:
    mid = buy(client)["membership_id"]
    rejected = client.post(
        f"/_sim/memberships/{mid}/reject", json={"status": 409, "read_status": 503}
    )
    assert rejected.json() == {"membership_id": mid, "status": 409, "read_status": 503}
    assert cancel(client, mid, {"cancellation_mode": "immediate"}).status_code == 409
    assert_error(retrieve(client, mid), 503, "service_unavailable")
    client.delete(f"/_sim/memberships/{mid}/reject")
    assert retrieve(client, mid).json()["status"] == "completed"


def test_answer_as_another_membership(client: httpx.Client, sim: SimulatorServer) -> None:
    """A cancel (or read) of one membership answered with another's object; nothing changes."""
    mine, other = buy(client)["membership_id"], buy(client)["membership_id"]
    sim.state.answer_as(mine, other)
    for version in (None, PINNED):
        answer = cancel(client, mine, {"cancellation_mode": "immediate"}, version=version)
        assert (answer.status_code, answer.json()["id"]) == (200, other)
        assert retrieve(client, mine, version).json()["id"] == other
    assert sim.state.membership(mine)["status"] == "completed"
    assert sim.state.membership(other)["status"] == "completed"
    sim.state.answer_as(mine, None)
    assert retrieve(client, mine).json()["id"] == mine
    with pytest.raises(KeyError):
        sim.state.answer_as(mine, "mem_Nobody1")


def test_forgotten_idempotency_keys_are_not_replayed(
    client: httpx.Client, sim: SimulatorServer
) -> None:
    """Whop's retention window passed: the same key is a new request."""
    mid = buy(client, send_webhooks=False)["membership_id"]
    body = {"cancellation_mode": "immediate"}
    assert cancel(client, mid, body, key="k1").status_code == 200
    sim.state.forget_idempotency_keys()
    again = cancel(client, mid, body, key="k1")
    assert again.status_code == 409
    assert sim.state.calls(mid)[-1]["replayed"] is False


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
    # Both cancels have queued whatever they send by now; wait until all of it is attempted.
    wait_for(lambda: sim.state.pending_webhooks() == 0)
    assert [d["type"] for d in sim.state.deliveries()] == ["membership.deactivated"]


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
            # pending 0 after the 4th attempt: no 5th is scheduled, the event is dropped.
            wait_for(lambda: len(sim.state.deliveries()) == 4 and sim.state.pending_webhooks() == 0)
            attempts = sim.state.deliveries()
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


def test_a_hidden_email_is_in_no_payload_and_no_answer(
    client: httpx.Client, receiver: Receiver
) -> None:
    """`email_visible: false`: Whop does not tell the buyer's email (a key without
    member:email:read), in the webhooks or the API, in either shape."""
    client.post("/_sim/config", json={"webhook_url": receiver.url})
    legacy = buy(client, email="hidden@example.com", email_visible=False)
    pinned = buy(client, email="hidden@example.com", email_visible=False, shape="pinned")
    wait_for(lambda: len(receiver.received) == 4)
    assert b"hidden@example.com" not in b"".join(body for _, body in receiver.snapshot())
    by_type = {(b["type"], "account_id" in b): b["data"] for b in receiver.bodies()}
    assert by_type[("payment.succeeded", False)]["user"]["email"] is None
    assert by_type[("payment.succeeded", True)]["customer_email"] is None
    assert by_type[("membership.activated", False)]["user"]["email"] is None
    for version in (None, PINNED):
        for path in ("/memberships", "/payments"):
            answer = api_get(client, path, {"company_id": "biz_SimStore"}, version)
            assert answer.status_code == 200
            assert "hidden@example.com" not in answer.text
        for bought in (legacy, pinned):
            answer = retrieve(client, bought["membership_id"], version)
            assert answer.status_code == 200
            assert "hidden@example.com" not in answer.text
    seen = buy(client, email="seen@example.com")
    assert retrieve(client, seen["membership_id"]).json()["user"]["email"] == "seen@example.com"


def test_record_times_follow_the_clock_given() -> None:
    """With `clock`, what the simulator records (and lists by) is at the clock's time: a test
    that moves its clock moves Whop's too."""
    moment = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    with SimulatorServer(api_key=API_KEY, clock=lambda: moment) as server:
        state = server.state
        bought = state.create_purchase("plan_Clock", email="clock@example.com")
        membership = state.membership(bought["membership_id"])
        assert membership["created_at"] == "2030-01-02T03:04:05.648Z"  # 30 ms before, in ms
        with httpx.Client(base_url=server.url, timeout=5.0) as http:
            payment = api_get(http, f"/payments/{bought['payment_id']}").json()
            assert payment["created_at"] == "2030-01-02T03:04:03.678Z"  # 2 s before paying
            later = {"company_id": "biz_SimStore", "created_after": "2030-01-02T03:04:06Z"}
            assert ids_of(api_get(http, "/memberships", later)) == []
            moment = datetime(2030, 1, 3, tzinfo=UTC)
            immediate = {"cancellation_mode": "immediate"}
            assert cancel(http, bought["membership_id"], immediate).status_code == 200
        (call,) = state.calls(since=state.call_count() - 1)
        assert call["at"] == "2030-01-03T00:00:00.000Z"
        assert state.membership(bought["membership_id"])["canceled_at"] == call["at"]


def test_calls_since_and_call_count(client: httpx.Client, sim: SimulatorServer) -> None:
    first = buy(client)["membership_id"]
    second = buy(client)["membership_id"]
    retrieve(client, first)
    retrieve(client, second)
    assert sim.state.call_count() == 2
    (later,) = sim.state.calls(since=1)
    assert (later["seq"], later["membership_id"]) == (2, second)
    assert sim.state.calls(first, since=1) == []
    assert sim.state.calls(since=2) == []


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


# ----- lists: memberships ---------------------------------------------------------------------


def api_get(
    client: httpx.Client,
    path: str,
    params: Sequence[tuple[str, str]] | Mapping[str, str] | None = None,
    version: str | None = None,
) -> httpx.Response:
    headers = dict(AUTH)
    if version is not None:
        headers["Api-Version-Date"] = version
    pairs = tuple(params.items()) if isinstance(params, Mapping) else tuple(params or ())
    return client.get(f"/api/v1{path}", params=pairs, headers=headers)


def ids_of(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["data"]]


COMPANY_ID = "biz_SimStore"


def test_legacy_list_requires_our_company_id(client: httpx.Client) -> None:
    mid = buy(client, send_webhooks=False)["membership_id"]
    error = assert_error(api_get(client, "/memberships"), 400, "bad_request")
    assert "company_id" in error["message"]
    assert_error(api_get(client, "/payments"), 400, "bad_request")
    assert_error(api_get(client, "/memberships", {"company_id": "biz_Other"}), 403, "forbidden")
    assert ids_of(api_get(client, "/memberships", {"company_id": COMPANY_ID})) == [mid]
    # The versioned model needs no account; a foreign one narrows the list to nothing.
    assert ids_of(api_get(client, "/memberships", version=PINNED)) == [mid]
    assert ids_of(api_get(client, "/memberships", {"account_id": COMPANY_ID}, PINNED)) == [mid]
    assert ids_of(api_get(client, "/memberships", {"account_id": "biz_Other"}, PINNED)) == []


def test_list_memberships_filters(client: httpx.Client) -> None:
    a1 = buy(client, plan_id="plan_A", product_id="prod_A", send_webhooks=False)
    a2 = buy(client, plan_id="plan_A", send_webhooks=False)
    b = buy(client, plan_id="plan_B", send_webhooks=False)
    sub = buy(client, plan_id="plan_S", billing_reason="subscription_create", send_webhooks=False)
    cancel(client, b["membership_id"], {"cancellation_mode": "immediate"})
    legacy = [("company_id", COMPANY_ID)]

    def legacy_ids(*params: tuple[str, str]) -> set[str]:
        return set(ids_of(api_get(client, "/memberships", legacy + list(params))))

    def versioned_ids(*params: tuple[str, str]) -> set[str]:
        return set(ids_of(api_get(client, "/memberships", list(params), PINNED)))

    a_ids = {a1["membership_id"], a2["membership_id"]}
    assert legacy_ids(("plan_ids", "plan_A")) == a_ids
    assert legacy_ids(("plan_ids[]", "plan_A")) == a_ids
    assert legacy_ids(("plan_ids", "plan_A"), ("plan_ids[]", "plan_B")) == a_ids | {
        b["membership_id"]
    }
    assert legacy_ids(("product_ids", "prod_A")) == a_ids  # the plan's product, for both
    assert legacy_ids(("user_ids", a2["user_id"])) == {a2["membership_id"]}
    assert legacy_ids(("statuses[]", "canceled")) == {b["membership_id"]}
    assert legacy_ids(("statuses", "completed"), ("statuses", "active")) == a_ids | {
        sub["membership_id"]
    }
    assert legacy_ids(("promo_code_ids", "promo_X")) == set()
    assert_error(
        api_get(client, "/memberships", [*legacy, ("statuses", "one_time")]), 400, "bad_request"
    )

    assert versioned_ids(("plan_id", "plan_A")) == a_ids
    assert versioned_ids(("plan_ids", "plan_A"), ("plan_ids", "plan_S")) == a_ids | {
        sub["membership_id"]
    }
    assert versioned_ids(("user_id", a1["user_id"])) == {a1["membership_id"]}
    assert versioned_ids(("member_id", a1["member_id"])) == {a1["membership_id"]}
    assert versioned_ids(("status", "one_time")) == a_ids  # one-time purchases still granting
    assert versioned_ids(("statuses", "active")) == {sub["membership_id"]}
    assert_error(
        api_get(client, "/memberships", {"status": "sleeping"}, PINNED), 400, "bad_request"
    )

    # A period-end cancel moves a live membership into the derived `canceling` bucket.
    cancel(client, sub["membership_id"], {"cancel_at_period_end": True}, version=PINNED)
    assert versioned_ids(("status", "canceling")) == {sub["membership_id"]}
    assert versioned_ids(("status", "active")) == set()
    assert legacy_ids(("statuses", "active")) == {sub["membership_id"]}


def test_list_memberships_created_window(client: httpx.Client, sim: SimulatorServer) -> None:
    first = buy(client, send_webhooks=False)["membership_id"]
    time.sleep(0.01)
    second = buy(client, send_webhooks=False)["membership_id"]
    created = {
        m["id"]: m["created_at"]
        for m in api_get(client, "/memberships", version=PINNED).json()["data"]
    }
    assert created[first] < created[second]
    after_first = {"created_after": created[first]}
    assert ids_of(api_get(client, "/memberships", after_first, PINNED)) == [second]
    before_second = {"created_before": created[second]}
    assert ids_of(api_get(client, "/memberships", before_second, PINNED)) == [first]
    unix = {"created_after": str(int(parse_at(created[first])) - 60)}
    assert set(ids_of(api_get(client, "/memberships", unix, PINNED))) == {first, second}
    bad = api_get(client, "/memberships", {"created_after": "yesterday"}, PINNED)
    assert_error(bad, 400, "bad_request")


def test_list_memberships_cursor_pagination(client: httpx.Client) -> None:
    made = [buy(client, send_webhooks=False)["membership_id"] for _ in range(7)]
    newest_first = list(reversed(made))

    pages: list[list[str]] = []
    infos: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        params = {"first": "3", **({"after": after} if after else {})}
        body = api_get(client, "/memberships", params, PINNED).json()
        pages.append([m["id"] for m in body["data"]])
        infos.append(body["page_info"])
        after = body["page_info"]["end_cursor"]
        if not body["page_info"]["has_next_page"]:
            break
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [m for page in pages for m in page] == newest_first
    assert [i["has_next_page"] for i in infos] == [True, True, False]
    assert [i["has_previous_page"] for i in infos] == [False, True, True]
    assert all(i["start_cursor"] and i["end_cursor"] for i in infos)
    # After the last item: an empty page without cursors (the SDK stops there).
    empty = api_get(client, "/memberships", {"after": after or ""}, PINNED).json()
    assert empty == {
        "data": [],
        "page_info": {
            "start_cursor": None,
            "end_cursor": None,
            "has_next_page": False,
            "has_previous_page": True,
        },
    }

    ascending = api_get(client, "/memberships", {"direction": "asc", "first": "100"}, PINNED)
    assert ids_of(ascending) == made
    default = api_get(client, "/memberships", version=PINNED).json()
    assert len(default["data"]) == 7  # first defaults to 10

    # Backwards: last/before from the second page's start.
    second_start = infos[1]["start_cursor"]
    back = api_get(client, "/memberships", {"last": "2", "before": second_start}, PINNED)
    assert ids_of(back) == newest_first[1:3]
    assert back.json()["page_info"]["has_previous_page"] is True

    for bad in ({"first": "101"}, {"first": "0"}, {"first": "x"}, {"after": "garbage"}):
        assert_error(api_get(client, "/memberships", bad, PINNED), 400, "bad_request")
    wrong_order = api_get(client, "/memberships", {"order": "status"}, PINNED)
    assert_error(wrong_order, 400, "bad_request")  # the versioned model orders by created_at only
    legacy_order = [("company_id", COMPANY_ID), ("order", "id"), ("direction", "asc")]
    assert ids_of(api_get(client, "/memberships", legacy_order)) == sorted(made)


def test_list_memberships_items_in_request_shape(client: httpx.Client) -> None:
    mid = buy(client, send_webhooks=False)["membership_id"]
    (legacy,) = api_get(client, "/memberships", {"company_id": COMPANY_ID}).json()["data"]
    assert legacy == retrieve(client, mid).json()
    assert "user" in legacy
    (versioned,) = api_get(client, "/memberships", version=PINNED).json()["data"]
    assert versioned == retrieve(client, mid, PINNED).json()
    assert "plan_id" in versioned


# ----- lists: payments ------------------------------------------------------------------------


def test_list_payments_filters_and_order(client: httpx.Client) -> None:
    one = buy(client, plan_id="plan_P", send_webhooks=False)
    two = buy(client, plan_id="plan_P", currency="eur", send_webhooks=False)
    renewal = buy(
        client, plan_id="plan_R", billing_reason="subscription_cycle", send_webhooks=False
    )
    legacy = [("company_id", COMPANY_ID)]

    def legacy_ids(*params: tuple[str, str]) -> list[str]:
        return ids_of(api_get(client, "/payments", legacy + list(params)))

    assert legacy_ids() == [renewal["payment_id"], two["payment_id"], one["payment_id"]]
    assert legacy_ids(("direction", "asc")) == [
        one["payment_id"],
        two["payment_id"],
        renewal["payment_id"],
    ]
    assert legacy_ids(("billing_reasons[]", "one_time")) == [two["payment_id"], one["payment_id"]]
    assert legacy_ids(("billing_reasons", "subscription_update")) == []
    assert legacy_ids(("plan_ids", "plan_R")) == [renewal["payment_id"]]
    assert legacy_ids(("statuses", "paid"), ("plan_id", "plan_P"), ("order", "paid_at")) == [
        two["payment_id"],
        one["payment_id"],
    ]
    assert legacy_ids(("statuses", "void")) == []
    assert legacy_ids(("currency", "EUR")) == [two["payment_id"]]
    assert_error(api_get(client, "/payments", [*legacy, ("status", "x")]), 400, "bad_request")
    assert_error(api_get(client, "/payments", [*legacy, ("order", "x")]), 400, "bad_request")

    versioned = api_get(
        client, "/payments", {"billing_reason": "subscription_cycle", "first": "1"}, PINNED
    ).json()
    assert [p["id"] for p in versioned["data"]] == [renewal["payment_id"]]
    assert versioned["data"][0]["membership_id"] == renewal["membership_id"]  # versioned shape
    assert versioned["page_info"]["has_next_page"] is False
    by_product = api_get(client, "/payments", {"membership_id": one["membership_id"]}, PINNED)
    assert ids_of(by_product) == [one["payment_id"]]
    foreign = api_get(client, "/payments", {"account_id": "biz_Other"}, PINNED)
    assert ids_of(foreign) == []


def test_a_purchase_can_be_made_in_the_past(client: httpx.Client) -> None:
    old = buy(client, at="2026-11-01T10:00:00Z", send_webhooks=False)
    naive = buy(client, at="2026-11-02T10:00:00", send_webhooks=False)  # no zone: UTC
    new = buy(client, send_webhooks=False)
    legacy = [("company_id", COMPANY_ID)]
    [payment] = api_get(
        client, "/payments", [*legacy, ("direction", "asc"), ("first", "1")]
    ).json()["data"]
    assert payment["id"] == old["payment_id"]
    assert payment["created_at"] == "2026-11-01T09:59:58.000Z"
    assert payment["paid_at"] == "2026-11-01T09:59:59.950Z"
    membership = retrieve(client, old["membership_id"]).json()
    assert membership["created_at"] == "2026-11-01T09:59:59.970Z"
    window = [*legacy, ("created_after", "2026-11-02T00:00:00Z")]
    assert ids_of(api_get(client, "/payments", window)) == [new["payment_id"], naive["payment_id"]]
    assert (
        client.post("/_sim/purchases", json={"plan_id": "plan_Test", "at": "soon"}).status_code
        == 422
    )


def test_a_refund_keeps_the_payment_paid_and_says_how_much(client: httpx.Client) -> None:
    bought = buy(client, amount="25", send_webhooks=False)
    payment_id = bought["payment_id"]

    def shapes() -> tuple[dict[str, Any], dict[str, Any]]:
        legacy = api_get(client, f"/payments/{payment_id}").json()
        return legacy, api_get(client, f"/payments/{payment_id}", version=PINNED).json()

    legacy, versioned = shapes()
    assert (legacy["substatus"], legacy["refunded_amount"]) == ("succeeded", 0.0)
    assert (versioned["substatus"], versioned["refunded_amount"]) == ("succeeded", None)

    part = client.post(f"/_sim/payments/{payment_id}/refund", json={"amount": "10"})
    assert part.json() == {
        "payment_id": payment_id,
        "refunded_amount": "10.00",
        "substatus": "partially_refunded",
    }
    legacy, versioned = shapes()
    assert (legacy["status"], legacy["substatus"]) == ("paid", "partially_refunded")
    assert legacy["refunded_amount"] == 10.0
    assert legacy["refunded_at"] is not None
    assert versioned["status"] == "paid"
    assert versioned["refunded_amount"]["amount"] == "10.00"

    rest = client.post(f"/_sim/payments/{payment_id}/refund")
    assert rest.json()["substatus"] == "refunded"
    legacy, versioned = shapes()
    assert (legacy["substatus"], legacy["refunded_amount"]) == ("refunded", 25.0)
    assert versioned["refunded_amount"]["amount"] == "25.00"
    too_much = client.post(f"/_sim/payments/{payment_id}/refund", json={"amount": "1"})
    assert too_much.status_code == 422
    assert client.post("/_sim/payments/pay_Unknown/refund").status_code == 404


def test_the_membership_list_can_ignore_its_plan_filter(client: httpx.Client) -> None:
    mine = buy(client, plan_id="plan_A", send_webhooks=False)["membership_id"]
    other = buy(client, plan_id="plan_B", send_webhooks=False)["membership_id"]
    query = [("company_id", COMPANY_ID), ("plan_ids", "plan_A")]
    assert ids_of(api_get(client, "/memberships", query)) == [mine]
    faults = client.post("/_sim/faults", json={"plan_filter_ignored": True}).json()
    assert faults["plan_filter_ignored"] is True
    assert ids_of(api_get(client, "/memberships", query)) == [other, mine]
    assert ids_of(api_get(client, "/memberships", {"plan_id": "plan_A"}, PINNED)) == [other, mine]
    client.post("/_sim/faults", json={"plan_filter_ignored": False})
    assert ids_of(api_get(client, "/memberships", query)) == [mine]


# ----- plans ----------------------------------------------------------------------------------


def test_plans_created_by_control_api_and_by_purchases(client: httpx.Client) -> None:
    made = client.post(
        "/_sim/plans",
        json={"plan_id": "plan_Course", "plan_type": "one_time", "title": "Course", "amount": "49"},
    )
    assert made.status_code == 201, made.text
    assert made.json()["plan_type"] == "one_time"
    product = made.json()["product"]["id"]

    versioned = api_get(client, "/plans/plan_Course", version=PINNED).json()
    assert (versioned["id"], versioned["plan_type"], versioned["title"]) == (
        "plan_Course",
        "one_time",
        "Course",
    )
    assert versioned["initial_price"] == 49.0
    assert versioned["account"]["id"] == COMPANY_ID
    legacy = api_get(client, "/plans/plan_Course").json()
    assert legacy["company"]["id"] == COMPANY_ID
    assert "account" not in legacy
    assert legacy["plan_type"] == "one_time"
    assert_error(api_get(client, "/plans/plan_Nope"), 404, "not_found")

    # A purchase of a known plan takes its product and price.
    bought = buy(client, plan_id="plan_Course", send_webhooks=False)
    assert bought["product_id"] == product
    assert retrieve(client, bought["membership_id"]).json()["initial_price_paid"] == "$49.00"
    # A purchase of an unknown plan creates it, typed by the billing reason.
    buy(client, plan_id="plan_Sub", billing_reason="subscription_create", send_webhooks=False)
    buy(client, plan_id="plan_Once", send_webhooks=False)
    assert api_get(client, "/plans/plan_Sub", version=PINNED).json()["plan_type"] == "renewal"
    assert api_get(client, "/plans/plan_Once", version=PINNED).json()["plan_type"] == "one_time"
    bad = client.post("/_sim/plans", json={"plan_id": "plan_X", "plan_type": "weekly"})
    assert bad.status_code == 422


# ----- checkout configurations ----------------------------------------------------------------


def create_checkout(
    client: httpx.Client, body: dict[str, Any], version: str | None = PINNED, key: str = ""
) -> httpx.Response:
    headers = dict(AUTH)
    if version is not None:
        headers["Api-Version-Date"] = version
    if key:
        headers["Idempotency-Key"] = key
    return client.post("/api/v1/checkout_configurations", json=body, headers=headers)


def test_checkout_configuration_create_and_get(client: httpx.Client, sim: SimulatorServer) -> None:
    client.post("/_sim/plans", json={"plan_id": "plan_C"})
    response = create_checkout(
        client,
        {
            "plan_id": "plan_C",
            "metadata": {"order_id": "ord_1"},
            "redirect_url": "https://shop.example.com/thanks",
            "mode": "payment",
            "account_id": COMPANY_ID,
        },
    )
    assert response.status_code == 200, response.text
    config = response.json()
    assert config["id"].startswith("ch_")
    assert config["purchase_url"] == f"{sim.url}/checkout/{config['id']}"
    assert (config["account_id"], config["metadata"], config["mode"]) == (
        COMPANY_ID,
        {"order_id": "ord_1"},
        "payment",
    )
    assert config["redirect_url"] == "https://shop.example.com/thanks"
    assert (config["plan"]["id"], config["plan"]["plan_type"]) == ("plan_C", "one_time")
    fetched = api_get(client, f"/checkout_configurations/{config['id']}", version=PINNED)
    assert fetched.json() == config
    legacy = api_get(client, f"/checkout_configurations/{config['id']}").json()
    assert legacy["company_id"] == COMPANY_ID
    assert "account_id" not in legacy
    page = client.get(f"/checkout/{config['id']}")
    assert page.status_code == 200
    assert config["id"] in page.text
    assert client.get("/checkout/ch_nope").status_code == 404

    assert_error(create_checkout(client, {"plan_id": "plan_Missing"}), 404, "not_found")
    assert_error(create_checkout(client, {"metadata": {}}), 400, "bad_request")
    assert_error(
        create_checkout(client, {"plan_id": "plan_C", "mode": "setup"}), 400, "bad_request"
    )
    assert_error(
        create_checkout(client, {"plan_id": "plan_C", "company_id": "biz_Other"}, None),
        403,
        "forbidden",
    )
    assert_error(api_get(client, "/checkout_configurations/ch_nope"), 404, "not_found")

    once = create_checkout(client, {"plan_id": "plan_C"}, key="checkout-1").json()
    again = create_checkout(client, {"plan_id": "plan_C"}, key="checkout-1").json()
    assert once["id"] == again["id"]  # an Idempotency-Key replays the first answer


def test_completed_checkout_copies_metadata(client: httpx.Client, receiver: Receiver) -> None:
    client.post("/_sim/config", json={"webhook_url": receiver.url})
    client.post("/_sim/plans", json={"plan_id": "plan_M"})
    config = create_checkout(client, {"plan_id": "plan_M", "metadata": {"order_id": "o7"}}).json()
    done = client.post(
        f"/_sim/checkout_configurations/{config['id']}/complete",
        json={"email": "co@example.com", "shape": "pinned"},
    )
    assert done.status_code == 201, done.text
    bought = done.json()
    assert (bought["plan_id"], bought["checkout_configuration_id"]) == ("plan_M", config["id"])
    membership = retrieve(client, bought["membership_id"], PINNED).json()
    assert (membership["metadata"], membership["plan_id"]) == ({"order_id": "o7"}, "plan_M")
    payment = api_get(client, f"/payments/{bought['payment_id']}", version=PINNED).json()
    assert payment["metadata"] == {"order_id": "o7"}
    assert payment["checkout_configuration_id"] == config["id"]
    assert payment["billing_reason"] == "one_time"
    wait_for(lambda: len(receiver.received) == 2)
    for event in receiver.bodies():
        assert event["data"]["metadata"] == {"order_id": "o7"}

    # create_purchase through a known configuration copies it too; explicit keys win.
    through = buy(
        client, plan_id="plan_M", checkout_configuration_id=config["id"], metadata={"x": 1}
    )
    legacy = retrieve(client, through["membership_id"]).json()
    assert legacy["metadata"] == {"order_id": "o7", "x": 1}
    assert legacy["checkout_configuration_id"] == config["id"]
    wrong_plan = client.post(
        "/_sim/purchases", json={"plan_id": "plan_Z", "checkout_configuration_id": config["id"]}
    )
    assert wrong_plan.status_code == 422
    assert_error(api_get(client, "/plans/plan_Z"), 404, "not_found")  # refused: nothing created
    missing = client.post("/_sim/checkout_configurations/ch_nope/complete", json={})
    assert missing.status_code == 404


# ----- rate limit -----------------------------------------------------------------------------


def test_rate_limit_token_bucket(client: httpx.Client, sim: SimulatorServer) -> None:
    mid = buy(client, send_webhooks=False)["membership_id"]
    response = client.post("/_sim/rate_limit", json={"capacity": 3, "refill_per_second": 2})
    assert response.json() == {"capacity": 3, "refill_per_second": 2.0}
    assert [retrieve(client, mid).status_code for _ in range(3)] == [200, 200, 200]
    limited = retrieve(client, mid)
    assert_error(limited, 429, "rate_limited")
    assert limited.headers["Retry-After"] == "1"  # under 0.5 s, rounded up to whole seconds
    assert 1 <= int(limited.headers["retry-after-ms"]) <= 500
    # Another key has its own bucket (and is then refused for being wrong).
    stranger = client.get(f"/api/v1/memberships/{mid}", headers={"Authorization": "Bearer x"})
    assert stranger.status_code == 401
    time.sleep(int(limited.headers["retry-after-ms"]) / 1000)
    assert retrieve(client, mid).status_code == 200  # one token refilled
    assert retrieve(client, mid).status_code == 429
    client.post("/_sim/rate_limit", json={"capacity": None})
    assert [retrieve(client, mid).status_code for _ in range(5)] == [200] * 5
    assert client.post("/_sim/rate_limit", json={"capacity": 0}).status_code == 422


# ----- random faults --------------------------------------------------------------------------


def test_error_rate_answers_500_and_changes_nothing(client: httpx.Client) -> None:
    mid = buy(client, send_webhooks=False)["membership_id"]
    settings = client.post("/_sim/faults", json={"error_rate": 1.0}).json()
    assert settings["error_rate"] == 1.0
    assert_error(
        cancel(client, mid, {"cancellation_mode": "immediate"}), 500, "internal_server_error"
    )
    client.post("/_sim/faults", json={"error_rate": 0.0})
    assert retrieve(client, mid).json()["status"] == "completed"

    def statuses(seed: int) -> list[int]:
        client.post("/_sim/faults", json={"error_rate": 0.5, "seed": seed})
        return [retrieve(client, mid).status_code for _ in range(40)]

    first, again, other = statuses(7), statuses(7), statuses(8)
    assert first == again  # the dice are seeded
    assert first != other
    assert 8 <= first.count(500) <= 32
    assert set(first) == {200, 500}


def test_timeouts_hang_off_the_lock_then_answer_504(
    client: httpx.Client, sim: SimulatorServer
) -> None:
    mid = buy(client, send_webhooks=False)["membership_id"]
    other = buy(client, send_webhooks=False)["membership_id"]
    client.post("/_sim/faults", json={"timeout_rate": 1.0, "timeout_seconds": 0.5})
    finished: list[str] = []
    results: dict[str, httpx.Response] = {}

    def hanging_cancel() -> None:
        results["cancel"] = cancel(client, mid, {"cancellation_mode": "immediate"})
        finished.append("cancel")

    worker = threading.Thread(target=hanging_cancel)
    worker.start()
    wait_for(lambda: any(c["timed_out"] for c in sim.state.calls()))
    sim.state.set_faults(timeout_rate=0.0)
    results["read"] = retrieve(client, other)  # served while the cancel still hangs
    finished.append("read")
    worker.join(5)

    assert finished == ["read", "cancel"]
    assert results["read"].status_code == 200
    assert_error(results["cancel"], 504, "gateway_timeout")
    # The cancel was carried out; only its answer was lost (the reply a read-back must find).
    assert retrieve(client, mid).json()["status"] == "canceled"
    (call,) = [c for c in sim.state.calls(mid) if c["method"] == "POST"]
    assert (call["status"], call["timed_out"]) == (504, True)


def test_outage_window_ends_by_itself(client: httpx.Client, sim: SimulatorServer) -> None:
    mid = buy(client, send_webhooks=False)["membership_id"]
    switched = datetime.now(UTC).timestamp()
    response = client.post("/_sim/outage", json={"enabled": True, "for_seconds": 20})
    assert response.json() == {"enabled": True, "for_seconds": 20.0}
    assert client.get("/_sim/faults").json()["outage"] is True
    statuses: list[int] = []
    while not statuses or statuses[-1] != 200:
        statuses.append(retrieve(client, mid).status_code)
        time.sleep(0.005)
    calls = sim.state.calls(mid)
    assert statuses[0] == 503
    assert set(statuses[:-1]) == {503}
    # 20 s of Whop time at time_scale 0.01 is 0.2 s (recorded times are truncated to ms).
    assert parse_at(calls[-2]["at"]) - switched < 0.2 + 0.005
    assert parse_at(calls[-1]["at"]) - switched >= 0.2 - 0.002
    assert client.get("/_sim/faults").json()["outage"] is False


# ----- webhook sender options -----------------------------------------------------------------


def test_duplicate_rate_sends_events_twice(client: httpx.Client, receiver: Receiver) -> None:
    client.post("/_sim/config", json={"webhook_url": receiver.url})
    options = client.post("/_sim/webhooks/options", json={"duplicate_rate": 1.0}).json()
    assert options == {"duplicate_rate": 1.0, "reorder": False, "drop": False}
    ids = buy(client)["webhook_ids"]
    wait_for(lambda: len(receiver.received) == 4)
    by_id: dict[str, list[bytes]] = {}
    for headers, body in receiver.received:
        by_id.setdefault(headers["webhook-id"], []).append(body)
    assert set(by_id) == set(ids)
    assert all(len(bodies) == 2 and bodies[0] == bodies[1] for bodies in by_id.values())


def test_reorder_holds_events_before_first_attempt() -> None:
    receiver = Receiver()
    scale = 0.05
    try:
        with SimulatorServer(
            api_key=API_KEY, webhook_secret=SECRET, webhook_url=receiver.url, time_scale=scale
        ) as sim:
            sim.state.set_webhook_options(reorder=True)
            sent: list[str] = []
            for _ in range(8):
                sent += sim.state.create_purchase("plan_Test")["webhook_ids"]
            wait_for(lambda: len(receiver.received) == len(sent))
            attempts = sim.state.deliveries()
    finally:
        receiver.close()
    arrived = [headers["webhook-id"] for headers, _ in receiver.received]
    assert sorted(arrived) == sorted(sent)
    assert arrived != sent  # shuffled
    assert all(d["attempt"] == 1 and d["status"] == 200 for d in attempts)
    spread = max(parse_at(d["at"]) for d in attempts) - min(parse_at(d["at"]) for d in attempts)
    assert spread <= 2.0 * scale + 0.1  # held at most 2 s x time_scale (plus sending)


def test_drop_records_events_without_sending(client: httpx.Client, receiver: Receiver) -> None:
    client.post("/_sim/config", json={"webhook_url": receiver.url})
    client.post("/_sim/webhooks/options", json={"drop": True})
    ids = buy(client)["webhook_ids"]
    body = client.get("/_sim/webhooks").json()
    assert body["pending"] == 0
    assert [(d["webhook_id"], d["attempt"], d["error"]) for d in body["deliveries"]] == [
        (ids[0], 0, "dropped"),
        (ids[1], 0, "dropped"),
    ]
    client.post("/_sim/webhooks/options", json={})
    buy(client)
    wait_for(lambda: len(receiver.received) == 2)
    assert not {h["webhook-id"] for h, _ in receiver.received} & set(ids)


def test_deliveries_record_when_the_answer_came_back(client: httpx.Client) -> None:
    receiver = Receiver(delay=0.1)
    try:
        client.post("/_sim/config", json={"webhook_url": receiver.url})
        ids = buy(client)["webhook_ids"]
        wait_for(lambda: len(client.get("/_sim/webhooks").json()["deliveries"]) == 2)
        deliveries = client.get("/_sim/webhooks").json()["deliveries"]
    finally:
        receiver.close()
    assert [d["webhook_id"] for d in deliveries] == ids
    for delivery in deliveries:
        assert parse_at(delivery["answered_at"]) - parse_at(delivery["at"]) >= 0.1 - 0.002
    # One purchase's events go one at a time: the activation starts after the payment's answer.
    assert parse_at(deliveries[1]["at"]) >= parse_at(deliveries[0]["answered_at"])
    client.post("/_sim/webhooks/options", json={"drop": True})
    buy(client)
    dropped = client.get("/_sim/webhooks").json()["deliveries"][2:]
    assert [(d["error"], d["answered_at"]) for d in dropped] == [("dropped", None)] * 2


def test_concurrent_sender_keeps_each_purchases_events_in_order(
    client: httpx.Client, sim: SimulatorServer
) -> None:
    receiver = Receiver(delay=0.1)
    try:
        client.post("/_sim/config", json={"webhook_url": receiver.url})
        for wrong in (0, 65):
            assert client.post("/_sim/webhooks/concurrency", json={"in_flight": wrong}).is_error
        answer = client.post("/_sim/webhooks/concurrency", json={"in_flight": 8})
        assert answer.json() == {"in_flight": 8}
        bought = [buy(client, email=f"b{n}@example.com") for n in range(8)]
        wait_for(lambda: len(sim.state.deliveries()) == 16, seconds=20)
        deliveries = {d["webhook_id"]: d for d in sim.state.deliveries()}
    finally:
        receiver.close()
    assert 1 < receiver.most_at_once <= 8  # purchases in parallel, never more than allowed
    for purchase in bought:
        payment, activation = (deliveries[i] for i in purchase["webhook_ids"])
        assert payment["type"] == "payment.succeeded"
        assert activation["type"] == "membership.activated"
        assert parse_at(activation["at"]) >= parse_at(payment["answered_at"])
    client.post("/_sim/reset")
    assert sim.state.webhook_concurrency == 8  # configuration, kept by a reset


# ----- reset ----------------------------------------------------------------------------------


def test_reset_clears_state_and_faults_but_keeps_config(
    client: httpx.Client, sim: SimulatorServer, receiver: Receiver
) -> None:
    client.post("/_sim/config", json={"webhook_url": receiver.url})
    client.post("/_sim/plans", json={"plan_id": "plan_Keep", "plan_type": "renewal"})
    mid = buy(client, plan_id="plan_Keep", send_webhooks=False)["membership_id"]
    config = create_checkout(client, {"plan_id": "plan_Keep"}).json()
    client.post("/_sim/faults", json={"error_rate": 0.3, "seed": 5})
    client.post("/_sim/rate_limit", json={"capacity": 100})
    client.post("/_sim/forbidden", json={"enabled": True})
    client.post("/_sim/permissions", json={"missing": ["payment:basic:read"]})
    client.post("/_sim/webhooks/options", json={"drop": True})
    client.post("/_sim/outage", json={"enabled": True})

    assert client.post("/_sim/reset").json() == {"reset": True}
    faults = client.get("/_sim/faults").json()
    assert faults == {
        "outage": False,
        "forbidden": False,
        "latency": 0.0,
        "error_rate": 0.0,
        "timeout_rate": 0.0,
        "timeout_seconds": 10.0,
        "seed": 5,
        "plan_filter_ignored": False,
        "missing_permissions": [],
        "rate_limit": {"capacity": None, "refill_per_second": 1.0},
    }
    assert client.get("/_sim/calls").json() == {"calls": []}
    assert_error(retrieve(client, mid), 404, "not_found")
    assert_error(
        api_get(client, f"/checkout_configurations/{config['id']}", version=PINNED),
        404,
        "not_found",
    )
    assert api_get(client, "/plans/plan_Keep", version=PINNED).json()["plan_type"] == "renewal"
    assert sim.state.webhook_url == receiver.url
    ids = buy(client, plan_id="plan_Keep")["webhook_ids"]
    wait_for(lambda: len(receiver.received) == 2)  # not dropped any more
    assert [h["webhook-id"] for h, _ in receiver.received] == ids
