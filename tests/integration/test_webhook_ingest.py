"""POST /webhooks/whop over real HTTP, on each database: the request stores the event
(`received`); the queued `webhooks.apply` job, run here as a worker runs it, applies it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from support.harness import (
    ADMIN,
    MESSAGE_PLAN,
    UNLISTED_PLAN,
    ServiceServer,
    apply_webhooks,
    event_body,
    fixture_body,
    make_runtime,
    make_settings,
    post_event,
    signed_headers,
)
from whop_autocancel.alerts.models import Alert
from whop_autocancel.clock import FrozenClock
from whop_autocancel.orders.models import Order
from whop_autocancel.runtime import Runtime
from whop_autocancel.webhooks.inbox import APPLY_TASK
from whop_autocancel.webhooks.models import WebhookEvent


@dataclass
class Service:
    runtime: Runtime
    http: httpx.Client
    clock: FrozenClock
    tmp_path: Path

    def count(self, model: type) -> int:
        with self.runtime.database.transaction() as session:
            return int(session.scalar(select(func.count()).select_from(model)) or 0)

    def orders(self) -> list[Order]:
        with self.runtime.database.transaction() as session:
            return list(session.scalars(select(Order).order_by(Order.created_at)))

    def event(self, event_id: str) -> WebhookEvent | None:
        with self.runtime.database.transaction() as session:
            return session.get(WebhookEvent, event_id)

    def queued(self) -> list[str]:
        return [task.name for task in self.runtime.jobs.huey.pending()]

    def deliver(self, body: bytes, **options: Any) -> httpx.Response:
        """Post a signed webhook, then apply it as the worker would."""
        response = post_event(self.http, body, **options)
        apply_webhooks(self.runtime)
        return response


@pytest.fixture
def service(tmp_path: Path, clock: FrozenClock, database_url: str) -> Iterator[Service]:
    runtime = make_runtime(make_settings(tmp_path, DATABASE_URL=database_url), clock)
    server = ServiceServer(runtime)
    with server.running(), httpx.Client(base_url=server.url, timeout=10) as http:
        yield Service(runtime, http, clock, tmp_path)
    runtime.close()


def payment(plan: str = MESSAGE_PLAN, **changes: object) -> bytes:
    return event_body(
        "payment.succeeded.legacy.json",
        plan={"id": plan, "metadata": {}},
        metadata={},
        checkout_configuration_id=None,
        **changes,
    )


def test_the_fixture_payment_is_stored_then_applied_by_the_job(service: Service) -> None:
    body = fixture_body("payment.succeeded.legacy.json")
    response = post_event(service.http, body)
    assert response.status_code == 200
    assert response.json() == {"status": "received"}
    event = service.event("msg_2ZtQ8kLm4xVb7NcR1pWs9YdE")
    assert event is not None
    assert (event.status, event.attempts, event.payload) == ("received", 0, body.decode())
    assert service.orders() == []  # nothing is applied on the request path
    assert service.queued() == [APPLY_TASK]
    assert apply_webhooks(service.runtime) == 1
    event = service.event("msg_2ZtQ8kLm4xVb7NcR1pWs9YdE")
    assert event is not None
    assert (event.status, event.attempts) == ("handled", 1)
    [order] = service.orders()
    assert event.order_id == order.id
    assert order.status == "paid"
    assert order.whop_payment_id == "pay_9fKx2LqP7mWzR4"
    assert order.whop_membership_id == "mem_Hc4Tq8Wn2ZkPa9"
    assert order.email == "user@example.com"
    assert order.amount == "25.00"
    # plan_Bq2… is not in the test catalog: recorded only, nothing queued.
    assert service.queued() == []


def test_listed_one_time_payment_queues_exactly_one_delivery(service: Service) -> None:
    body = payment()
    assert service.deliver(body).json() == {"status": "received"}
    assert service.queued() == ["delivery.deliver"]


def test_duplicate_delivery_of_one_webhook_changes_nothing(service: Service) -> None:
    body = payment()
    first = service.deliver(body)
    second = service.deliver(body)
    assert (first.json(), second.json()) == ({"status": "received"}, {"status": "duplicate"})
    assert service.count(Order) == 1
    assert service.queued() == ["delivery.deliver"]


def test_same_payment_under_two_webhook_ids_is_one_order(service: Service) -> None:
    body = payment(id="pay_SamePayment1")
    other = json.loads(body)
    other["id"] = "msg_another_delivery"
    service.deliver(body)
    service.deliver(json.dumps(other).encode())
    assert service.count(Order) == 1
    assert service.count(WebhookEvent) == 2
    assert service.queued() == ["delivery.deliver"]


def test_pinned_payload_is_understood(service: Service) -> None:
    body = event_body(
        "payment.succeeded.pinned.json",
        plan_id=MESSAGE_PLAN,
        metadata={},
        checkout_configuration_id=None,
    )
    assert service.deliver(body).json() == {"status": "received"}
    [order] = service.orders()
    assert (order.plan_id, order.email, order.whop_membership_id) == (
        MESSAGE_PLAN,
        "user@example.com",
        "mem_Hc4Tq8Wn2ZkPa9",
    )
    assert service.queued() == ["delivery.deliver"]


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda h: {**h, "webhook-signature": "v1,AAAA"}, "no signature matches"),
        (lambda h: {**h, "webhook-signature": "not a signature"}, "no well-formed"),
        (lambda h: {**h, "webhook-timestamp": "yesterday"}, "not Unix seconds"),
        (lambda h: {k: v for k, v in h.items() if k != "webhook-id"}, "missing"),
    ],
)
def test_bad_signature_headers_get_401_and_store_nothing(service: Service, mangle, reason) -> None:  # type: ignore[no-untyped-def]
    body = payment()
    response = service.http.post(
        "/webhooks/whop", content=body, headers=mangle(signed_headers(body))
    )
    assert response.status_code == 401
    assert reason in response.json()["error"]
    assert service.count(WebhookEvent) == 0
    assert service.count(Order) == 0


def test_stale_and_future_timestamps_get_401(service: Service) -> None:
    body = payment()
    for offset in (-301, 301):
        at = service.clock.now() + timedelta(seconds=offset)
        response = service.http.post(
            "/webhooks/whop", content=body, headers=signed_headers(body, at=at)
        )
        assert response.status_code == 401
    assert service.count(WebhookEvent) == 0


def test_a_signature_with_another_secret_is_refused(service: Service) -> None:
    body = payment()
    response = post_event(service.http, body, secret="ws_someone_else")
    assert response.status_code == 401
    assert service.count(Order) == 0


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json at all", "not JSON"),
        (b"[1, 2, 3]", "not a JSON object"),
        (b'{"type": "payment.succeeded", "data": {}}', "'id'"),
        (b'{"id": "msg_1", "data": {}}', "'type'"),
        (b'{"id": "msg_1", "type": "payment.succeeded", "data": "x"}', "'data'"),
        (b"\xff\xfe\x00", "not UTF-8"),
    ],
)
def test_signed_bodies_that_are_not_events_get_4xx(
    service: Service, body: bytes, reason: str
) -> None:
    headers = (
        signed_headers(body, webhook_id="msg_garbage")
        if body[:1] != b"\xff"
        else {
            "webhook-id": "msg_garbage",
            "webhook-timestamp": str(int(service.clock.now().timestamp())),
            "webhook-signature": "v1,AAAA",
        }
    )
    response = service.http.post("/webhooks/whop", content=body, headers=headers)
    assert response.status_code in (400, 401)
    assert reason in response.json()["error"]
    assert service.count(WebhookEvent) == 0


def test_body_over_the_limit_gets_413(service: Service) -> None:
    body = b'{"id": "msg_big", "type": "x", "data": {"pad": "' + b"a" * (1024 * 1024) + b'"}}'
    response = post_event(service.http, body)
    assert response.status_code == 413
    assert service.count(WebhookEvent) == 0


def test_only_post_is_answered_on_the_webhook_route(service: Service) -> None:
    """The route answers POST (with or without a trailing slash, however the URL was typed in
    Whop's dashboard); any other method gets 405 and stores nothing."""
    for method in ("GET", "PUT", "DELETE"):
        refused = service.http.request(method, "/webhooks/whop", content=payment())
        assert refused.status_code == 405
        assert refused.headers["allow"] == "POST"
    assert service.count(WebhookEvent) == 0
    body = payment()
    stored = service.http.post("/webhooks/whop/", content=body, headers=signed_headers(body))
    assert stored.status_code == 200
    assert service.count(WebhookEvent) == 1


def test_unknown_event_types_are_stored_then_ignored(service: Service) -> None:
    body = json.dumps({"id": "msg_unknown1", "type": "course.created", "data": {"id": "c"}})
    assert service.deliver(body.encode()).json() == {"status": "received"}
    event = service.event("msg_unknown1")
    assert event is not None
    assert event.status == "ignored"


def test_an_event_that_fails_to_apply_is_answered_200_and_stored_failed(service: Service) -> None:
    body = json.dumps(
        {
            "id": "msg_broken1",
            "type": "payment.succeeded",
            "data": {"status": "paid", "plan": {"id": MESSAGE_PLAN}},
        }
    ).encode()
    response = service.deliver(body)
    assert response.status_code == 200
    assert response.json() == {"status": "received"}
    event = service.event("msg_broken1")
    assert event is not None
    assert event.status == "failed"
    assert "payment has no id" in (event.last_error or "")
    assert event.next_attempt_at is None  # its data can never apply: not retried
    assert service.count(Order) == 0


def test_database_unavailable_gets_503(service: Service) -> None:
    if service.runtime.database.backend != "sqlite":
        pytest.skip("makes the database unavailable by moving its SQLite file away")
    path = service.tmp_path / "service.db"
    path.rename(service.tmp_path / "moved.db")
    path.mkdir()  # the database path is now a folder: nothing can be stored
    service.runtime.database.engine.dispose()
    response = post_event(service.http, payment())
    assert response.status_code == 503
    path.rmdir()
    (service.tmp_path / "moved.db").rename(path)
    service.runtime.database.engine.dispose()
    assert service.count(WebhookEvent) == 0
    assert service.queued() == []
    # Whop's redelivery of the same event now succeeds.
    assert post_event(service.http, payment()).status_code == 200


def test_unlisted_plan_is_recorded_only(service: Service) -> None:
    service.deliver(payment(plan=UNLISTED_PLAN))
    [order] = service.orders()
    assert order.status == "paid"
    assert service.queued() == []


def test_renewal_of_a_listed_plan_is_recorded_and_alerts_once(service: Service) -> None:
    for number in range(2):
        service.deliver(payment(id=f"pay_Renewal{number}", billing_reason="subscription_cycle"))
    assert [o.status for o in service.orders()] == ["paid", "paid"]
    assert [name for name in service.queued() if name != "mail.send"] == []
    with service.runtime.database.transaction() as session:
        alerts = list(session.scalars(select(Alert)))
    assert [a.kind for a in alerts] == ["plan_not_one_time"]
    assert service.queued().count("mail.send") == 1  # one email, to the one admin
    assert ADMIN


def test_membership_activated_first_then_payment_matches_the_same_order(service: Service) -> None:
    activation = event_body(
        "membership.activated.legacy.json",
        plan={"id": MESSAGE_PLAN},
        metadata={},
        checkout_configuration_id=None,
    )
    assert service.deliver(activation).json() == {"status": "received"}
    [pending] = service.orders()
    assert (pending.status, pending.whop_membership_id) == ("pending", "mem_Hc4Tq8Wn2ZkPa9")
    assert service.queued() == []  # activation never delivers
    service.deliver(payment())
    [order] = service.orders()
    assert order.id == pending.id
    assert order.status == "paid"
    assert service.queued() == ["delivery.deliver"]


@pytest.fixture
def touchy(tmp_path: Path, clock: FrozenClock) -> Iterator[Service]:
    runtime = make_runtime(
        make_settings(tmp_path, SIGNATURE_FAILURES_ALERT_AT=5, SIGNATURE_FAILURES_WINDOW=60),
        clock,
    )
    server = ServiceServer(runtime)
    with server.running(), httpx.Client(base_url=server.url, timeout=10) as http:
        yield Service(runtime, http, clock, tmp_path)
    runtime.close()


def test_a_burst_of_bad_signatures_raises_one_alert(touchy: Service) -> None:
    for _ in range(12):
        assert post_event(touchy.http, payment(), secret="ws_the_old_secret").status_code == 401
    with touchy.runtime.database.transaction() as session:
        alerts = list(session.scalars(select(Alert)))
    assert [a.kind for a in alerts] == ["webhook_signature_failures"]
    assert "WHOP_WEBHOOK_SECRET" in alerts[0].text_body
    assert touchy.count(WebhookEvent) == 0


def test_the_stored_event_records_the_id_of_what_it_is_about(service: Service) -> None:
    """`object_id` is the envelope's `data.id`, read as applying reads it (stripped): the
    payment's for `payment.*`, the membership's for `membership.*`. The Whop sweep looks a
    payment up by it."""
    paid = payment(id="  pay_ObjectId1 ")
    activation = event_body("membership.activated.legacy.json", id="mem_ObjectId1")
    for body in (paid, activation):
        assert post_event(service.http, body).json() == {"status": "received"}
    for body, object_id in ((paid, "pay_ObjectId1"), (activation, "mem_ObjectId1")):
        event = service.event(json.loads(body)["id"])
        assert event is not None
        assert (event.status, event.object_id) == ("received", object_id)
    apply_webhooks(service.runtime)  # applying leaves it as it was
    event = service.event(json.loads(paid)["id"])
    assert event is not None
    assert (event.status, event.object_id) == ("handled", "pay_ObjectId1")


ABSENT = object()


@pytest.mark.parametrize(
    "data_id", [ABSENT, None, 42, True, "", "   ", {"id": "pay_x"}, ["pay_x"], "p" * 256]
)
def test_an_event_whose_data_has_no_usable_id_is_stored_without_one(
    service: Service, data_id: object
) -> None:
    """A `data.id` that is missing, not a string, blank or longer than the column is stored as
    None: the webhook is never refused for it (applying decides what the event is worth)."""
    document = json.loads(payment())
    if data_id is ABSENT:
        del document["data"]["id"]
    else:
        document["data"]["id"] = data_id
    response = post_event(service.http, json.dumps(document).encode())
    assert (response.status_code, response.json()) == (200, {"status": "received"})
    event = service.event(document["id"])
    assert event is not None
    assert (event.status, event.object_id) == ("received", None)


def test_an_id_as_long_as_the_column_is_kept(service: Service) -> None:
    long_id = "c" * 255
    body = json.dumps({"id": "msg_long_object", "type": "course.created", "data": {"id": long_id}})
    assert post_event(service.http, body.encode()).status_code == 200
    event = service.event("msg_long_object")
    assert event is not None
    assert event.object_id == long_id
