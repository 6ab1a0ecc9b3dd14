"""The cancellation state machine against the Whop simulator over real HTTP, a real SQLite file
and a real SMTP sink; time moves only by the test's clock."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select

from support.harness import (
    ADMIN,
    API_KEY,
    MESSAGE_PLAN,
    NONE_PLAN,
    ServiceServer,
    apply_webhooks,
    drain,
    make_runtime,
    make_settings,
    wait_for,
)
from support.receiver import Receiver
from support.statements import recorded, verbs
from whop_autocancel.alerts.models import Alert
from whop_autocancel.cancellation.models import Cancellation, CancellationAttempt
from whop_autocancel.cancellation.service import RetryRefused
from whop_autocancel.clock import FrozenClock
from whop_autocancel.mail.sink import SmtpSink
from whop_autocancel.orders.models import Order
from whop_autocancel.runtime import Runtime
from whop_autocancel.simulator import SimulatorServer


@dataclass
class World:
    runtime: Runtime
    clock: FrozenClock
    simulator: SimulatorServer
    sink: SmtpSink
    webhook_url: str

    def buy(self, plan: str = MESSAGE_PLAN, **options: Any) -> dict[str, Any]:
        """A purchase whose webhooks reach the service; returns it with its cancellation id."""
        self.simulator.state.set_webhook_url(self.webhook_url)
        options.setdefault("email", f"buyer-{time.monotonic_ns()}@example.com")
        purchase: dict[str, Any] = self.simulator.state.create_purchase(plan, **options)
        wait_for(lambda: self.simulator.state.pending_webhooks() == 0)
        drain(self.runtime)
        with self.runtime.database.transaction() as session:
            order = session.scalars(
                select(Order).where(Order.whop_payment_id == purchase["payment_id"])
            ).one()
            row = session.scalars(
                select(Cancellation).where(Cancellation.order_id == order.id)
            ).first()
        purchase["email"] = options["email"]
        purchase["order_id"] = order.id
        purchase["cancellation_id"] = row.id if row else None
        return purchase

    def row(self, cancellation_id: int) -> Cancellation:
        with self.runtime.database.transaction() as session:
            row = session.get(Cancellation, cancellation_id)
            assert row is not None
            return row

    def run(self, cancellation_id: int, after: float = 0.0) -> Cancellation:
        self.clock.advance(after)
        self.runtime.cancellations.run(cancellation_id)
        return self.row(cancellation_id)

    def calls(self, membership_id: str) -> list[dict[str, Any]]:
        return list(self.simulator.state.calls(membership_id))

    def alerts(self, kind: str | None = None) -> list[Alert]:
        with self.runtime.database.transaction() as session:
            rows = list(session.scalars(select(Alert).order_by(Alert.id)))
        return [a for a in rows if kind is None or a.kind == kind]

    def admin_mail(self) -> list[Any]:
        drain(self.runtime)
        return [m for m in self.sink.to(ADMIN) if not m.subject.startswith("Delivered")]


def make_world(
    tmp_path: Path, clock: FrozenClock, simulator: SimulatorServer, sink: SmtpSink, **settings: Any
) -> Iterator[World]:
    values: dict[str, Any] = {
        "WHOP_API_URL": simulator.api_url,
        "SMTP_URL": sink.url,
        "RETRY_SCHEDULE": "1,2,4",
        "CANCEL_GIVE_UP_AFTER": 3600,
    }
    runtime = make_runtime(make_settings(tmp_path, **{**values, **settings}), clock)
    server = ServiceServer(runtime)
    with server.running():
        webhook_url = f"{server.url}/webhooks/whop"
        simulator.state.set_webhook_url(webhook_url)
        yield World(runtime, clock, simulator, sink, webhook_url)
    runtime.close()


@pytest.fixture
def world(
    tmp_path: Path,
    clock: FrozenClock,
    simulator: SimulatorServer,
    smtp_sink: SmtpSink,
    database_url: str,
) -> Iterator[World]:
    yield from make_world(tmp_path, clock, simulator, smtp_sink, DATABASE_URL=database_url)


def test_a_delivered_purchase_is_cancelled_with_one_immediate_call(world: World) -> None:
    purchase = world.buy()
    cancellation_id = purchase["cancellation_id"]
    assert world.row(cancellation_id).status == "scheduled"
    assert world.run(cancellation_id).status == "scheduled"  # CANCEL_DELAY not over yet
    assert world.calls(purchase["membership_id"]) == []
    row = world.run(cancellation_id, after=5)
    assert row.status == "canceled"
    assert row.canceled_at is not None
    [call] = world.calls(purchase["membership_id"])
    assert call["method"] == "POST"
    assert call["body"] == {"cancellation_mode": "immediate"}
    assert call["idempotency_key"] == f"cancel-{row.idempotency_token}-1"
    assert call["api_version_date"] is None
    assert world.simulator.state.membership(purchase["membership_id"])["status"] == "canceled"
    # The customer got the product, the admin the notice; nobody got an alert.
    drain(world.runtime)
    assert len(world.sink.to(purchase["email"])) == 1
    assert "order " + purchase["order_id"] in world.sink.to(purchase["email"])[0].text
    assert world.alerts() == []


def test_a_plain_cancellation_reads_its_row_once_and_writes_it_twice(world: World) -> None:
    """Every purchase runs this: the claim (one UPDATE, then one read of the row with its
    order's facts) and Whop's success recorded with one UPDATE (the lease it holds is its
    condition: no second read of the row or of its order)."""
    purchase = world.buy()
    cancellation_id = purchase["cancellation_id"]
    world.clock.advance(5)
    with recorded(world.runtime.database.engine) as sent:
        world.runtime.cancellations.run(cancellation_id)
    on_rows = [(sql, p) for sql, p in sent if "cancellations" in sql or "orders" in sql]
    assert verbs(on_rows) == ["UPDATE", "SELECT", "UPDATE"]
    row = world.row(cancellation_id)
    assert (row.status, row.attempts, row.last_http_status) == ("canceled", 1, 200)
    assert (row.lease_owner, row.lease_until, row.last_error) == (None, None, None)
    assert row.canceled_at == world.clock.now()
    assert row.updated_at == world.clock.now()
    assert world.simulator.state.membership(purchase["membership_id"])["status"] == "canceled"


def test_the_claim_reads_the_stop_and_the_delivery_emails_with_its_row(world: World) -> None:
    """The claim's one read of the row and its order's facts also brings what else decides
    the call: whether Whop's stop (a 429's `Retry-After`) is in force, and whether the
    order's delivery email was accepted. They were two more reads for every purchase. The
    one other read is of the refunds and disputes not applied yet, which the webhooks' layer
    answers."""
    purchase = world.buy()
    world.clock.advance(5)
    with recorded(world.runtime.database.engine) as sent:
        world.runtime.cancellations.run(purchase["cancellation_id"])
    reads = [sql for sql, _ in sent if sql.lstrip().upper().startswith("SELECT")]
    # (Then the pacer's reads before the call, the shared rate limit's: its own.)
    claim = reads[: next(n for n, sql in enumerate(reads) if "rate_buckets" in sql)]
    assert len(claim) == 2, claim
    assert "webhook_events" in claim[1]
    assert world.row(purchase["cancellation_id"]).status == "canceled"


def test_an_answer_after_the_lease_was_lost_changes_nothing(world: World) -> None:
    """Our call is at Whop when another worker takes the row over (our lease ran out): Whop's
    success, when it comes, is written to the timeline only; the row stays the other
    worker's, which settles it with its own call (the same key: Whop's stored answer)."""
    import threading

    purchase = world.buy()
    cancellation_id, membership = purchase["cancellation_id"], purchase["membership_id"]
    world.clock.advance(5)
    state = world.simulator.state
    state.hold(True)
    ours = threading.Thread(target=world.runtime.cancellations.run, args=(cancellation_id,))
    ours.start()
    wait_for(lambda: state.held == 1, what="our call at Whop")
    with world.runtime.database.transaction() as session:
        row = session.get(Cancellation, cancellation_id)
        assert row is not None
        assert row.status == "running"
        row.lease_owner = "another-worker"  # (its claim after our lease ran out)
    state.hold(False)
    ours.join()
    row = world.row(cancellation_id)
    assert (row.status, row.lease_owner, row.attempts) == ("running", "another-worker", 0)
    assert (row.canceled_at, row.last_http_status) == (None, None)
    with world.runtime.database.transaction() as session:
        [attempt] = session.scalars(select(CancellationAttempt)).all()
        assert (attempt.http_status, attempt.result) == (200, "lease lost")
    assert state.membership(membership)["status"] == "canceled"


def test_the_echo_of_our_own_cancel_is_recorded_and_changes_nothing(world: World) -> None:
    purchase = world.buy()
    world.run(purchase["cancellation_id"], after=5)
    wait_for(lambda: world.simulator.state.pending_webhooks() == 0)
    deliveries = [
        d for d in world.simulator.state.deliveries() if d["type"] == "membership.deactivated"
    ]
    assert [d["status"] for d in deliveries] == [200]
    assert world.row(purchase["cancellation_id"]).status == "canceled"


@pytest.fixture
def versioned_world(
    tmp_path: Path,
    clock: FrozenClock,
    simulator: SimulatorServer,
    smtp_sink: SmtpSink,
    database_url: str,
) -> Iterator[World]:
    yield from make_world(
        tmp_path,
        clock,
        simulator,
        smtp_sink,
        DATABASE_URL=database_url,
        WHOP_API_VERSION_DATE="2026-09-29",
    )


def test_the_versioned_api_gets_its_own_body(versioned_world: World) -> None:
    purchase = versioned_world.buy(shape="pinned")
    assert versioned_world.run(purchase["cancellation_id"], after=5).status == "canceled"
    [call] = versioned_world.calls(purchase["membership_id"])
    assert call["body"] == {"cancel_at_period_end": False}
    assert call["api_version_date"] == "2026-09-29"


def test_cancelled_elsewhere_before_we_run_becomes_already_inactive_without_a_call(
    world: World,
) -> None:
    purchase = world.buy()
    membership = purchase["membership_id"]
    httpx.post(
        f"{world.simulator.api_url}/memberships/{membership}/cancel",
        json={"cancellation_mode": "immediate"},
        headers={"Authorization": f"Bearer {API_KEY}"},
    ).raise_for_status()
    wait_for(lambda: world.simulator.state.pending_webhooks() == 0)  # the deactivated webhook
    apply_webhooks(world.runtime)  # as the worker does
    row = world.run(purchase["cancellation_id"], after=5)
    assert row.status == "already_inactive"
    assert [c["method"] for c in world.calls(membership)] == ["POST"]  # only the manual one


def test_a_409_costs_one_read_and_ends_already_inactive(world: World) -> None:
    purchase = world.buy()
    membership = purchase["membership_id"]
    world.simulator.state.set_webhook_url(None)  # the echo is lost
    httpx.post(
        f"{world.simulator.api_url}/memberships/{membership}/cancel",
        json={"cancellation_mode": "immediate"},
        headers={"Authorization": f"Bearer {API_KEY}"},
    ).raise_for_status()
    row = world.run(purchase["cancellation_id"], after=5)
    assert row.status == "already_inactive"
    assert row.last_http_status == 409
    assert [(c["method"], c["status"]) for c in world.calls(membership)] == [
        ("POST", 200),
        ("POST", 409),
        ("GET", 200),
    ]


def test_a_refused_cancel_fails_with_exactly_one_alert_email(world: World) -> None:
    purchase = world.buy()
    membership = purchase["membership_id"]
    world.simulator.state.reject(membership, 422)
    row = world.run(purchase["cancellation_id"], after=5)
    assert row.status == "failed"
    assert "422" in (row.last_error or "")
    # A duplicate job and a stuck-work sweep change nothing and send nothing more.
    world.run(purchase["cancellation_id"], after=600)
    world.runtime.stuck_sweep.run(force=True)
    [email] = world.admin_mail()
    assert membership in email.subject
    for text in (email.text, email.html):
        assert purchase["order_id"] in text
        assert purchase["email"] in text
        assert membership in text
        assert "This membership cannot be canceled" in text
        assert "Cancel the membership immediately" in text
        assert f"cancellations retry {purchase['cancellation_id']}" in text
    assert [a.kind for a in world.alerts()] == ["cancellation_failed"]


def test_an_admin_retry_is_a_new_generation_and_can_succeed(world: World) -> None:
    purchase = world.buy()
    membership, cancellation_id = purchase["membership_id"], purchase["cancellation_id"]
    world.simulator.state.reject(membership, 422)
    assert world.run(cancellation_id, after=5).status == "failed"
    world.simulator.state.unreject(membership)
    with world.runtime.database.transaction() as session:
        world.runtime.cancellations.retry(session, cancellation_id)
    row = world.run(cancellation_id)
    assert (row.status, row.generation) == ("canceled", 2)
    first, second = cancel_keys(world, membership)
    assert key_parts(first)[1] == 1
    assert key_parts(second) == (row.idempotency_token, 2)
    with (
        pytest.raises(RetryRefused, match="only failed or skipped"),
        world.runtime.database.transaction() as session,
    ):
        world.runtime.cancellations.retry(session, cancellation_id)


def test_an_unknown_membership_is_a_permanent_failure(world: World) -> None:
    purchase = world.buy()
    with world.runtime.database.transaction() as session:
        row = session.get(Cancellation, purchase["cancellation_id"])
        assert row is not None
        row.membership_id = "mem_DoesNotExist1"
    row = world.run(purchase["cancellation_id"], after=5)
    assert row.status == "failed"
    assert row.last_http_status == 404
    assert len(world.alerts("cancellation_failed")) == 1


def test_an_outage_delays_with_backoff_alerts_once_and_never_loses(world: World) -> None:
    first, second = world.buy(), world.buy(plan=NONE_PLAN)
    world.simulator.state.set_outage(True)
    world.clock.advance(5)
    delays = []
    for _ in range(5):
        for purchase in (first, second):
            before = world.clock.now()
            row = world.run(purchase["cancellation_id"])
            assert row.status == "scheduled"
            if purchase is first:
                delays.append((row.next_attempt_at - before).total_seconds())
        world.clock.advance(max(delays[-1], 4) * 1.2)
    # 1, 2, 4, then the last interval again; ±10 % jitter.
    for delay, expected in zip(delays, [1, 2, 4, 4, 4], strict=True):
        assert expected * 0.89 <= delay <= expected * 1.11
    assert world.row(first["cancellation_id"]).attempts == 5
    [alert] = world.alerts()
    assert alert.kind == "whop_unreachable"
    world.simulator.state.set_outage(False)
    for purchase in (first, second):
        assert world.run(purchase["cancellation_id"]).status == "canceled"
    [alert] = world.alerts()
    assert alert.resolved_at is not None
    subjects = [m.subject for m in world.admin_mail()]
    assert subjects == ["Whop cannot be reached: membership cancellations are delayed"]


@pytest.fixture
def impatient_world(
    tmp_path: Path,
    clock: FrozenClock,
    simulator: SimulatorServer,
    smtp_sink: SmtpSink,
    database_url: str,
) -> Iterator[World]:
    yield from make_world(
        tmp_path, clock, simulator, smtp_sink, DATABASE_URL=database_url, CANCEL_GIVE_UP_AFTER=30
    )


def test_after_give_up_the_row_fails_with_one_alert(impatient_world: World) -> None:
    world = impatient_world
    purchase = world.buy()
    world.simulator.state.set_outage(True)
    assert world.run(purchase["cancellation_id"], after=5).status == "scheduled"
    row = world.run(purchase["cancellation_id"], after=31)
    assert row.status == "failed"
    assert "could not be reached" in (row.last_error or "")
    assert [a.kind for a in world.alerts()] == ["cancellation_failed"]


def test_a_forbidden_key_pauses_everything_with_one_alert_then_resumes(world: World) -> None:
    purchases = [world.buy(), world.buy(), world.buy(plan=NONE_PLAN)]
    world.simulator.state.set_forbidden(True)
    world.clock.advance(5)
    for _ in range(2):
        for purchase in purchases:
            row = world.run(purchase["cancellation_id"])
            assert row.status == "scheduled"
            assert row.last_http_status == 403
        world.clock.advance(4.5)
    assert world.alerts() == []  # the sweep gathers the paused orders into one alert
    world.runtime.stuck_sweep.run(force=True)
    world.runtime.stuck_sweep.run(force=True)  # still open: not raised again
    [alert] = world.alerts()
    assert alert.kind == "whop_auth"
    assert "membership:cancel" in alert.text_body
    assert "3 cancellation(s) below are paused" in alert.text_body
    for purchase in purchases:
        assert purchase["order_id"] in alert.text_body
        assert purchase["membership_id"] in alert.text_body
    world.simulator.state.set_forbidden(False)
    for purchase in purchases:
        assert world.run(purchase["cancellation_id"]).status == "canceled"
    assert world.alerts()[0].resolved_at is not None
    assert len(world.admin_mail()) == 1


def test_a_refunded_order_is_skipped_without_a_call(world: World) -> None:
    purchase = world.buy()
    with world.runtime.database.transaction() as session:
        order = session.get(Order, purchase["order_id"])
        assert order is not None
        order.status = "refunded"
    row = world.run(purchase["cancellation_id"], after=5)
    assert row.status == "skipped"
    assert "refunded" in (row.last_error or "")
    assert world.calls(purchase["membership_id"]) == []


def test_delivery_only_plans_get_no_cancellation(world: World) -> None:
    from support.harness import KEEP_PLAN

    purchase = world.buy(plan=KEEP_PLAN)
    assert purchase["cancellation_id"] is None
    drain(world.runtime)
    assert len(world.sink.to(purchase["email"])) == 1


def test_a_missing_membership_id_waits_for_activation(world: World) -> None:
    purchase = world.buy(shape="pinned", payment_has_membership_id=False, send_activation=False)
    cancellation_id = purchase["cancellation_id"]
    row = world.run(cancellation_id, after=5)
    assert (row.status, row.membership_id) == ("scheduled", None)
    assert world.calls(purchase["membership_id"]) == []


def test_a_membership_id_that_never_comes_fails_with_an_alert(world: World) -> None:
    purchase = world.buy(shape="pinned", payment_has_membership_id=False, send_activation=False)
    row = world.run(purchase["cancellation_id"], after=301)
    assert row.status == "failed"
    assert "never told us the membership id" in (row.last_error or "")
    assert len(world.alerts("cancellation_failed")) == 1


def test_a_429_sets_one_not_before_that_every_row_respects(world: World) -> None:
    first, second = world.buy(), world.buy()
    world.simulator.state.throttle(1, retry_after=30)
    world.clock.advance(5)
    start = world.clock.now()
    row = world.run(first["cancellation_id"])
    assert (row.status, row.attempts, row.last_http_status) == ("scheduled", 0, 429)
    assert 27 <= (row.next_attempt_at - start).total_seconds() <= 33
    # The other row waits for the same "not before" without spending a call.
    row = world.run(second["cancellation_id"])
    assert row.status == "scheduled"
    assert world.calls(second["membership_id"]) == []
    assert (row.next_attempt_at - start).total_seconds() >= 27
    world.clock.advance(34)
    for purchase in (first, second):
        assert world.run(purchase["cancellation_id"]).status == "canceled"
    assert [c["status"] for c in world.calls(first["membership_id"])] == [429, 200]


def test_two_workers_never_run_one_cancellation_at_once(world: World) -> None:
    import threading

    purchase = world.buy()
    world.simulator.state.set_latency(0.5)
    world.clock.advance(5)
    threads = [
        threading.Thread(
            target=world.runtime.cancellations.run, args=(purchase["cancellation_id"],)
        )
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert world.row(purchase["cancellation_id"]).status == "canceled"
    assert len(world.calls(purchase["membership_id"])) == 1


def test_no_customer_email_means_delivery_failed_an_alert_and_no_cancellation(
    world: World,
) -> None:
    from whop_autocancel.whop.payloads import PaymentFacts

    now = world.clock.now()
    facts = PaymentFacts(
        payment_id="pay_NoEmail1",
        status="paid",
        billing_reason="one_time",
        membership_id="mem_NoEmail1",
        plan_id=MESSAGE_PLAN,
        product_id=None,
        user_id=None,
        email=None,
        checkout_configuration_id=None,
        metadata={},
        amount="5.00",
        currency="usd",
        created_at=now,
        paid_at=now,
    )
    with world.runtime.database.transaction() as session:
        order_id = world.runtime.orders.apply_payment(session, facts, now).id
    drain(world.runtime)
    with world.runtime.database.transaction() as session:
        order = session.get(Order, order_id)
        assert order is not None
        assert order.status == "delivery_failed"
        assert "member:email:read" in (order.delivery_error or "")
        assert session.scalars(select(Cancellation)).first() is None
    [alert] = world.alerts()
    assert alert.kind == "delivery_failed"
    [email] = world.admin_mail()
    assert "NOT cancelled" in email.text


def test_a_late_activation_wakes_the_waiting_cancellation(world: World) -> None:
    purchase = world.buy(shape="pinned", payment_has_membership_id=False, send_activation=False)
    cancellation_id = purchase["cancellation_id"]
    assert world.run(cancellation_id, after=5).membership_id is None
    world.runtime.jobs.huey.flush()
    # membership.activated arrives late: the id is attached and the job enqueued again.
    from whop_autocancel.whop.payloads import MembershipFacts

    facts = MembershipFacts(
        membership_id=purchase["membership_id"],
        status="completed",
        plan_id=MESSAGE_PLAN,
        product_id=None,
        user_id=None,
        email=None,
        checkout_configuration_id=None,
        metadata={},
    )
    with world.runtime.database.transaction() as session:
        order = session.get(Order, purchase["order_id"])
        assert order is not None
        facts = MembershipFacts(**{**facts.__dict__, "metadata": {"order_id": order.id}})
        world.runtime.orders.apply_membership_live(session, facts, world.clock.now())
    assert [
        t.name for t in world.runtime.jobs.huey.scheduled() + world.runtime.jobs.huey.pending()
    ] == ["cancellation.run"]
    world.clock.advance(60)
    assert world.run(cancellation_id).status == "canceled"


# The Idempotency-Key -----------------------------------------------------------------------

KEY = re.compile(r"^cancel-([0-9a-f]{32})-([0-9]+)$")


def key_parts(key: str) -> tuple[str, int]:
    """(token, generation) of an Idempotency-Key we sent."""
    match = KEY.match(key)
    assert match is not None, key
    return match.group(1), int(match.group(2))


def cancel_keys(world: World, membership_id: str) -> list[str]:
    """The Idempotency-Key of each cancel call Whop received for the membership, in order."""
    return [c["idempotency_key"] for c in world.calls(membership_id) if c["method"] == "POST"]


def test_the_key_is_a_random_token_of_the_row_and_unique_across_installs(
    world: World,
    tmp_path: Path,
    clock: FrozenClock,
    simulator: SimulatorServer,
    smtp_sink: SmtpSink,
) -> None:
    """A second install on the same API key (or a restored backup) numbers its rows from 1
    again: its keys must still never repeat the first one's."""
    (tmp_path / "second").mkdir()
    with contextmanager(make_world)(tmp_path / "second", clock, simulator, smtp_sink) as second:
        bought = [(world, world.buy()), (world, world.buy()), (second, second.buy())]
        clock.advance(5)
        keys = []
        for owner, purchase in bought:
            row = owner.run(purchase["cancellation_id"])
            assert row.status == "canceled"
            [key] = cancel_keys(owner, purchase["membership_id"])
            assert key_parts(key) == (row.idempotency_token, 1)
            assert len(key) <= 255
            keys.append(key)
    assert len(set(keys)) == 3


