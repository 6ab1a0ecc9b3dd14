"""The email outbox: queue a message with the state change that causes it; a job sends it."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

import httpx
import structlog
from sqlalchemy import or_, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from whop_autocancel import metrics
from whop_autocancel.clock import Clock
from whop_autocancel.db.engine import Database, insert_once
from whop_autocancel.errors import ConfigurationError
from whop_autocancel.jobs import Jobs
from whop_autocancel.mail.models import DELIVERY_KIND, Email
from whop_autocancel.mail.render import RenderedEmail
from whop_autocancel.mail.smtp import MailError, MailRejected, SmtpPool, build_message
from whop_autocancel.sealing import Sealer, SealError
from whop_autocancel.settings import SmtpConfig

log = structlog.get_logger(__name__)

SEND_TASK = "mail.send"
CHAT_KIND = "chat"

# Called in the transaction that marks a message sent (or failed for good), with the row and
# the time: how the layers above react to mail without the outbox knowing them (runtime.py
# wires the delivery domain's hooks: wake the order's cancellation, alert on a failed
# delivery email).
EmailHook = Callable[[Session, Email, datetime], None]


def post_chat(url: str, text: str, timeout: float) -> None:
    """POST one message to a Discord- or Slack-compatible incoming webhook (Discord reads
    `content`, Slack `text`; each ignores the other). Raises `MailError` to be retried."""
    try:
        response = httpx.post(url, json={"content": text[:1900], "text": text}, timeout=timeout)
    except httpx.HTTPError as error:
        raise MailError(f"chat webhook unreachable: {type(error).__name__}") from None
    if response.status_code >= 300:
        raise MailError(f"chat webhook answered HTTP {response.status_code}")


def _failing(error: MailError) -> Callable[[], None]:
    def attempt() -> None:
        raise error

    return attempt


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
        give_up_after: float,
        sealer: Sealer | None = None,
    ) -> None:
        self._database = database
        self._jobs = jobs
        self._clock = clock
        self._smtp = smtp
        self._sender = sender
        self._timeout = timeout
        self._schedule = list(retry_schedule)
        self._lease = lease_seconds
        self._give_up_after = give_up_after
        self._sealer = sealer
        # Sessions kept open between messages, idle time measured on the service's clock.
        self._connections = SmtpPool(now=lambda: clock.now().timestamp())
        self._on_sent: list[EmailHook] = []
        self._on_failed: list[EmailHook] = []

    def listen(
        self, *, on_sent: EmailHook | None = None, on_failed: EmailHook | None = None
    ) -> None:
        """Run `on_sent` when the SMTP server accepted a message, `on_failed` when the outbox
        gave one up; each in the transaction that records it."""
        if on_sent is not None:
            self._on_sent.append(on_sent)
        if on_failed is not None:
            self._on_failed.append(on_failed)

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
        sealed: bool = False,
    ) -> Email | None:
        """Add a message to the outbox (None when `dedupe_key` was queued before). `sealed`:
        the body holds a secret (a stock item) and is stored encrypted."""
        text, html = email.text, email.html
        if sealed:
            text, html = self._require_sealer().seal(text), self._require_sealer().seal(html)
        row = Email(
            dedupe_key=dedupe_key,
            kind=kind,
            to_address=to,
            subject=email.subject,
            text_body=text,
            html_body=html,
            sealed=sealed,
            order_id=order_id,
            alert_id=alert_id,
            created_at=now,
            next_attempt_at=now,
        )
        if not insert_once(session, row):
            return None
        self._jobs.defer(session, SEND_TASK, row.id)
        return row

    def queue_chat(
        self, session: Session, webhook_url: str, text: str, now: datetime, alert_id: int
    ) -> Email | None:
        """A chat message (Discord/Slack-compatible webhook) through the same outbox, with the
        same retries. The URL holds the channel's token: it is stored, never logged."""
        message = RenderedEmail(subject=text.splitlines()[0][:300], text=text, html="")
        return self.queue(
            session, kind=CHAT_KIND, to=webhook_url, email=message, now=now, alert_id=alert_id
        )

    def requeue(self, session: Session, email_id: int, now: datetime) -> bool:
        """Put a message the outbox gave up (`failed`) back to be sent, as if queued `now`:
        attempts from zero, the retry schedule and EMAIL_GIVE_UP_AFTER from the start, its
        `mail.send` job enqueued after commit. The row is the truth, the job only wakes it (a
        lost job is re-enqueued by the stuck-work sweep), and sending it runs the same hooks
        as any message (an accepted delivery email wakes its order's held cancellation).
        False, changing nothing, when it is not failed (sent, or still being tried)."""
        result = session.execute(
            update(Email)
            .where(Email.id == email_id, Email.failed_at.is_not(None), Email.sent_at.is_(None))
            .values(
                failed_at=None,
                attempts=0,
                created_at=now,
                next_attempt_at=now,
                lease_until=None,
            )
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            return False
        self._jobs.defer(session, SEND_TASK, email_id)
        return True

    def _require_sealer(self) -> Sealer:
        if self._sealer is None:
            raise ConfigurationError("STOCK_ENCRYPTION_KEY is not set: sealed email unavailable")
        return self._sealer

    def _delivery(self, row: Email) -> Callable[[], None]:
        if row.kind == CHAT_KIND:
            url, text = row.to_address, row.text_body
            return lambda: post_chat(url, text, self._timeout)
        text, html = row.text_body, row.html_body
        if row.sealed:
            text = self._require_sealer().open(text)
            html = self._require_sealer().open(html) if html else html
        message = build_message(
            self._sender,
            row.to_address,
            row.subject,
            text,
            html or None,
            message_id=f"whop-autocancel.{row.id}.{int(row.created_at.timestamp())}",
        )
        return lambda: self._connections.send(self._smtp, message, self._timeout)

    def close(self) -> None:
        """End the SMTP sessions kept open between messages (on shutdown)."""
        self._connections.close()

    def send(self, email_id: int) -> None:
        """The `mail.send` job: send one message at least once, retrying until it goes, or
        until it fails for good (see `_failed_attempt`)."""
        now = self._clock.now()
        with self._database.transaction() as session:
            claimed = session.execute(
                update(Email)
                .where(
                    Email.id == email_id,
                    Email.sent_at.is_(None),
                    Email.failed_at.is_(None),
                    Email.next_attempt_at <= now,
                    or_(Email.lease_until.is_(None), Email.lease_until < now),
                )
                .values(lease_until=now + timedelta(seconds=self._lease))
            )
            if claimed.rowcount != 1:  # type: ignore[attr-defined]
                return  # sent or given up already, not due yet, or another worker has it
            row = session.get(Email, email_id)
            assert row is not None
            kind, attempts, order_id, created_at = (
                row.kind,
                row.attempts,
                row.order_id,
                row.created_at,
            )
            try:
                deliver = self._delivery(row)
            except SealError as error:  # a changed key: retried, and visible, until fixed
                deliver = _failing(MailError(str(error)))
        try:
            deliver()
        except MailError as error:
            self._failed_attempt(email_id, kind, order_id, attempts, created_at, error)
            return
        with self._database.transaction() as session:
            now = self._clock.now()
            changes = {"sent_at": now, "lease_until": None, "last_error": None}
            session.execute(
                update(Email)
                .where(Email.id == email_id)
                .values(attempts=Email.attempts + 1, **changes)
            )
            # The hooks get the row as claimed, brought up to date without reading it again
            # (one round trip less per email): the values it now has, as committed.
            for name, value in {**changes, "attempts": attempts + 1}.items():
                set_committed_value(row, name, value)
            sent = session.merge(row, load=False)
            for hook in self._on_sent:
                hook(session, sent, now)
        metrics.EMAIL_ATTEMPTS.labels(metrics.email_kind(kind), "sent").inc()
        log.info("email_sent", email_id=email_id, kind=kind, order_id=order_id)

    def _failed_attempt(
        self,
        email_id: int,
        kind: str,
        order_id: str | None,
        attempts: int,
        created_at: datetime,
        error: MailError,
    ) -> None:
        """A permanent rejection (5xx to the recipient or the content) ends any message; a
        customer's delivery email also ends when it was not accepted within `give_up_after`
        (its order waits for it). Anything else is tried again on the schedule."""
        now = self._clock.now()
        waited = (now - created_at).total_seconds()
        if isinstance(error, MailRejected):
            why = "rejected by the SMTP server"
        elif kind == DELIVERY_KIND and waited >= self._give_up_after:
            why = f"not accepted within {waited / 60:.0f} min (EMAIL_GIVE_UP_AFTER)"
        else:
            self._retry(email_id, kind, order_id, attempts, error)
            return
        with self._database.transaction() as session:
            row = session.get(Email, email_id)
            assert row is not None
            row.attempts += 1
            row.last_error = str(error)
            row.lease_until = None
            row.failed_at = now
            for hook in self._on_failed:
                hook(session, row, now)
        metrics.EMAIL_ATTEMPTS.labels(metrics.email_kind(kind), "failed").inc()
        log.error(
            "email_failed",
            email_id=email_id,
            kind=kind,
            order_id=order_id,
            error=str(error),
            reason=why,
        )

    def _retry(
        self, email_id: int, kind: str, order_id: str | None, attempts: int, error: MailError
    ) -> None:
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
        metrics.EMAIL_ATTEMPTS.labels(metrics.email_kind(kind), "retry").inc()
        log.warning(
            "email_send_failed",
            email_id=email_id,
            kind=kind,
            order_id=order_id,
            error=str(error),
            retry_in=round(delay, 2),
        )
