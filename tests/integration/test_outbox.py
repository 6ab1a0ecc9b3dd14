"""The email outbox against a real SMTP server on loopback (aiosmtpd)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from support.harness import free_port, make_runtime, make_settings
from whop_autocancel.clock import FrozenClock
from whop_autocancel.mail.models import Email
from whop_autocancel.mail.render import render_email
from whop_autocancel.mail.sink import SmtpSink
from whop_autocancel.runtime import Runtime

CREDENTIALS = ("shop", "s3cret-pa55")


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def runtime(tmp_path: Path, clock: FrozenClock, port: int, database_url: str) -> Iterator[Runtime]:
    runtime = make_runtime(
        make_settings(
            tmp_path,
            DATABASE_URL=database_url,
            SMTP_URL=f"smtp://shop:s3cret-pa55@127.0.0.1:{port}",
            RETRY_SCHEDULE="10,20",
        ),
        clock,
    )
    yield runtime
    runtime.close()


def queue(
    runtime: Runtime, to: str = "buyer@example.com", key: str | None = None, kind: str = "test"
) -> int | None:
    email = render_email(
        "alert",
        "Test subject",
        kind="test",
        summary="Hello <b>there</b>",
        details=[("Order", "ord_1")],
        steps=["Do this."],
    )
    with runtime.database.transaction() as session:
        row = runtime.outbox.queue(
            session, kind=kind, to=to, email=email, now=runtime.clock.now(), dedupe_key=key
        )
        return row.id if row else None


def row(runtime: Runtime, email_id: int) -> Email:
    with runtime.database.transaction() as session:
        found = session.get(Email, email_id)
        assert found is not None
        return found


def test_a_queued_email_is_sent_with_text_and_html(runtime: Runtime, port: int) -> None:
    email_id = queue(runtime)
    assert email_id is not None
    with SmtpSink(port=port, credentials=CREDENTIALS) as sink:
        runtime.outbox.send(email_id)
    [message] = sink.messages
    assert message.recipients == ("buyer@example.com",)
    assert message.sender == "shop@shop.test"
    assert message.subject == "Test subject"
    assert "Hello <b>there</b>" in message.text
    assert "Hello &lt;b&gt;there&lt;/b&gt;" in message.html  # escaped in HTML
    assert row(runtime, email_id).sent_at is not None
    runtime.outbox.send(email_id)  # a duplicate job sends nothing more
    assert len(sink.messages) == 1


def test_a_dedupe_key_queues_once(runtime: Runtime) -> None:
    assert queue(runtime, key="once") is not None
    assert queue(runtime, key="once") is None


def test_smtp_down_retries_later_and_delivers_after_recovery(
    runtime: Runtime, port: int, clock: FrozenClock
) -> None:
    email_id = queue(runtime)
    assert email_id is not None
    runtime.outbox.send(email_id)  # nothing listens on the port
    failed = row(runtime, email_id)
    assert failed.sent_at is None
    assert failed.attempts == 1
    assert "s3cret-pa55" not in (failed.last_error or "")
    assert "shop:***@127.0.0.1" in (failed.last_error or "")
    assert 9 <= (failed.next_attempt_at - clock.now()).total_seconds() <= 11
    with SmtpSink(port=port, credentials=CREDENTIALS) as sink:
        runtime.outbox.send(email_id)  # not due yet
        assert sink.messages == []
        clock.advance(11)
        runtime.outbox.send(email_id)
        assert len(sink.messages) == 1
    assert row(runtime, email_id).sent_at is not None


def test_a_refusing_server_is_retried(runtime: Runtime, port: int, clock: FrozenClock) -> None:
    email_id = queue(runtime)
    assert email_id is not None
    with SmtpSink(port=port, credentials=CREDENTIALS) as sink:
        sink.refusing = True
        runtime.outbox.send(email_id)
        assert "451" in (row(runtime, email_id).last_error or "")
        sink.refusing = False
        clock.advance(11)
        runtime.outbox.send(email_id)
        assert len(sink.messages) == 1


def test_a_wrong_password_is_a_retryable_failure_that_never_shows_the_password(
    runtime: Runtime, port: int
) -> None:
    email_id = queue(runtime)
    assert email_id is not None
    with SmtpSink(port=port, credentials=("shop", "another")) as sink:
        runtime.outbox.send(email_id)
        assert sink.messages == []
    failed = row(runtime, email_id)
    error = failed.last_error or ""
    assert "Authentication" in error
    assert "s3cret-pa55" not in error
    # A 535 is about our settings, not this message: retried (it goes once they are fixed).
    assert failed.failed_at is None


def sends_queued(runtime: Runtime) -> int:
    return sum(1 for task in runtime.jobs.huey.pending() if task.name == "mail.send") + sum(
        1 for task in runtime.jobs.huey.scheduled() if task.name == "mail.send"
    )


def test_a_permanent_rejection_ends_the_email_at_once(
    runtime: Runtime, port: int, clock: FrozenClock
) -> None:
    email_id = queue(runtime, to="gone@example.com")
    assert email_id is not None
    runtime.jobs.huey.flush()
    with SmtpSink(port=port, credentials=CREDENTIALS) as sink:
        sink.reject("gone@example.com")
        runtime.outbox.send(email_id)
        failed = row(runtime, email_id)
        assert failed.failed_at is not None
        assert failed.sent_at is None
        assert failed.attempts == 1
        assert (failed.last_error or "").startswith("550 5.1.1 <gone@example.com>")
        assert "s3cret-pa55" not in (failed.last_error or "")
        assert sends_queued(runtime) == 0  # no retry scheduled
        # Never tried again: not by a duplicate job, not by the stuck-work sweep.
        sink.accept("gone@example.com")
        clock.advance(3600)
        runtime.outbox.send(email_id)
        assert runtime.stuck_sweep.run(force=True).emails == 0
        assert sink.messages == []
    assert row(runtime, email_id).attempts == 1


def test_only_a_delivery_email_is_given_up_by_time(
    runtime: Runtime, port: int, clock: FrozenClock
) -> None:
    """SMTP down for longer than EMAIL_GIVE_UP_AFTER (3600 s): the customer's delivery email
    ends `failed` at its next failed try; an admin's email keeps trying until it goes."""
    delivery = queue(runtime, kind="delivery")
    notice = queue(runtime, to="admin@shop.test", kind="admin_delivered")
    assert delivery is not None
    assert notice is not None
    runtime.outbox.send(delivery)
    runtime.outbox.send(notice)
    clock.advance(3599)
    runtime.outbox.send(delivery)
    assert row(runtime, delivery).failed_at is None
    clock.advance(30)
    runtime.outbox.send(delivery)
    runtime.outbox.send(notice)
    given_up = row(runtime, delivery)
    assert given_up.failed_at is not None
    assert "ConnectionRefusedError" in (given_up.last_error or "")
    assert row(runtime, notice).failed_at is None
    with SmtpSink(port=port, credentials=CREDENTIALS) as sink:
        clock.advance(30)
        runtime.outbox.send(delivery)
        runtime.outbox.send(notice)
        assert [m.recipients for m in sink.messages] == [("admin@shop.test",)]