def test_a_row_made_before_tokens_gets_one_when_first_claimed(world: World) -> None:
    purchase = world.buy()
    with world.runtime.database.transaction() as session:
        row = session.get(Cancellation, purchase["cancellation_id"])
        assert row is not None
        assert row.idempotency_token is not None
        row.idempotency_token = None  # as migration 0005 left the rows it found
    row = world.run(purchase["cancellation_id"], after=5)
    assert row.status == "canceled"
    assert row.idempotency_token is not None
    assert cancel_keys(world, purchase["membership_id"]) == [f"cancel-{row.idempotency_token}-1"]


def test_after_a_403_the_next_attempt_uses_a_new_key(world: World) -> None:
    """Whop may have stored the refusal under the key: the resume must not replay it."""
    purchase = world.buy()
    world.simulator.state.set_forbidden(True)
    paused = world.run(purchase["cancellation_id"], after=5)
    assert (paused.status, paused.last_http_status, paused.generation) == ("scheduled", 403, 1)
    world.simulator.state.set_forbidden(False)
    row = world.run(purchase["cancellation_id"], after=5)
    assert (row.status, row.generation) == ("canceled", 1)
    first, second = cancel_keys(world, purchase["membership_id"])
    assert key_parts(first)[0] != key_parts(second)[0]
    assert key_parts(second) == (row.idempotency_token, 1)


