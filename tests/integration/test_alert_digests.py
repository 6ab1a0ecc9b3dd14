"""Alerts without floods: the first of a kind at once, the rest folded into one digest, also to
a chat webhook (Discord/Slack-compatible) through the outbox."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from support.harness import ADMIN, drain, make_runtime, make_settings
from support.receiver import Receiver
from whop_autocancel.alerts.models import Alert, AlertKind
from whop_autocancel.alerts.service import AlertContent
from whop_autocancel.clock import FrozenClock
from whop_autocancel.mail.models import Email
from whop_autocancel.mail.sink import SmtpSink
from whop_autocancel.runtime import Runtime


@pytest.fixture
def chat() -> Iterator[Receiver]:
    """A Discord/Slack-style incoming webhook on loopback."""
    receiver = Receiver(path="/api/webhooks/1/token")
    yield receiver
    receiver.close()


@pytest.fixture
def runtime(
    tmp_path: Path, clock: FrozenClock, smtp_sink: SmtpSink, chat: Receiver, database_url: str
) -> Iterator[Runtime]:
    runtime = make_runtime(
        make_settings(
            tmp_path,
            DATABASE_URL=database_url,
            SMTP_URL=smtp_sink.url,
            ALERT_THROTTLE=900,
            ALERT_WEBHOOK_URL=chat.url,
            RETRY_SCHEDULE="10",
        ),
        clock,
    )
    yield runtime
    runtime.close()


def raise_alert(runtime: Runtime, number: int, kind: AlertKind = AlertKind.DELIVERY_FAILED) -> None:
    with runtime.database.transaction() as session:
        runtime.alerts.raise_once(
            session,
            kind,
            f"{kind.value}:{number}",
            AlertContent(
                subject=f"Problem {number}",
                summary=f"Details of problem {number}.",
                details=[("Order", f"ord_{number}")],
                steps=["Fix it."],
            ),
            runtime.clock.now(),
        )


def test_a_burst_is_one_email_now_and_one_digest_later(
    runtime: Runtime, clock: FrozenClock, smtp_sink: SmtpSink, chat: Receiver
) -> None:
    for number in range(1, 39):
        raise_alert(runtime, number)
    raise_alert(runtime, 99, AlertKind.WHOP_AUTH)  # another kind: not throttled by the first
    drain(runtime)
    subjects = sorted(m.subject for m in smtp_sink.to(ADMIN))
    assert subjects == ["Problem 1", "Problem 99"]
    assert len(chat.accepted()) == 2
    assert all(message["text"] and message["content"] for message in chat.accepted())

    clock.advance(600)
    assert runtime.stuck_sweep.run(force=True).digests == 0  # still within the throttle
    clock.advance(301)
    assert runtime.stuck_sweep.run(force=True).digests == 1
    drain(runtime)
    [digest] = [m for m in smtp_sink.to(ADMIN) if m.subject.startswith("37 more")]
    assert digest.subject == "37 more delivery failed alert(s)"
    for text in (digest.text, digest.html):
        assert "Problem 2" in text
        assert "Problem 21" in text
        assert "and 17 more" in text
    assert "Problem 22" not in digest.text  # only the first 20 in full
    with runtime.database.transaction() as session:
        assert session.scalars(select(Alert).where(Alert.notified_at.is_(None))).first() is None
    assert runtime.stuck_sweep.run(force=True).digests == 0
    assert len(chat.accepted()) == 3


def test_a_chat_webhook_that_fails_is_retried(
    runtime: Runtime, clock: FrozenClock, chat: Receiver
) -> None:
    chat.failing = True
    raise_alert(runtime, 1)
    drain(runtime)
    with runtime.database.transaction() as session:
        row = session.scalars(select(Email).where(Email.kind == "chat")).one()
        assert row.sent_at is None
        assert row.last_error == "chat webhook answered HTTP 500"
        assert "token" not in (row.last_error or "")
    chat.failing = False
    clock.advance(12)
    runtime.outbox.send(row.id)
    assert [m["text"].splitlines()[0] for m in chat.accepted()] == ["Problem 1"]
