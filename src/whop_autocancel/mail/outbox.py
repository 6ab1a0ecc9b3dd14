"""The email outbox: queue a message with the state change that causes it; a job sends it."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import cast

import httpx
import structlog
from sqlalchemy import (
    ColumnElement,
    Integer,
    Select,
    Table,
    and_,
    bindparam,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from whop_autocancel import metrics
from whop_autocancel.clock import Clock
from whop_autocancel.db.base import UTCDateTime
from whop_autocancel.db.engine import Database, insert_once
from whop_autocancel.errors import ConfigurationError
from whop_autocancel.jobs import Jobs
from whop_autocancel.mail.models import DELIVERY_KIND, Email, due_index_leaves_out_done
from whop_autocancel.mail.render import RenderedEmail
from whop_autocancel.mail.smtp import MailError, MailRejected, SmtpPool, build_message
from whop_autocancel.sealing import Sealer, SealError
from whop_autocancel.settings import SmtpConfig

log = structlog.get_logger(__name__)

SEND_TASK = "mail.send"
CHAT_KIND = "chat"
# The most messages one `mail.send` job claims and sends: its own and the oldest other due
# ones. Two write transactions for the batch (the claim, the record of those sent) instead of
# two for each message: what a burst of purchases needs of SQLite's one writer.
SEND_BATCH = 10
# A batch starts no new send once this share of its lease is spent, so the last one started
# still has the rest of the lease to finish and be recorded before another worker may take
# its message; the messages not started are released at once.
LEASE_BUDGET = 0.5
# How often a job claims again after finding rows it had chosen taken by another worker (not
# expected: they are locked, or SQLite writes alone); then it leaves them to the next job.
CLAIM_ATTEMPTS = 3

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


class _ClaimRaced(Exception):
    """A claim found rows it had chosen taken by another worker (rolled back, tried again)."""

    def __init__(self, lost: int) -> None:
        super().__init__(f"{lost} email(s) taken by another worker during the claim")
        self.lost = lost


_EMAILS = cast(Table, Email.__table__)
# When a message was done, sent or given up (NULL while it waits): one expression, which no
# index answers (see `unsent_due`).
_DONE_AT = func.coalesce(_EMAILS.c.failed_at, _EMAILS.c.sent_at)


def unsent_due(
    due_by: ColumnElement[datetime] | datetime, now: ColumnElement[datetime] | datetime
) -> ColumnElement[bool]:
    """A message waiting to go: neither sent nor given up, due by `due_by`, and not leased by
    a worker at `now` (or its lease ran out: that worker died or hung). The outbox's claim
    asks it of `now`; the stuck-work sweep of a moment a grace period earlier.

    Found by the range of `next_attempt_at`, which is NULL for every message done: its index
    holds only the waiting ones. `sent_at` and `failed_at` are tested inside an expression,
    which no index answers: SQLite, which keeps no statistics, would take `IS NULL` on their
    indexes for a lookup, and walk every email given up (or, for `failed_at`, every one ever
    sent). They are still tested, for a message a previous version marked done without
    clearing its next attempt."""
    return and_(
        _EMAILS.c.next_attempt_at <= due_by,
        _DONE_AT.is_(None),
        or_(_EMAILS.c.lease_until.is_(None), _EMAILS.c.lease_until < now),
    )


# A message not sent and not given up, found by the same index as `unsent_due` (for the
# counts of the dashboard and the metrics). Its `next_attempt_at IS NOT NULL` is written as a
# range: SQLite's planner takes a bare `IS NOT NULL` for most of the table and scans it all.
_EVER = datetime(2000, 1, 1, tzinfo=UTC)
WAITING = and_(_EMAILS.c.next_attempt_at >= _EVER, _DONE_AT.is_(None))


def clear_done_emails(session: Session, due_by: datetime) -> None:
    """Clear the next attempt of the messages done but still in the due index (due by
    `due_by`): those a process of the version before migration 0011 marked sent or given up
    during a rolling upgrade. The outbox never sends them (`unsent_due`), but every claim
    would read them for ever. The stuck-work sweep asks it; it reads the range of messages
    due, which holds only the waiting ones once no such process is left. Where that index
    never holds a message done (PostgreSQL: `due_index_leaves_out_done`) there is nothing to
    clear, and the update would read the whole table, which no index there answers."""
    if due_index_leaves_out_done(session.get_bind().dialect.name):
        return
    session.execute(
        update(_EMAILS)
        .where(_EMAILS.c.next_attempt_at <= due_by, _DONE_AT.is_not(None))
        .values(next_attempt_at=None)
    )


def _due(now: ColumnElement[datetime]) -> ColumnElement[bool]:
    """A message to send now (`unsent_due` of now)."""
    return unsent_due(now, now)


# The statements a send runs for every message, built once (with their parameters bound at
# each run): building and keying a statement costs more than SQLite takes to run it. They
# are table statements: the session holds none of these rows when they run (see `_claim`).
_NOW = bindparam("now", type_=UTCDateTime())
_ID = bindparam("email_id", type_=Integer())
_IDS = bindparam("email_ids", type_=Integer(), expanding=True)
_LEASE = bindparam("new_lease", type_=UTCDateTime())
_CLAIM_OWN = update(_EMAILS).where(_EMAILS.c.id == _ID, _due(_NOW)).values(lease_until=_LEASE)
_CLAIM_OTHERS = update(_EMAILS).where(_EMAILS.c.id.in_(_IDS), _due(_NOW)).values(lease_until=_LEASE)
_MARK_SENT = (
    update(_EMAILS)
    .where(_EMAILS.c.id.in_(_IDS))
    .values(
        attempts=_EMAILS.c.attempts + 1,
        sent_at=_NOW,
        next_attempt_at=None,
        lease_until=None,
        last_error=None,
    )
)
_RELEASE = (
    update(_EMAILS)
    .where(_EMAILS.c.id.in_(_IDS), _EMAILS.c.lease_until == _LEASE)
    .values(lease_until=None)
)


def _others_statement(*, skip_locked: bool) -> Select[Email]:
    """The other due messages a claim sends with its own, the longest due first (then in the
    order queued): in the order of the `next_attempt_at` index, so it reads no more rows than
    it takes however many wait."""
    statement = (
        select(Email)
        .where(_due(_NOW))
        .order_by(Email.next_attempt_at, Email.id)
        .limit(bindparam("room"))
    )
    return statement.with_for_update(skip_locked=True) if skip_locked else statement


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
        self._others = _others_statement(skip_locked=database.skip_locked)

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
        wake: bool = True,
    ) -> Email | None:
        """Add a message to the outbox (None when `dedupe_key` was queued before). `sealed`:
        the body holds a secret (a stock item) and is stored encrypted. `wake=False`: enqueue
        no `mail.send` job for it, when the caller queues another message in the same
        transaction that wakes one: a job sends every due message, oldest first, a batch at a
        time, and a full batch wakes the next job (see `send`), so it goes with that one."""
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
        if wake:
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
        """The `mail.send` job: send the due messages, this job's first, each at least once,
        retrying until it goes or fails for good (see `_failed_attempt`).

        A job is a wake-up, the rows are the truth: it claims its own message and up to
        SEND_BATCH - 1 other due ones (oldest first; others even when its own went already)
        in one transaction, sends them one by one on the kept SMTP session outside any
        transaction, and records those the server accepted in one more. It starts no new send
        once LEASE_BUDGET of the lease is spent: the rest are released for any worker, and a
        job is enqueued to wake them. A worker killed at any point leaves its messages leased
        until the lease runs out, then the next job or the stuck-work sweep sends them again
        (at least once)."""
        claim = self._claim_batch(email_id)
        if claim is None:
            return  # nothing due: sent or given up already, not due yet, or being sent
        batch, lease_until = claim
        deadline = lease_until - timedelta(seconds=self._lease * (1 - LEASE_BUDGET))
        accepted: list[Email] = []
        waiting = deque(batch)
        try:
            while waiting and self._clock.now() < deadline:
                row = waiting.popleft()
                try:
                    self._delivery(row)()
                except SealError as error:  # a changed key: retried, and visible, until fixed
                    self._failed_attempt(row, MailError(str(error)))
                except MailError as error:
                    self._failed_attempt(row, error)
                else:
                    accepted.append(row)
        finally:
            # Also when something unexpected broke the batch: what went is recorded, what was
            # not started is released (the message that raised stays leased until its lease
            # runs out, as if this worker had died while sending it).
            self._finish(accepted, list(waiting), lease_until)
        if len(batch) == SEND_BATCH and not waiting:
            # A full batch: more may be due, some queued without a job of their own (`queue`'s
            # `wake`). The next job takes them (it finds its own message sent: the rows are
            # the truth), and so on until a batch is not full.
            self._jobs.enqueue(SEND_TASK, batch[-1].id)

    def _finish(self, accepted: list[Email], released: list[Email], lease_until: datetime) -> None:
        if not (accepted or released):
            return
        accepted.sort(key=lambda row: row.id)  # (the hooks lock their rows in one order)
        # The values the hooks' rows get, computed once (`run` may repeat the transaction).
        attempts = [(row, row.attempts + 1) for row in accepted]
        # Not flushed to disk (the claim before the sends was): lost to a power cut, the
        # emails go again, the same messages (see `Database.transaction`).
        self._database.run(
            lambda session: self._record(session, attempts, released, lease_until), durable=False
        )
        for row in accepted:
            metrics.EMAIL_ATTEMPTS.labels(metrics.email_kind(row.kind), "sent").inc()
            log.info("email_sent", email_id=row.id, kind=row.kind, order_id=row.order_id)
        if released:
            log.warning(
                "email_batch_cut_short",
                sent=len(accepted),
                released=[row.id for row in released],
                lease_seconds=self._lease,
            )

    def _claim_batch(self, email_id: int) -> tuple[list[Email], datetime] | None:
        for _ in range(CLAIM_ATTEMPTS):
            try:
                return self._database.run(lambda session: self._claim(session, email_id))
            except _ClaimRaced as raced:
                log.warning("email_claim_raced", email_id=email_id, lost=raced.lost)
        return None  # the rows are still due: the next job, or the stuck-work sweep

    def _claim(self, session: Session, email_id: int) -> tuple[list[Email], datetime] | None:
        """Lease `email_id` and up to SEND_BATCH - 1 other due messages, oldest first: the
        rows (as claimed, in sending order, its own first) and the lease's end; None when none
        is due. Safe with any number of workers: its own row is claimed by a compare-and-set
        (waiting for a worker that holds its lock, as before batches), the others are chosen
        `FOR UPDATE SKIP LOCKED` where the database has it (SQLite writes one transaction at
        a time) and claimed with the same conditions checked again: all of them, or the claim
        is rolled back (`_ClaimRaced`)."""
        now = self._clock.now()
        lease_until = now + timedelta(seconds=self._lease)
        # (Table statements: no session synchronisation, it holds no row yet; the ORM's would
        # cost MariaDB a SELECT before each UPDATE.)
        own = session.execute(
            _CLAIM_OWN, {"email_id": email_id, "now": now, "new_lease": lease_until}
        )
        mine = own.rowcount == 1  # type: ignore[attr-defined]
        # Its own message first, when it leased it (read by its key: never passed over by
        # SKIP LOCKED), then the oldest others still due (its own, leased now, is not).
        own_row = session.get(Email, email_id) if mine else None
        room = SEND_BATCH - (1 if own_row is not None else 0)
        others_due = list(session.scalars(self._others, {"now": now, "room": room}))
        batch = [own_row, *others_due] if own_row is not None else others_due
        others = [row.id for row in others_due]
        if others:
            claimed = session.execute(
                _CLAIM_OTHERS, {"email_ids": others, "now": now, "new_lease": lease_until}
            )
            if claimed.rowcount != len(others):  # type: ignore[attr-defined]
                # Not expected (the rows are locked, or SQLite writes alone): another worker
                # took some of them. Which ones cannot be told apart (its lease may end at
                # the same time as this one): roll the whole claim back.
                raise _ClaimRaced(len(others) - claimed.rowcount)  # type: ignore[attr-defined]
        return (batch, lease_until) if batch else None

    def _record(
        self,
        session: Session,
        accepted: Sequence[tuple[Email, int]],
        released: Sequence[Email],
        lease_until: datetime,
    ) -> None:
        """One transaction for what a batch did not record yet: the messages the server
        accepted (one UPDATE, then the `on_sent` hooks of each), and those it did not start
        released (their lease ended, a job enqueued to wake them)."""
        now = self._clock.now()
        if accepted:
            session.execute(_MARK_SENT, {"email_ids": [row.id for row, _ in accepted], "now": now})
            changes = {
                "sent_at": now,
                "next_attempt_at": None,
                "lease_until": None,
                "last_error": None,
            }
            for row, attempts in accepted:
                # The hooks get the row as claimed, brought up to date without reading it
                # again (one round trip less per email): the values it now has, as committed.
                for name, value in {**changes, "attempts": attempts}.items():
                    set_committed_value(row, name, value)
                sent = session.merge(row, load=False)
                for hook in self._on_sent:
                    hook(session, sent, now)
        if released:
            # Only while the lease is still this batch's: once run out, another worker may
            # hold the row, and must keep it.
            session.execute(
                _RELEASE, {"email_ids": [row.id for row in released], "new_lease": lease_until}
            )
            # Their own jobs may have come and gone while this batch held them: one job
            # claims them all again (they are fewer than a batch).
            self._jobs.defer(session, SEND_TASK, released[0].id)

    def _failed_attempt(self, claimed: Email, error: MailError) -> None:
        """A permanent rejection (5xx to the recipient or the content) ends any message; a
        customer's delivery email also ends when it was not accepted within `give_up_after`
        (its order waits for it). Anything else is tried again on the schedule. `claimed`:
        the row as the batch claimed it, detached."""
        email_id, kind, order_id = claimed.id, claimed.kind, claimed.order_id
        attempts, created_at = claimed.attempts, claimed.created_at
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
            row.next_attempt_at = None
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