def test_after_a_409_the_next_attempt_uses_a_new_key_so_a_stored_refusal_cannot_block(
    world: World,
) -> None:
    purchase = world.buy()
    membership = purchase["membership_id"]
    world.simulator.state.reject(membership, 409, read_status=503)
    row = world.run(purchase["cancellation_id"], after=5)
    assert (row.status, row.generation) == ("scheduled", 1)  # the re-read failed: try again
    world.simulator.state.unreject(membership)
    row = world.run(purchase["cancellation_id"], after=5)
    assert row.status == "canceled"
    assert [(c["method"], c["status"], c["replayed"]) for c in world.calls(membership)] == [
        ("POST", 409, False),
        ("GET", 503, False),
        ("POST", 200, False),  # carried out, not Whop's stored 409 replayed
    ]
    first, second = cancel_keys(world, membership)
    assert key_parts(first)[0] != key_parts(second)[0]


def test_an_unknown_outcome_is_repeated_with_the_same_key(world: World) -> None:
    """A 503 or a timeout says nothing about the cancel: the next call repeats the key, and
    Whop answers a cancel it carried out with its stored answer."""
    purchase = world.buy()
    cancellation_id, membership = purchase["cancellation_id"], purchase["membership_id"]
    state = world.simulator.state
    state.set_webhook_url(None)  # the echo is lost
    state.set_outage(True)
    assert world.run(cancellation_id, after=5).last_http_status == 503
    state.set_outage(False)
    state.set_faults(timeout_rate=1.0, timeout_seconds=0)
    assert world.run(cancellation_id, after=5).last_http_status == 504
    state.set_faults(timeout_rate=0.0)
    row = world.run(cancellation_id, after=10)
    assert row.status == "canceled"
    calls = [(c["status"], c["replayed"], c["timed_out"]) for c in world.calls(membership)]
    assert calls == [(503, False, False), (504, False, True), (200, True, False)]
    assert cancel_keys(world, membership) == [f"cancel-{row.idempotency_token}-1"] * 3


