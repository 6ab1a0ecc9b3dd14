"""`whop-autocancel emails` and `emails retry` (issue 11, item 2): the outbox as the admin sees
it (never a body, never a chat webhook's URL), and a failed email put back to be sent the way
the outbox sends any email: once the SMTP server accepts a retried delivery email, the order's
cancellation that waited for it runs, as after any accepted delivery email. Each retry, and
each refusal, is in the audit table.

Real parts: each database, the Whop simulator over HTTP, the project's SMTP sink answering 550
for one address and 451 for a while; the commands run as real processes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from support.cli_shop import buy
from support.harness import (
    MESSAGE_PLAN,
    drain,
    make_runtime,
    make_settings,
    run_cli,
    service_environment,
)
from support.statements import recorded, sqlite_plan
from whop_autocancel.admin.emails import list_emails, retry_email
from whop_autocancel.admin.operations import OpsError
from whop_autocancel.alerts.models import Alert
from whop_autocancel.cancellation.models import Cancellation
from whop_autocancel.clock import FrozenClock
from whop_autocancel.db.audit import AdminAction
from whop_autocancel.mail.models import Email
from whop_autocancel.mail.sink import SmtpSink
from whop_autocancel.orders.models import Order
from whop_autocancel.runtime import Runtime
from whop_autocancel.simulator import SimulatorServer

TYPO = "typo.buyer@example.invalid"
SLOW = "slow.buyer@example.com"
CHAT_TOKEN = "chat-token-never-shown-4f1c"
CHAT_URL = f"http://127.0.0.1:9/api/webhooks/1/{CHAT_TOKEN}"  # nobody listens: pending


def stamp(moment: datetime | None) -> str | None:
    return None if moment is None else moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Outbox:
    runtime: Runtime
    clock: FrozenClock
    simulator: SimulatorServer
    sink: SmtpSink
    env: dict[str, str]
    tmp_path: Path
    typo_membership: str

    def cli(self, *args: str) -> Any:
        return run_cli(self.tmp_path, *args, env=self.env)

    def emails(self) -> list[Email]:
        with self.runtime.database.transaction() as session:
            rows = list(session.scalars(select(Email).order_by(Email.id)))
            session.expunge_all()
            return rows

    def order_of(self, address: str) -> Order:
        with self.runtime.database.transaction() as session:
            order = session.scalars(select(Order).where(Order.email == address)).one()
            session.expunge(order)
            return order

    def cancellation_of(self, order_id: str) -> Cancellation:
        with self.runtime.database.transaction() as session:
            row = session.scalars(
                select(Cancellation).where(Cancellation.order_id == order_id)
            ).one()
            session.expunge(row)
            return row

    def audit(self) -> list[AdminAction]:
        with self.runtime.database.transaction() as session:
            rows = list(session.scalars(select(AdminAction).order_by(AdminAction.id)))
            session.expunge_all()
            return rows


@pytest.fixture
def outbox(
    tmp_path: Path,
    clock: FrozenClock,
    simulator: SimulatorServer,
    smtp_sink: SmtpSink,
    database_url: str,
) -> Iterator[Outbox]:
    values = {
        "DATABASE_URL": database_url,
        "WHOP_API_URL": simulator.api_url,
        "SMTP_URL": smtp_sink.url,
        "ALERT_WEBHOOK_URL": CHAT_URL,
        "RETRY_SCHEDULE": "1,2,4",
        "ALERT_THROTTLE": "0",
    }
    runtime = make_runtime(make_settings(tmp_path, **values), clock)
    try:
        smtp_sink.reject(TYPO)
        typo = buy(runtime, simulator, TYPO)
        runtime.delivery.deliver(outbox_order(runtime, TYPO))
        drain(runtime)  # the delivery email to TYPO: 550, failed for good, one alert
        smtp_sink.refusing = True
        buy(runtime, simulator, SLOW)
        runtime.delivery.deliver(outbox_order(runtime, SLOW))
        drain(runtime)  # every email now: 451, pending, tried again later
        smtp_sink.refusing = False
        yield Outbox(
            runtime,
            clock,
            simulator,
            smtp_sink,
            service_environment(tmp_path, **values),
            tmp_path,
            typo,
        )
    finally:
        runtime.close()


def outbox_order(runtime: Runtime, address: str) -> str:
    with runtime.database.transaction() as session:
        return str(session.scalars(select(Order.id).where(Order.email == address)).one())


def test_the_outbox_is_listed_without_bodies_or_chat_urls(outbox: Outbox) -> None:
    emails = outbox.emails()
    failed = [e for e in emails if e.failed_at is not None]
    pending = [e for e in emails if e.failed_at is None and e.sent_at is None]
    sent = [e for e in emails if e.sent_at is not None]
    assert [e.to_address for e in failed] == [TYPO]
    assert {e.to_address for e in pending} >= {SLOW, CHAT_URL}
    assert sent  # the admin notice of the first purchase

    listing = outbox.cli("emails", "--json")
    assert listing.returncode == 0, listing.stderr
    rows = [json.loads(line) for line in listing.stdout.splitlines()]
    newest_first = sorted(failed + pending, key=lambda e: (e.created_at, e.id), reverse=True)
    assert [row["id"] for row in rows] == [e.id for e in newest_first]
    by_id = {e.id: e for e in emails}
    for row in rows:
        email = by_id[row["id"]]
        chat = email.kind == "chat"
        assert row == {
            "id": email.id,
            "status": "failed" if email.failed_at else "pending",
            "kind": email.kind,
            "order_id": email.order_id,
            "to": "(chat webhook)" if chat else email.to_address,
            "subject": email.subject,
            "attempts": email.attempts,
            "next_attempt_at": None if email.failed_at else stamp(email.next_attempt_at),
            "last_error": email.last_error,
            "created_at": stamp(email.created_at),
            "sent_at": None,
            "failed_at": stamp(email.failed_at),
        }
    [typo] = [row for row in rows if row["to"] == TYPO]
    assert "550" in typo["last_error"]
    assert typo["kind"] == "delivery"
    assert any("451" in (row["last_error"] or "") for row in rows if row["to"] == SLOW)

    everything = outbox.cli("emails", "--status", "all", "--json")
    assert {json.loads(line)["id"] for line in everything.stdout.splitlines()} == set(by_id)
    only_sent = outbox.cli("emails", "--status", "sent", "--json")
    assert [json.loads(line)["id"] for line in only_sent.stdout.splitlines()] == [
        e.id for e in sorted(sent, key=lambda e: (e.created_at, e.id), reverse=True)
    ]
    only_failed = outbox.cli("emails", "--status", "failed", "--json")
    assert [json.loads(line)["id"] for line in only_failed.stdout.splitlines()] == [failed[0].id]

    text = outbox.cli("emails", "--status", "all", "--wide")
    assert text.returncode == 0, text.stderr
    assert f"{len(emails)} email(s), newest first" in text.stdout
    for output in (text.stdout, everything.stdout):
        assert CHAT_TOKEN not in output  # the channel's token stays in the database
        assert "Here is your pack" not in output  # no body
        assert "(chat webhook)" in output
    assert "emails retry ID" in text.stdout
    bad = outbox.cli("emails", "--status", "bounced")
    assert bad.returncode == 2


def test_retry_puts_a_failed_delivery_email_back_and_its_cancellation_follows(
    outbox: Outbox,
) -> None:
    order = outbox.order_of(TYPO)
    [failed] = [e for e in outbox.emails() if e.failed_at is not None]
    # The cancellation waits for the delivery email, which failed: parked, membership live.
    outbox.clock.advance(6)
    outbox.runtime.cancellations.run(outbox.cancellation_of(order.id).id)
    parked = outbox.cancellation_of(order.id)
    assert parked.status == "scheduled"
    assert "failed" in (parked.last_error or "")
    assert outbox.simulator.state.membership(outbox.typo_membership)["status"] == "completed"
    with outbox.runtime.database.transaction() as session:
        [alert] = session.scalars(select(Alert).where(Alert.kind == "email_failed")).all()
        assert alert.resolved_at is None
        assert f"whop-autocancel emails retry {failed.id}" in alert.text_body  # the way on

    # Refused: an unknown, a sent, a pending email; no ID; all audited, nothing changed.
    [sent] = [e for e in outbox.emails() if e.sent_at is not None][:1]
    [pending] = [e for e in outbox.emails() if e.to_address == SLOW][:1]
    missing = outbox.cli("emails", "retry", "999")
    assert (missing.returncode, missing.stderr.strip()) == (
        1,
        "whop-autocancel: no email #999 (see `whop-autocancel emails`)",
    )
    was_sent = outbox.cli("emails", "retry", str(sent.id))
    assert was_sent.returncode == 1
    assert f"email #{sent.id} was sent at {stamp(sent.sent_at)}: only failed" in was_sent.stderr
    still = outbox.cli("emails", "retry", str(pending.id))
    assert still.returncode == 1
    assert f"email #{pending.id} is pending: the outbox is still trying it" in still.stderr
    assert outbox.cli("emails", "retry").returncode == 2
    assert [(a.action, a.target, a.outcome) for a in outbox.audit()] == [
        ("email.retry", "#999", "refused"),
        ("email.retry", f"#{sent.id}", "refused"),
        ("email.retry", f"#{pending.id}", "refused"),
    ]

    # The address works now (fixed at the mail server): the admin retries it.
    outbox.sink.accept(TYPO)
    before = datetime.now(UTC).replace(microsecond=0)
    retried = outbox.cli("emails", "retry", str(failed.id))
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.startswith(
        f"Email #{failed.id} (delivery to {TYPO}, order {order.id}) is queued again "
        "(attempts start over); a running worker sends it now. It had failed with: 550"
    )
    [again] = [e for e in outbox.emails() if e.id == failed.id]
    assert (again.failed_at, again.sent_at, again.attempts) == (None, None, 0)
    assert again.next_attempt_at >= before  # queued anew: the give-up time counts from now
    assert again.created_at == again.next_attempt_at
    with outbox.runtime.database.transaction() as session:
        alert = session.get(Alert, alert.id)
        assert alert is not None
        assert alert.resolved_at is not None  # failing again would alert again
    done = outbox.audit()[-1]
    assert (done.action, done.target, done.order_id, done.outcome) == (
        "email.retry",
        f"#{failed.id}",
        order.id,
        "done",
    )
    assert done.actor.startswith("cli:")
    assert done.detail.startswith(
        f"delivery to {TYPO}, first queued at {stamp(failed.created_at)}, 1 attempt(s), "
        f"failed at {stamp(failed.failed_at)}: 550"
    )
    timeline = outbox.cli("orders", "show", order.id)  # the purchase's story shows the retry
    assert f"email.retry #{failed.id} by cli:" in timeline.stdout

    # A worker: the outbox's own send job runs, the SMTP server accepts, and the accepted
    # delivery email wakes the parked cancellation, which cancels the membership.
    outbox.clock.set(datetime.now(UTC) + timedelta(seconds=1))
    drain(outbox.runtime)
    assert len(outbox.sink.to(TYPO)) == 1
    [delivered] = [e for e in outbox.emails() if e.id == failed.id]
    assert delivered.sent_at is not None
    assert delivered.attempts == 1
    row = outbox.cancellation_of(order.id)
    assert row.status == "canceled"
    assert outbox.simulator.state.membership(outbox.typo_membership)["status"] == "canceled"

    # Sent now: a second retry is refused.
    twice = outbox.cli("emails", "retry", str(failed.id))
    assert twice.returncode == 1
    assert f"`whop-autocancel orders resend {order.id}` sends a new one" in twice.stderr


def test_retry_all_failed_and_a_failure_again_alerts_again(outbox: Outbox) -> None:
    """`--all-failed` retries each failed email; one that fails again is `failed` again and
    raises a new `email_failed` alert (the retry resolved the first)."""
    other = "second.typo@example.invalid"
    outbox.sink.reject(other)
    buy(outbox.runtime, outbox.simulator, other, plan=MESSAGE_PLAN)
    outbox.runtime.delivery.deliver(outbox_order(outbox.runtime, other))
    drain(outbox.runtime)
    failed = [e.id for e in outbox.emails() if e.failed_at is not None]
    assert len(failed) == 2

    outbox.sink.accept(TYPO)  # the first address is fixed; the second still bounces
    result = outbox.cli("emails", "retry", "--all-failed")
    assert result.returncode == 0, result.stderr
    assert [line.split(" (")[0] for line in result.stdout.splitlines()] == [
        f"Email #{one}" for one in failed
    ]
    assert [(a.action, a.outcome) for a in outbox.audit()] == [("email.retry", "done")] * 2
    outbox.clock.set(datetime.now(UTC) + timedelta(seconds=1))
    drain(outbox.runtime)
    states = {e.to_address: e for e in outbox.emails() if e.id in failed}
    assert states[TYPO].sent_at is not None
    assert states[other].failed_at is not None
    with outbox.runtime.database.transaction() as session:
        alerts = list(session.scalars(select(Alert).where(Alert.kind == "email_failed")))
    assert sorted((a.resolved_at is None) for a in alerts) == [False, False, True]
    assert outbox.cli("emails", "retry", "--all-failed").stdout.startswith(
        f"Email #{states[other].id} "
    )
    nothing_left = [e for e in outbox.emails() if e.failed_at is not None]
    assert nothing_left == []


def test_the_admin_functions_refuse_and_read_no_body(outbox: Outbox) -> None:
    with outbox.runtime.database.transaction() as session:
        rows = list_emails(session, status="all")
        with pytest.raises(OpsError, match="unknown status 'bounced'; valid statuses: pending"):
            list_emails(session, status="bounced")
    assert all(not hasattr(row, "text_body") for row in rows)
    # The order's status comes along (the dashboard offers Resend for a delivered order).
    [typo] = [row for row in rows if row.to == TYPO]
    assert typo.order_id == outbox.order_of(TYPO).id
    assert typo.order_status == outbox.order_of(TYPO).status == "delivered"
    assert all(row.order_status is None for row in rows if row.order_id is None)
    with pytest.raises(OpsError, match=r"no email #12345"):
        retry_email(outbox.runtime, 12345, actor="web:test")
    [refusal] = outbox.audit()
    assert (refusal.actor, refusal.outcome) == ("web:test", "refused")


def test_the_pending_listing_reads_the_waiting_emails_not_every_email_sent(
    tmp_path: Path,
) -> None:
    """`emails --status pending` (and the dashboard's filter) finds the waiting emails by the
    outbox's own index, which holds only them: `failed_at IS NULL` is every email ever sent,
    and SQLite, without statistics, took that index for it."""
    runtime = make_runtime(make_settings(tmp_path))  # (SQLite: the planner under test)
    engine = runtime.database.engine
    try:
        with recorded(engine) as sent, runtime.database.transaction() as session:
            list_emails(session, status="pending")
        [(sql, parameters)] = [(sql, p) for sql, p in sent if "FROM emails" in sql]
        plan = sqlite_plan(engine, sql, parameters)
    finally:
        runtime.close()
    assert any("INDEX ix_emails_next_attempt_at" in step for step in plan), plan
