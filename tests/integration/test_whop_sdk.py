"""The simulator against Whop's own code: whop-sdk's client, models and webhook verifier.

Versioned calls go through `whop_sdk.Whop` (it sends `Api-Version-Date`); legacy JSON is fetched
with httpx and validated with the SDK's legacy models; webhooks are verified with
`whop_sdk.lib.verify_webhook.unwrap` and parsed with the SDK's payload models.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from whop_sdk import ConflictError, NotFoundError, Whop
from whop_sdk.core.api_error import ApiError
from whop_sdk.core.parse_error import ParsingError
from whop_sdk.environment import WhopEnvironment
from whop_sdk.lib.verify_webhook import WebhookVerificationError, unwrap
from whop_sdk.memberships.types.post_membership_activated_payload import (
    PostMembershipActivatedPayload,
)
from whop_sdk.memberships.types.post_membership_updated_payload import (
    PostMembershipUpdatedPayload,
)
from whop_sdk.payments.types.post_payment_succeeded_payload import PostPaymentSucceededPayload
from whop_sdk.types import Membership, MembershipLegacy, Payment, PaymentLegacy, Plan

from support.harness import wait_for
from support.receiver import Receiver
from whop_autocancel.simulator import SimulatorServer

API_KEY = "sim_sdk_key"
SECRET = "ws_5b1e0c9a7d3f42e68a0b9c1d2e3f4a5b6c7d8e9f0a1b2c3d"
COMPANY = "biz_SimStore"
LEGACY_HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
def sim() -> Iterator[SimulatorServer]:
    with SimulatorServer(api_key=API_KEY, webhook_secret=SECRET, time_scale=0.01) as server:
        yield server


@pytest.fixture
def whop(sim: SimulatorServer) -> Iterator[Whop]:
    http = httpx.Client(timeout=5.0)
    yield Whop(
        token=API_KEY,
        environment=WhopEnvironment(api=sim.api_url, vault=sim.api_url),
        httpx_client=http,
        max_retries=0,
    )
    http.close()


def parse_at(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def legacy_get(sim: SimulatorServer, path: str, **params: Any) -> Any:
    response = httpx.get(f"{sim.api_url}{path}", params=params, headers=LEGACY_HEADERS)
    assert response.status_code == 200, response.text
    return response.json()


# ----- versioned: the SDK's client and models ------------------------------------------------


def test_membership_retrieve_list_and_cancel(sim: SimulatorServer, whop: Whop) -> None:
    state = sim.state
    mine = {
        state.create_purchase("plan_Sdk", send_webhooks=False)["membership_id"] for _ in range(12)
    }
    for _ in range(4):
        state.create_purchase("plan_Other", send_webhooks=False)
    some_id = sorted(mine)[0]

    membership = whop.memberships.retrieve(some_id)
    assert isinstance(membership, Membership)
    assert (membership.id, membership.status, membership.plan_id) == (
        some_id,
        "completed",
        "plan_Sdk",
    )
    assert membership.account.id == COMPANY
    assert membership.initial_price.amount == "25.00"

    pager = whop.memberships.list(plan_id="plan_Sdk", first=5)
    listed = list(pager)
    assert all(isinstance(m, Membership) for m in listed)
    assert [m.id for m in listed if m.id in mine] == [m.id for m in listed]
    assert {m.id for m in listed} == mine
    assert len(listed) == len(mine)  # no page repeats an item
    created = [m.created_at for m in listed]
    assert created == sorted(created, reverse=True)  # newest first
    pages = [c for c in state.calls() if c["path"] == "/api/v1/memberships"]
    # 5 + 5 + 2, then one empty page: the SDK pages on end_cursor and ignores has_next_page.
    assert len(pages) == 4
    assert [c["query"].get("after") is None for c in pages] == [True, False, False, False]

    one_time = list(whop.memberships.list(status="one_time", plan_ids=["plan_Sdk", "plan_Other"]))
    assert len(one_time) == 16

    canceled = whop.memberships.cancel(some_id, cancel_at_period_end=False, reason="sdk test")
    assert isinstance(canceled, Membership)
    assert (canceled.status, canceled.cancellation_reason) == ("canceled", "sdk test")
    assert canceled.canceled_at is not None
    assert whop.memberships.retrieve(some_id).status == "canceled"
    remaining = {m.id for m in whop.memberships.list(status="one_time", plan_id="plan_Sdk")}
    assert remaining == mine - {some_id}
    with pytest.raises(ConflictError):
        whop.memberships.cancel(some_id, cancel_at_period_end=False)
    with pytest.raises(NotFoundError):
        whop.memberships.retrieve("mem_doesnotexist")


def test_payments_retrieve_and_list(sim: SimulatorServer, whop: Whop) -> None:
    state = sim.state
    before = datetime.now(UTC) - timedelta(seconds=10)
    bought = [
        state.create_purchase("plan_Pay", email=f"p{i}@example.com", send_webhooks=False)
        for i in range(3)
    ]
    state.create_purchase("plan_Sub", billing_reason="subscription_create", send_webhooks=False)

    payment = whop.payments.retrieve(bought[0]["payment_id"])
    assert isinstance(payment, Payment)
    assert payment.id == bought[0]["payment_id"]
    assert payment.membership_id == bought[0]["membership_id"]
    assert (payment.status, payment.billing_reason, payment.plan_id) == (
        "paid",
        "one_time",
        "plan_Pay",
    )
    assert payment.customer_email == "p0@example.com"

    one_time = list(whop.payments.list(billing_reason="one_time", created_after=before, first=2))
    assert all(isinstance(p, Payment) for p in one_time)
    assert [p.id for p in one_time] == [b["payment_id"] for b in reversed(bought)]
    renewals = list(whop.payments.list(billing_reason="subscription_create"))
    assert [p.plan_id for p in renewals] == ["plan_Sub"]
    assert list(whop.payments.list(account_id="biz_SomeoneElse")) == []
    assert list(whop.payments.list(created_before=before)) == []


def test_plans_retrieve(sim: SimulatorServer, whop: Whop) -> None:
    sim.state.create_plan("plan_Lifetime", "one_time", title="Lifetime pass")
    sim.state.create_purchase("plan_Monthly", billing_reason="subscription_create")

    lifetime = whop.plans.retrieve("plan_Lifetime")
    assert isinstance(lifetime, Plan)
    assert (lifetime.id, lifetime.plan_type, lifetime.title) == (
        "plan_Lifetime",
        "one_time",
        "Lifetime pass",
    )
    assert lifetime.initial_price == 25.0
    assert lifetime.purchase_url == f"{sim.url}/checkout/plan_Lifetime"
    monthly = whop.plans.retrieve("plan_Monthly")
    assert (monthly.plan_type, monthly.billing_period, monthly.member_count) == ("renewal", 30, 1)
    # plans.retrieve declares no 404, so the SDK raises its plain ApiError.
    with pytest.raises(ApiError) as missing:
        whop.plans.retrieve("plan_Unknown")
    assert missing.value.status_code == 404


def test_checkout_configuration_create_and_purchase(sim: SimulatorServer, whop: Whop) -> None:
    sim.state.create_plan("plan_Checkout", "one_time")
    created = whop.checkout_configurations.create(
        plan_id="plan_Checkout",
        metadata={"order_id": "ord_123"},
        redirect_url="https://shop.example.com/thanks",
        mode="payment",
        account_id=COMPANY,
    )
    assert created.id.startswith("ch_")
    assert created.purchase_url == f"{sim.url}/checkout/{created.id}"
    assert created.account_id == COMPANY
    assert created.metadata == {"order_id": "ord_123"}
    assert created.plan is not None
    assert (created.plan.id, created.plan.plan_type) == ("plan_Checkout", "one_time")
    assert created.mode == "payment"
    assert created.redirect_url == "https://shop.example.com/thanks"
    assert whop.checkout_configurations.retrieve(created.id).metadata == {"order_id": "ord_123"}

    bought = sim.state.complete_checkout(created.id, email="buyer@example.com", send_webhooks=False)
    payment = whop.payments.retrieve(bought["payment_id"])
    membership = whop.memberships.retrieve(bought["membership_id"])
    assert payment.checkout_configuration_id == created.id
    assert payment.metadata == {"order_id": "ord_123"}
    assert membership.metadata == {"order_id": "ord_123"}
    assert membership.plan_id == "plan_Checkout"


def test_rate_limit_retry_after_is_honoured_by_the_sdk(sim: SimulatorServer) -> None:
    sim.state.create_plan("plan_Limited")
    sim.state.set_rate_limit(1, refill_per_second=20.0)
    retrying = Whop(
        token=API_KEY,
        environment=WhopEnvironment(api=sim.api_url, vault=sim.api_url),
        max_retries=2,
    )
    assert retrying.plans.retrieve("plan_Limited").id == "plan_Limited"
    assert retrying.plans.retrieve("plan_Limited").id == "plan_Limited"
    calls = sim.state.calls()
    assert [c["status"] for c in calls] == [200, 429, 200]
    gap = parse_at(calls[2]["at"]) - parse_at(calls[1]["at"])
    # The 429 said `Retry-After: 1` and `retry-after-ms: 50`. whop-sdk 2.6 compares the
    # retry-after-ms string with 0 (a TypeError it swallows), so only Retry-After counts.
    assert gap >= 0.9


def test_without_a_version_the_sdk_cannot_parse_legacy_json(sim: SimulatorServer) -> None:
    mid = sim.state.create_purchase("plan_Legacy", send_webhooks=False)["membership_id"]
    unversioned = Whop(
        token=API_KEY,
        environment=WhopEnvironment(api=sim.api_url, vault=sim.api_url),
        api_version_date=None,
        max_retries=0,
    )
    with pytest.raises(ParsingError):
        unversioned.memberships.retrieve(mid)
    assert sim.state.calls()[-1]["api_version_date"] is None


# ----- legacy: raw JSON, the SDK's legacy models --------------------------------------------


def test_legacy_json_validates_with_the_sdk_legacy_models(sim: SimulatorServer) -> None:
    sim.state.create_plan("plan_L", "one_time")
    config = sim.state.create_checkout_configuration("plan_L", metadata={"order_id": "ord_9"})
    bought = sim.state.complete_checkout(config["id"], email="leg@example.com", send_webhooks=False)
    sim.state.create_purchase("plan_Other", send_webhooks=False)

    membership = MembershipLegacy.model_validate(
        legacy_get(sim, f"/memberships/{bought['membership_id']}")
    )
    assert (membership.id, membership.status) == (bought["membership_id"], "completed")
    assert membership.plan.id == "plan_L"
    assert membership.company.id == COMPANY
    assert membership.checkout_configuration_id == config["id"]
    assert membership.metadata == {"order_id": "ord_9"}
    assert membership.user is not None
    assert membership.user.email == "leg@example.com"

    payment = PaymentLegacy.model_validate(legacy_get(sim, f"/payments/{bought['payment_id']}"))
    assert payment.id == bought["payment_id"]
    assert payment.membership is not None
    assert payment.membership.id == bought["membership_id"]
    assert (payment.billing_reason, payment.metadata) == ("one_time", {"order_id": "ord_9"})

    page = legacy_get(sim, "/memberships", company_id=COMPANY, **{"plan_ids[]": "plan_L"})
    listed = [MembershipLegacy.model_validate(item) for item in page["data"]]
    assert [m.id for m in listed] == [bought["membership_id"]]
    payments = legacy_get(sim, "/payments", company_id=COMPANY, statuses="paid")
    assert {PaymentLegacy.model_validate(p).id for p in payments["data"]} >= {bought["payment_id"]}
    assert len(payments["data"]) == 2
    # The legacy shape is not the versioned one: the SDK's main model rejects it.
    with pytest.raises(ValidationError):
        Membership.model_validate(page["data"][0])


# ----- webhooks: verified with the SDK's helper, parsed with its payload models -------------


def test_webhooks_verify_with_unwrap_and_parse_with_sdk_models(sim: SimulatorServer) -> None:
    receiver = Receiver()
    try:
        sim.state.set_webhook_url(receiver.url)
        legacy = sim.state.create_purchase("plan_Hook", email="a@example.com")
        pinned = sim.state.create_purchase("plan_Hook", email="b@example.com", shape="pinned")
        for bought in (legacy, pinned):
            response = httpx.post(
                f"{sim.api_url}/memberships/{bought['membership_id']}/cancel",
                json={"cancellation_mode": "immediate"},
                headers=LEGACY_HEADERS,
            )
            assert response.status_code == 200
        wait_for(lambda: sim.state.pending_webhooks() == 0, what="the webhooks")
        received = receiver.snapshot()
    finally:
        receiver.close()

    assert len(received) == 6
    by_type: dict[tuple[str, bool], dict[str, Any]] = {}
    for headers, body in received:
        event = unwrap(body, headers=headers, key=SECRET)
        assert event == json.loads(body)
        assert event["id"] == headers["webhook-id"]
        by_type[(event["type"], event["api_version_date"] is not None)] = event
        with pytest.raises(WebhookVerificationError):
            unwrap(body + b" ", headers=headers, key=SECRET)
        with pytest.raises(WebhookVerificationError):
            unwrap(body, headers=headers, key="ws_not_the_secret")

    paid = PostPaymentSucceededPayload.model_validate(by_type[("payment.succeeded", True)])
    assert (paid.account_id, paid.data.id, paid.data.membership_id) == (
        COMPANY,
        pinned["payment_id"],
        pinned["membership_id"],
    )
    activated = PostMembershipActivatedPayload.model_validate(
        by_type[("membership.activated", True)]
    )
    assert (activated.type, activated.data.id) == ("membership.activated", pinned["membership_id"])
    updated = PostMembershipUpdatedPayload.model_validate(by_type[("membership.updated", True)])
    assert (updated.data.status, updated.previous_attributes) == (
        "canceled",
        {"status": "completed", "canceled_at": None, "cancellation_reason": None},
    )

    # Legacy (unpinned) payloads: the SDK has no legacy envelope model, only legacy data models.
    legacy_paid = by_type[("payment.succeeded", False)]
    assert legacy_paid["company_id"] == COMPANY
    assert PaymentLegacy.model_validate(legacy_paid["data"]).id == legacy["payment_id"]
    with pytest.raises(ValidationError):
        PostPaymentSucceededPayload.model_validate(legacy_paid)
    for event_type, status in (
        ("membership.activated", "completed"),
        ("membership.deactivated", "canceled"),
    ):
        data = MembershipLegacy.model_validate(by_type[(event_type, False)]["data"])
        assert (data.id, data.status) == (legacy["membership_id"], status)