# The membership Whop answered for ----------------------------------------------------------


def test_a_2xx_for_another_membership_fails_with_an_alert_and_is_not_counted(
    world: World,
) -> None:
    mine, other = world.buy(), world.buy()
    assert world.run(other["cancellation_id"], after=5).status == "canceled"
    world.simulator.state.answer_as(mine["membership_id"], other["membership_id"])
    row = world.run(mine["cancellation_id"])
    assert (row.status, row.canceled_at) == ("failed", None)
    assert f"for another membership ({other['membership_id']})" in (row.last_error or "")
    assert world.simulator.state.membership(mine["membership_id"])["status"] == "completed"
    [alert] = world.alerts()
    assert alert.kind == "cancellation_failed"
    assert mine["membership_id"] in alert.subject
    assert other["membership_id"] in alert.text_body


def test_a_re_read_for_another_membership_is_a_failure(versioned_world: World) -> None:
    world = versioned_world
    mine, other = world.buy(shape="pinned"), world.buy(shape="pinned")
    assert world.run(other["cancellation_id"], after=5).status == "canceled"
    world.simulator.state.reject(mine["membership_id"], 409)
    world.simulator.state.answer_as(mine["membership_id"], other["membership_id"])
    row = world.run(mine["cancellation_id"])
    assert (row.status, row.canceled_at) == ("failed", None)  # not already_inactive
    assert f"for another membership ({other['membership_id']})" in (row.last_error or "")
    assert [(c["method"], c["status"]) for c in world.calls(mine["membership_id"])] == [
        ("POST", 409),
        ("GET", 200),
    ]
    assert [a.kind for a in world.alerts()] == ["cancellation_failed"]


