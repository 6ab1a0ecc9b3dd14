"""The email outbox: queue a message with the state change that causes it; a job sends it."""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import datetime, timedelta

import structlog
from sqlalchemy import or_, update
from sqlalchemy.orm import Session

from whop_autocancel.clock import Clock
from whop_autocancel.db.engine import Database, insert_once
from whop_autocancel.jobs import Jobs
from whop_autocancel.mail.models import Email
from whop_autocancel.mail.render import RenderedEmail
from whop_autocancel.mail.smtp import MailError, build_message, send_message
from whop_autocancel.settings import SmtpConfig

log = structlog.get_logger(__name__)

SEND_TASK = "mail.send"


class Outbox:
    def __init__(
        self,
        database: Database,
        jobs: Jobs,
        clock: Clock,
        *,
        smtp: SmtpConfig,
        sender: str,
        timeout: float,
        retry_schedule: Sequence[float],
        lease_seconds: float,
    ) -> None:
        self._database = database
        self._jobs = jobs
        self._clock = clock
        self._smtp = smtp
        self._sender = sender
        self._timeout = timeout
        self._schedule = list(retry_schedule)
        self._lease = lease_seconds

    def queue(
        self,
        session: Session,
        *,
        kind: str,
        to: str,
        email: RenderedEmail,
        now: datetime,
        order_id: str | None = None,
        alert_id: int | None = None,
        dedupe_key: str | None = None,
    ) -> Email | None:
        """Add a message to the outbox (None when `dedupe_key` was queued before)."""
        row = Email(
            dedupe_key=dedupe_key,
            kind=kind,
            to_address=to,
            subject=email.subject,
            text_body=email.text,
            html_body=email.html,
            order_id=order_id,
            alert_id=alert_id,
            created_at=now,
            next_attempt_at=now,
        )
        if not insert_once(session, row):
            return None
        self._jobs.defer(session, SEND_TASK, row.id)
        return row

    def send(self, email_id: int) -> None:
        """The `mail.send` job: send one message at least once, retrying until it goes."""
        now = self._clock.now()
        with self._database.transaction() as session:
            claimed = session.execute(
                update(Email)
                .where(
                    Email.id == email_id,
                    Email.sent_at.is_(None),
                    Email.next_attempt_at <= now,
                    or_(Email.lease_until.is_(None), Email.lease_until < now),
                )
                .values(lease_until=now + timedelta(seconds=self._lease))
            )
            if claimed.rowcount != 1:  # type: ignore[attr-defined]
                return  # sent already, not due yet, or another worker has it
            row = session.get(Email, email_id)
            assert row is not None
            message = build_message(
                self._sender,
                row.to_address,
                row.subject,
                row.text_body,
                row.html_body,
                message_id=f"wa{row.id}",
            )
            kind, attempts = row.kind, row.attempts
        try:
            send_message(self._smtp, message, self._timeout)
        except MailError as error:
            delay = self._schedule[min(attempts, len(self._schedule) - 1)]
            delay *= random.uniform(0.9, 1.1)
            with self._database.transaction() as session:
                session.execute(
                    update(Email)
                    .where(Email.id == email_id)
                    .values(
                        attempts=Email.attempts + 1,
                        last_error=str(error),
                        lease_until=None,
                        next_attempt_at=self._clock.now() + timedelta(seconds=delay),
                    )
                )
                self._jobs.defer(session, SEND_TASK, email_id, delay=delay)
            log.warning(
                "email_send_failed",
                email_id=email_id,
                kind=kind,
                error=str(error),
                retry_in=round(delay, 2),
            )
            return
        with self._database.transaction() as session:
            session.execute(
                update(Email)
                .where(Email.id == email_id)
                .values(
                    sent_at=self._clock.now(),
                    attempts=Email.attempts + 1,
                    lease_until=None,
                    last_error=None,
                )
            )
        log.info("email_sent", email_id=email_id, kind=kind)