# Whop says canceled: who did it -------------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """Where Whop's webhooks go while a test holds them back."""
    held = Receiver()
    yield held
    held.close()


def deliver_late(world: World, receiver: Receiver, membership_id: str) -> None:
    """Deliver to the service now, byte for byte, the echo Whop sent to `receiver` (a late
    delivery: it arrives after whatever the test did in between)."""
    wait_for(lambda: any(membership_id.encode() in body for _, body in receiver.snapshot()))
    headers, body = next((h, b) for h, b in receiver.snapshot() if membership_id.encode() in b)
    forwarded = {
        k: v
        for k, v in headers.items()
        if k.lower().startswith("webhook-") or k.lower() == "content-type"
    }
    assert httpx.post(world.webhook_url, content=body, headers=forwarded).status_code == 200
    drain(world.runtime)


def test_the_echo_after_our_lost_answer_says_canceled(world: World, receiver: Receiver) -> None:
    """Finding 9: our call timed out at our side but Whop carried it out; its echo arrives
    after we recorded the timeout. The row says we cancelled it, not that Whop had."""
    purchase = world.buy()
    cancellation_id, membership = purchase["cancellation_id"], purchase["membership_id"]
    state = world.simulator.state
    state.set_webhook_url(receiver.url)  # the echo is held back
    state.set_faults(timeout_rate=1.0, timeout_seconds=0)
    row = world.run(cancellation_id, after=5)
    assert (row.status, row.attempts, row.last_http_status) == ("scheduled", 1, 504)
    state.set_faults(timeout_rate=0.0)
    deliver_late(world, receiver, membership)
    row = world.row(cancellation_id)
    assert (row.status, row.canceled_at) == ("canceled", world.clock.now())
    assert "after our cancel call whose answer was lost" in (row.last_error or "")
    assert world.run(cancellation_id, after=60).status == "canceled"  # a late job: nothing
    assert [c["status"] for c in world.calls(membership)] == [504]
    assert world.alerts() == []


def test_a_429_after_our_lost_answer_hides_nothing(world: World, receiver: Receiver) -> None:
    """A 429 costs no attempt and keeps the status of the last attempt: the lost answer
    still tells the echo that the cancel was ours."""
    purchase = world.buy()
    cancellation_id, membership = purchase["cancellation_id"], purchase["membership_id"]
    state = world.simulator.state
    state.set_webhook_url(receiver.url)
    state.set_faults(timeout_rate=1.0, timeout_seconds=0)
    world.run(cancellation_id, after=5)
    state.set_faults(timeout_rate=0.0)
    state.throttle(1, retry_after=1)
    row = world.run(cancellation_id, after=5)
    assert (row.status, row.attempts, row.last_http_status) == ("scheduled", 1, 504)
    assert "429" in (row.last_error or "")
    deliver_late(world, receiver, membership)
    assert world.row(cancellation_id).status == "canceled"
    assert [c["status"] for c in world.calls(membership)] == [504, 429]


def test_a_409_after_our_lost_answer_says_canceled(world: World) -> None:
    """The same when Whop no longer replays the key (its retention window passed): the 409
    and the re-read say canceled, and it was our earlier call."""
    purchase = world.buy()
    cancellation_id, membership = purchase["cancellation_id"], purchase["membership_id"]
    state = world.simulator.state
    state.set_webhook_url(None)  # the echo is lost
    state.set_faults(timeout_rate=1.0, timeout_seconds=0)
    assert world.run(cancellation_id, after=5).last_http_status == 504
    state.set_faults(timeout_rate=0.0)
    state.forget_idempotency_keys()
    row = world.run(cancellation_id, after=5)
    assert (row.status, row.last_http_status) == ("canceled", 409)
    assert row.canceled_at == world.clock.now()
    assert "answer was lost" in (row.last_error or "")
    assert [(c["method"], c["status"]) for c in world.calls(membership)] == [
        ("POST", 504),
        ("POST", 409),
        ("GET", 200),
    ]


def test_cancelled_by_hand_while_our_calls_were_refused_is_already_inactive(
    world: World, receiver: Receiver
) -> None:
    """No call of ours went through (403): the membership was cancelled by someone else."""
    purchase = world.buy()
    membership = purchase["membership_id"]
    world.simulator.state.set_forbidden(True)
    assert world.run(purchase["cancellation_id"], after=5).last_http_status == 403
    world.simulator.state.set_forbidden(False)
    world.simulator.state.set_webhook_url(receiver.url)
    httpx.post(
        f"{world.simulator.api_url}/memberships/{membership}/cancel",
        json={"cancellation_mode": "immediate"},
        headers={"Authorization": f"Bearer {API_KEY}"},
    ).raise_for_status()
    deliver_late(world, receiver, membership)
    row = world.row(purchase["cancellation_id"])
    assert (row.status, row.canceled_at) == ("already_inactive", None)
    assert "none of our calls had gone through" in (row.last_error or "")


def test_the_echo_while_our_call_is_in_flight_ends_canceled(
    world: World, receiver: Receiver
) -> None:
    """A worker's call went out and the worker died before recording the answer (the row is
    `running`); the echo arrives meanwhile. It changes nothing, and the next run settles the
    row as ours: the repeated key gets Whop's stored answer."""
    purchase = world.buy()
    cancellation_id, membership = purchase["cancellation_id"], purchase["membership_id"]
    world.clock.advance(5)
    with world.runtime.database.transaction() as session:
        row = session.get(Cancellation, cancellation_id)
        assert row is not None
        row.status, row.lease_owner = "running", "worker-that-died"
        row.lease_until = world.clock.now() + timedelta(seconds=30)
        key = f"cancel-{row.idempotency_token}-{row.generation}"
    world.simulator.state.set_webhook_url(receiver.url)
    httpx.post(  # the dead worker's call, carried out by Whop
        f"{world.simulator.api_url}/memberships/{membership}/cancel",
        json={"cancellation_mode": "immediate"},
        headers={"Authorization": f"Bearer {API_KEY}", "Idempotency-Key": key},
    ).raise_for_status()
    deliver_late(world, receiver, membership)
    assert world.row(cancellation_id).status == "running"
    row = world.run(cancellation_id, after=31)
    assert (row.status, row.canceled_at) == ("canceled", world.clock.now())
    assert [(c["status"], c["replayed"]) for c in world.calls(membership)] == [
        (200, False),
        (200, True),
    ]


def test_calls_to_whop_hold_no_job_thread(world: World) -> None:
    """One job thread hands six due cancellations over; all six calls are at Whop at once (a
    slow Whop holds no thread), and each membership is cancelled by one call."""
    purchases = [world.buy() for _ in range(6)]
    world.clock.advance(5)
    runtime, sim = world.runtime, world.simulator.state
    runs, cpu = attempt_metrics()
    sim.hold(True)
    runtime.start_dispatcher()
    try:
        for purchase in purchases:
            runtime.run_cancellation(purchase["cancellation_id"])  # the job, on this thread
        wait_for(lambda: sim.held == 6, what="six calls in flight at once")
        sim.hold(False)
        wait_for(
            lambda: all(world.row(p["cancellation_id"]).status == "canceled" for p in purchases),
            what="every cancellation done",
        )
    finally:
        sim.hold(False)
        runtime.stop_dispatcher()
    for purchase in purchases:
        assert [c["method"] for c in world.calls(purchase["membership_id"])] == ["POST"]
    # Each attempt counted as a job run, with the CPU time of its database work.
    runs_after, cpu_after = attempt_metrics()
    assert runs_after - runs == 6
    assert cpu_after > cpu


def attempt_metrics() -> tuple[float, float]:
    """The dispatcher's attempts so far in this process: (runs, CPU seconds)."""
    labels = {"job": "cancellation.attempt"}
    return (
        REGISTRY.get_sample_value("whop_autocancel_job_runs_total", labels) or 0.0,
        REGISTRY.get_sample_value("whop_autocancel_job_cpu_seconds_total", labels) or 0.0,
    )


def test_one_cancellation_handed_over_many_times_makes_one_call(world: World) -> None:
    purchase = world.buy()
    world.clock.advance(5)
    runtime, sim = world.runtime, world.simulator.state
    sim.hold(True)
    runtime.start_dispatcher()
    try:
        for _ in range(5):
            runtime.run_cancellation(purchase["cancellation_id"])
        wait_for(lambda: sim.held == 1, what="the call at Whop")
        for _ in range(5):  # while its call is in flight: the row is leased
            runtime.run_cancellation(purchase["cancellation_id"])
        sim.hold(False)
        wait_for(lambda: world.row(purchase["cancellation_id"]).status == "canceled")
    finally:
        sim.hold(False)
        runtime.stop_dispatcher()
    assert [c["method"] for c in world.calls(purchase["membership_id"])] == ["POST"]
    assert sim.held == 0


def test_a_workers_own_delayed_cancellation_skips_the_queue_and_runs_on_its_timer(
    world: World,
) -> None:
    purchase = world.buy()
    world.clock.advance(5)  # due (the service's clock); the dispatcher's timer is its own
    runtime = world.runtime
    runtime.jobs.huey.flush()
    runtime.start_dispatcher()
    try:
        runtime.jobs.enqueue("cancellation.run", purchase["cancellation_id"], delay=0.05)
        assert runtime.jobs.pending() == 0  # not on the job queue
        wait_for(lambda: world.row(purchase["cancellation_id"]).status == "canceled")
    finally:
        runtime.stop_dispatcher()


def test_a_graceful_stop_hands_what_waits_back_to_the_queue(world: World) -> None:
    first, second = world.buy(), world.buy()
    runtime = world.runtime
    runtime.jobs.huey.flush()
    runtime.start_dispatcher()
    world.simulator.state.hold(True)
    try:
        runtime.jobs.enqueue("cancellation.run", first["cancellation_id"], delay=3600)
        runtime.jobs.enqueue("cancellation.run", second["cancellation_id"], delay=3600)
        assert runtime.jobs.pending() == 0
    finally:
        runtime.stop_dispatcher()
        world.simulator.state.hold(False)
    waiting = runtime.jobs.huey.pending()  # (huey files a delayed job on the queue, with its eta)
    assert all(task.eta is not None for task in waiting)
    assert sorted(task.args for task in waiting) == sorted(
        [(first["cancellation_id"],), (second["cancellation_id"],)]
    )
    # With no dispatcher, the job runs in the thread that takes it, as before.
    world.clock.advance(5)
    drain(runtime, include_scheduled=True)
    assert world.row(first["cancellation_id"]).status == "canceled"
    assert world.row(second["cancellation_id"]).status == "canceled"


def test_one_attempt_runs_from_a_thread_that_already_runs_an_event_loop(world: World) -> None:
    """`run` (tests, the `cancel` command) may be called from inside async code or beside
    Playwright's sync API: it then runs its attempt on a loop of its own."""
    import asyncio
    import threading

    purchase = world.buy()
    world.clock.advance(5)

    async def inside() -> None:
        world.runtime.cancellations.run(purchase["cancellation_id"])

    failures: list[BaseException] = []

    def a_thread_with_a_loop() -> None:  # (this test's thread may run Playwright's loop)
        try:
            asyncio.run(inside())
        except BaseException as error:
            failures.append(error)

    thread = threading.Thread(target=a_thread_with_a_loop)
    thread.start()
    thread.join()
    assert failures == []
    assert world.row(purchase["cancellation_id"]).status == "canceled"


def test_a_stop_cuts_calls_that_outlast_the_shutdown_timeout_and_their_rows_wait_for_the_sweep(
    world: World,
) -> None:
    from whop_autocancel.cancellation.dispatch import CancelDispatcher

    purchases = [world.buy() for _ in range(3)]
    world.clock.advance(5)
    runtime, sim = world.runtime, world.simulator.state
    dispatcher = CancelDispatcher(
        runtime.cancellations, runtime.async_whop, rate=100, burst=10, shutdown_timeout=0.2
    )
    sim.hold(True)
    dispatcher.start()
    try:
        for purchase in purchases:
            assert dispatcher.submit(purchase["cancellation_id"])
        wait_for(lambda: sim.held == 3, what="three calls at Whop")
        handed_back: list[tuple[int, float]] = []
        dispatcher.stop(lambda cid, delay: handed_back.append((cid, delay)))
    finally:
        sim.hold(False)
    assert not dispatcher.running
    assert handed_back == []  # nothing was waiting: all three were at Whop
    # Cut short mid-call: each row keeps its lease, and the sweep runs it again (same key).
    assert {world.row(p["cancellation_id"]).status for p in purchases} == {"running"}
    assert not dispatcher.submit(purchases[0]["cancellation_id"])  # stopped: the queue's turn
