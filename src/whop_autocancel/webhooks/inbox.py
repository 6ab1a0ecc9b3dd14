"""Webhook ingest (DESIGN §5): verify → store once, durably → answer. Nothing else happens on
the request path: the events of concurrent requests are stored together by one writer thread
per process (group commit), and each request is answered once its event's transaction has
committed. The `webhooks.apply` job, enqueued once per commit, then applies every stored
(`received`) event, oldest first, a few to a transaction (`per_apply_transaction`), each
event in its own savepoint when one fails; the stuck-work sweep applies any
event whose job was lost. An event that fails to apply is stored `failed` and re-applied with
backoff; only an event that cannot be stored at all gets a 5xx."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache, partial
from typing import TypeVar, cast

import structlog
from sqlalchemy import Integer, Select, String, Table, bindparam, func, or_, select, update
from sqlalchemy.exc import DataError, OperationalError
from sqlalchemy.exc import InterfaceError as DBInterfaceError
from sqlalchemy.orm import Session

from whop_autocancel import metrics
from whop_autocancel.alerts.models import AlertKind
from whop_autocancel.alerts.service import AlertContent, Alerts
from whop_autocancel.cancellation.service import mark_inactive_from_webhook
from whop_autocancel.clock import Clock
from whop_autocancel.db.base import UTCDateTime, not_searched
from whop_autocancel.db.engine import Database, insert_absent, savepoint
from whop_autocancel.db.locks import KeysBusy, trying_locks
from whop_autocancel.jobs import Jobs
from whop_autocancel.orders.service import OrderService, order_of_membership
from whop_autocancel.webhooks.group_commit import GroupCommit
from whop_autocancel.webhooks.models import OBJECT_ID_LENGTH, EventStatus, WebhookEvent
from whop_autocancel.webhooks.rejections import RejectionLog
from whop_autocancel.webhooks.verify import SignatureError, verify_signature
from whop_autocancel.whop.payloads import (
    Envelope,
    EventDataError,
    PayloadError,
    claim_facts,
    membership_facts,
    parse_envelope,
    payment_facts,
)

log = structlog.get_logger(__name__)
T = TypeVar("T")

PAYMENT_SUCCEEDED = "payment.succeeded"  # the one payment event that applies a payment
APPLY_TASK = "webhooks.apply"
REAPPLY_TASK = "webhooks.reapply"
STORE_BATCH = 200  # events stored per transaction at most
APPLY_BATCH = 200  # events one run of the apply job takes before it hands over to a new run
APPLY_PER_TRANSACTION = 8  # events applied in one transaction on SQLite (`per_apply_transaction`)
# With row locks: among how many of the oldest events an apply transaction takes one.
CLAIM_WINDOW = 8
LIVE_MEMBERSHIP_EVENTS = frozenset({"membership.activated"})
INACTIVE_MEMBERSHIP_EVENTS = frozenset({"membership.deactivated"})
INACTIVE_STATUSES = frozenset({"canceled", "expired"})


class RejectionCounter:
    """Signature rejections in a sliding window, per process; `add` says when the count
    reaches the threshold (once per crossing)."""

    def __init__(self, threshold: int, window: float) -> None:
        self.threshold = threshold
        self.window = window
        self._times: deque[datetime] = deque()
        self._lock = threading.Lock()

    def add(self, now: datetime) -> bool:
        with self._lock:
            self._times.append(now)
            while self._times and (now - self._times[0]).total_seconds() > self.window:
                self._times.popleft()
            return len(self._times) == self.threshold


# What became of a webhook (the `outcome` of the metrics): stored (`received`; applied later by
# the worker), or a `duplicate` of a stored one, or not stored.
RECEIVED = EventStatus.RECEIVED.value
DUPLICATE = "duplicate"
BAD_SIGNATURE = "bad_signature"
BAD_REQUEST = "bad_request"
TOO_LARGE = "too_large"
DB_DOWN = "db_down"


@dataclass(frozen=True)
class IngestResult:
    http_status: int
    body: dict[str, str] = field(default_factory=dict)
    outcome: str = ""
    event_type: str | None = None  # None: not verified, or not an event


@dataclass(frozen=True)
class Arrival:
    """A verified event, on its way to the inbox table."""

    event_id: str
    event_type: str
    payload: str  # the raw body, exactly as signed
    received_at: datetime
    object_id: str | None  # its `data.id` (`stored_object_id`)


@dataclass(frozen=True)
class _Checked:
    """What verifying and parsing a request gave: an event to store, or the answer refusing
    it; and, when this refusal crossed the threshold, the reason to alert with."""

    arrival: Arrival | None
    refusal: IngestResult | None = None
    alert_reason: str | None = None


def per_apply_transaction(database: Database) -> int:
    """How many events one apply transaction applies: `APPLY_PER_TRANSACTION` (a fraction of
    the commits; on SQLite, of its one writer's), one on MariaDB. An apply transaction holds
    the locks of the purchases it applied (`purchase_keys`) until it commits, so one of
    several events that waited on a purchase would hold every other purchase of its chunk,
    and every run that needs one of those, for as long (in a flash sale the workers spent more
    time waiting on each other than applying: docs/performance.md). On PostgreSQL a chunk
    only tries each purchase (`trying_locks`) and leaves a busy one to a transaction of its
    own; MariaDB has no lock a transaction can try and keep (its `GET_LOCK` is the
    session's), so there a transaction applies one event. (SQLite: one write transaction at a
    time, no waits.)"""
    return 1 if database.backend in ("mysql", "mariadb") else APPLY_PER_TRANSACTION


class Inbox:
    def __init__(
        self,
        database: Database,
        orders: OrderService,
        alerts: Alerts,
        jobs: Jobs,
        clock: Clock,
        *,
        secrets: Sequence[bytes],
        tolerance: float,
        retry_schedule: Sequence[float],
        max_attempts: int,
        signature_alert_at: int = 20,
        signature_window: float = 300.0,
    ) -> None:
        self._database = database
        self._orders = orders
        self._alerts = alerts
        self._jobs = jobs
        self._clock = clock
        self._secrets = list(secrets)
        self._tolerance = tolerance
        self._schedule = list(retry_schedule)
        self._max_attempts = max_attempts
        self._rejections = RejectionCounter(signature_alert_at, signature_window)
        self.rejected = RejectionLog(clock)
        self._apply_lock = threading.Lock()
        self._applying = False  # a run of the apply job is going in this process
        self._apply_again = False  # another run came meanwhile: look for new events again
        self._writer: GroupCommit[Arrival, str] = GroupCommit(
            self._store_batch,
            after=self._wake_apply,
            max_batch=STORE_BATCH,
            name="webhook-writer",
        )

    # Ingest (the request path) -----------------------------------------------------------------

    async def receive(
        self, body: bytes, headers: Mapping[str, str], client: str | None = None
    ) -> IngestResult:
        """The webhook route: verify and parse here (cheap, no I/O), then wait, without a
        thread, for the writer to commit the event. `client`: the sender's address, for the
        log of refusals."""
        checked = self._check(body, headers, client)
        if checked.alert_reason is not None:
            await asyncio.to_thread(self._alert_signature_failures, checked.alert_reason)
        if checked.arrival is None:
            assert checked.refusal is not None
            return checked.refusal
        arrival = checked.arrival
        try:
            status = await asyncio.wrap_future(self._writer.submit(arrival))
        except (OperationalError, DBInterfaceError) as error:
            return self._unavailable(arrival, error)
        return self._stored(arrival, status)

    def ingest(
        self, body: bytes, headers: Mapping[str, str], client: str | None = None
    ) -> IngestResult:
        """The same as `receive`, blocking (tests, tools): verify, store once, answer."""
        checked = self._check(body, headers, client)
        if checked.alert_reason is not None:
            self._alert_signature_failures(checked.alert_reason)
        if checked.arrival is None:
            assert checked.refusal is not None
            return checked.refusal
        future = self._writer.submit(checked.arrival)
        try:
            status = future.result()
        except (OperationalError, DBInterfaceError) as error:
            return self._unavailable(checked.arrival, error)
        return self._stored(checked.arrival, status)

    def refuse_too_large(self, limit: int, client: str | None = None) -> IngestResult:
        """A body over WEBHOOK_MAX_BYTES, refused before it is read (413)."""
        self.rejected.record(TOO_LARGE, client, reason=f"body over {limit} bytes", http_status=413)
        return IngestResult(413, {"error": f"body larger than {limit} bytes"}, TOO_LARGE)

    def close(self) -> None:
        """Store what is queued already, stop the writer, log what the refusal log folded."""
        self._writer.close()
        self.rejected.close()

    def _check(self, body: bytes, headers: Mapping[str, str], client: str | None) -> _Checked:
        now = self._clock.now()
        try:
            verified = verify_signature(body, headers, self._secrets, now, self._tolerance)
        except SignatureError as error:
            self.rejected.record(BAD_SIGNATURE, client, reason=str(error), http_status=401)
            return _Checked(
                None,
                IngestResult(401, {"error": str(error)}, BAD_SIGNATURE),
                str(error) if self._rejections.add(now) else None,
            )
        try:
            envelope = parse_envelope(body)
        except PayloadError as error:
            self.rejected.record(
                BAD_REQUEST,
                client,
                reason=str(error),
                http_status=400,
                event_id=verified.webhook_id,
            )
            return _Checked(None, IngestResult(400, {"error": str(error)}, BAD_REQUEST))
        # (verify_signature checked the body is UTF-8)
        return _Checked(
            Arrival(
                verified.webhook_id,
                envelope.type,
                body.decode("utf-8"),
                now,
                stored_object_id(envelope),
            )
        )

    def _stored(self, arrival: Arrival, status: str) -> IngestResult:
        log.info(
            "webhook_received", event_id=arrival.event_id, type=arrival.event_type, status=status
        )
        return IngestResult(200, {"status": status}, status, arrival.event_type)

    def _unavailable(self, arrival: Arrival, error: Exception) -> IngestResult:
        log.error(
            "webhook_store_failed",
            event_id=arrival.event_id,
            type=arrival.event_type,
            error=type(error).__name__,
        )
        return IngestResult(
            503, {"error": "database unavailable; retry later"}, DB_DOWN, arrival.event_type
        )

    # The writer thread ---------------------------------------------------------------------------

    def _store_batch(self, arrivals: Sequence[Arrival]) -> list[str | Exception]:
        """One transaction for the whole batch: each event's status (`received`, or
        `duplicate`). The database unavailable fails every request of the batch (503); any
        other error is one event's own, so its batch is stored again one event at a time."""
        try:
            return list(
                self._database.run(lambda session: store_arrivals(session, arrivals), urgent=True)
            )
        except (OperationalError, DBInterfaceError):
            raise
        except Exception:
            if len(arrivals) == 1:
                raise
            log.exception("webhook_batch_failed", events=len(arrivals))
        return [self._store_alone(arrival) for arrival in arrivals]

    def _store_alone(self, arrival: Arrival) -> str | Exception:
        try:
            [status] = self._database.run(
                lambda session: store_arrivals(session, [arrival]), urgent=True
            )
        except Exception as error:
            return error
        return status

    def _wake_apply(self, outcomes: Sequence[str | Exception]) -> None:
        """After a commit that stored anything, before its requests are answered: one apply job
        for the whole batch. Lost (the queue is down, the process dies first), the sweep
        applies the events instead."""
        if RECEIVED not in outcomes or self.wake_apply_here():  # (`serve`: a run is going)
            return
        try:
            self._jobs.enqueue(APPLY_TASK)
        except Exception as error:
            log.warning("webhook_apply_enqueue_failed", error=f"{type(error).__name__}: {error}")

    # Apply (the worker) --------------------------------------------------------------------------

    def apply_received(self) -> int:
        """The `webhooks.apply` job: apply the `received` events, oldest first, a few to a
        transaction on SQLite, one elsewhere (`per_apply_transaction`; each event in its own
        savepoint: one that fails is stored `failed` alone; a worker dying mid-apply rolls the
        transaction back and its events stay `received`). Runs at once never apply one event
        twice: each takes its events locked (skipping those another run holds, where the
        database can) and only while they are still `received`.

        One run per process at a time: a run that finds another one going tells it to look
        again before it ends, and leaves; so does this process's webhook writer (`serve`),
        instead of enqueueing a job. A run goes on until no event is left, or hands over
        to a new run after `APPLY_BATCH` events so that other jobs get their turn. On SQLite the
        webhook writer's commits go before these (the write turn's urgent callers), so storing
        what Whop sends is never held up by more than one of these transactions. Returns how
        many it applied."""
        with self._apply_lock:
            if self._applying:
                self._apply_again = True
                return 0
            self._applying = True
        applied = 0
        try:
            while applied < APPLY_BATCH:
                with self._apply_lock:
                    self._apply_again = False
                limit = APPLY_BATCH - applied
                oldest = self._database.read(partial(oldest_received_events, limit=limit))
                applied_before = applied
                for done in self._apply_all(oldest):
                    for kind, status in done:
                        metrics.observe_webhook_apply(kind, status)
                    applied += len(done)
                # Fewer than asked for, all applied: none was left when it looked. (Otherwise
                # none left now, or other processes' runs hold them.) Ending and telling the
                # writer so is one step: what it stores after that enqueues a new run.
                drained = len(oldest) < limit and applied - applied_before == len(oldest)
                if drained or applied == applied_before:
                    with self._apply_lock:
                        if not self._apply_again:
                            self._applying = False
                            return applied
            self._jobs.enqueue(APPLY_TASK)  # more may be waiting: a new run takes them
            return applied
        finally:
            with self._apply_lock:
                self._applying = False
                woken, self._apply_again = self._apply_again, False
            if woken:  # the run failed after the writer counted on it: a job takes over
                self._wake_apply([RECEIVED])

    def wake_apply_here(self) -> bool:
        """Tell this process's apply run, if one is going, to look again before it ends (no
        job needed); False when none is going."""
        with self._apply_lock:
            if not self._applying:
                return False
            self._apply_again = True
            return True

    def _apply_all(self, oldest: Sequence[str]) -> Iterator[list[tuple[str, str]]]:
        """Apply `oldest` (those still `received` and not held by another run), a transaction
        at a time; yields what each applied. A chunk of them a transaction (SQLite,
        PostgreSQL): on PostgreSQL the chunk only tries each event's purchase, and the events
        whose purchase another transaction held are applied after it, each in a transaction
        of its own that waits for the purchase (holding no other). MariaDB one a
        transaction: one of the next `CLAIM_WINDOW` that no other run holds
        (`_ROWS_NEXT_CLAIMED`), and the next transaction looks on from there. (Trying each
        event of a list that other runs walk at once, one transaction each, spent a
        transaction on every event another run had taken: two more an event with three
        workers.)"""
        per_transaction = per_apply_transaction(self._database)
        if per_transaction > 1:
            for start in range(0, len(oldest), per_transaction):
                busy: list[str] = []
                yield self._apply_chunk_run(oldest[start : start + per_transaction], busy=busy)
                for event_id in busy:
                    yield self._apply_chunk_run([event_id])
            return
        position = 0
        while position < len(oldest):
            window = oldest[position : position + CLAIM_WINDOW]
            claimed: list[str] = []
            yield self._apply_chunk_run(window, claimed)
            position += window.index(claimed[0]) + 1 if claimed else len(window)

    def _apply_chunk_run(
        self,
        chunk: Sequence[str],
        claimed: list[str] | None = None,
        busy: list[str] | None = None,
    ) -> list[tuple[str, str]]:
        """Apply a chunk in one transaction, first the quick way (`_apply_quickly`); when an
        event fails, the whole transaction is rolled back and the chunk applied again with a
        savepoint for each event (`_apply_chunk`), so that the failed event is recorded
        `failed` and the others applied (nothing left the process: the commit never came).
        With `claimed`, the transaction applies only one event of `chunk` it can take
        (`_ROWS_NEXT_CLAIMED`), and puts its id in `claimed`. With `busy`, it only tries each
        event's purchase (`trying_locks`) and puts the ids of those it left, their purchase
        held by another transaction, in `busy`."""

        def attempt(work: Callable[[Session], list[tuple[str, str]]]) -> list[tuple[str, str]]:
            return self._database.run(
                partial(_trying_purchases, work=work, busy=busy), durable=False
            )

        try:
            return attempt(
                partial(self._apply_quickly, event_ids=chunk, claimed=claimed, busy=busy)
            )
        except _ApplyFailed as failed:
            log.info("webhook_chunk_applied_again", events=len(chunk), error=str(failed))
            if claimed is not None:  # that one event alone, recorded `failed`
                chunk = [failed.event_id]
                claimed[:] = chunk
            return attempt(partial(self._apply_chunk, event_ids=chunk, busy=busy))

    def _apply_quickly(
        self,
        session: Session,
        event_ids: Sequence[str],
        claimed: list[str] | None = None,
        busy: list[str] | None = None,
    ) -> list[tuple[str, str]]:
        """`_apply_chunk` without a savepoint for each event (each costs more than most events'
        work), the events read and recorded as table rows: one read, and one UPDATE sent with
        a row for each event applied, instead of the unit of work flushing an UPDATE for each
        before the next event's first read. An event that fails raises `_ApplyFailed`. (Nothing
        an event's apply reads is about the stored events, so none needs to see the others
        recorded before it.) With `busy`: an event whose purchase another transaction holds
        is left as it is (its apply raised `KeysBusy` before it wrote anything) and its id put
        in `busy`."""
        now = self._clock.now()
        if claimed is not None:
            statement = _ROWS_NEXT_CLAIMED
        else:
            statement = _ROWS_AMONG_LOCKED if self._database.skip_locked else _ROWS_AMONG
        done: list[tuple[str, str]] = []
        applied: list[dict[str, object]] = []
        for event in session.execute(statement, {"event_ids": list(event_ids)}).all():
            if claimed is not None:
                claimed[:] = [event.id]  # (a run again after a conflict: the same or another)
            if event.status != RECEIVED:
                continue
            try:
                envelope = parse_envelope(event.payload.encode("utf-8"))
                handled, order_id = self._apply(session, envelope, now)
                session.flush()  # (what it wrote fails here, as its savepoint's end would)
            except KeysBusy:
                assert busy is not None  # (only a transaction that tries raises it)
                busy.append(event.id)
                continue
            except (OperationalError, DBInterfaceError):
                raise
            except Exception as error:  # (a body that cannot be read is recorded by the other way)
                raise _ApplyFailed(event.id, f"{event.id}: {type(error).__name__}") from error
            status = (EventStatus.HANDLED if handled else EventStatus.IGNORED).value
            applied.append(
                {"event_id": event.id, "applied_status": status, "applied_to": order_id, "now": now}
            )
            log.info(
                "webhook_applied",
                event_id=event.id,
                type=event.type,
                status=status,
                attempt=event.attempts + 1,
                order_id=order_id,
            )
            done.append((event.type, status))
        if applied:
            session.execute(_MARK_APPLIED, applied)
        return done

    def _apply_chunk(
        self, session: Session, event_ids: Sequence[str], busy: list[str] | None = None
    ) -> list[tuple[str, str]]:
        """Apply those of `event_ids` still `received` (and not held by another run), oldest
        first, each in a savepoint: the (type, status) of each one applied or failed. With
        `busy`, as `_apply_quickly`: an event whose purchase is held is left."""
        now = self._clock.now()
        statement = _AMONG_LOCKED if self._database.skip_locked else _AMONG
        # (SQLite: the transaction began with the write lock, so nobody else applies now.
        # Elsewhere a row is read as it is once locked: one another run applied meanwhile is
        # no longer `received`.)
        done = []
        for event in session.scalars(statement, {"event_ids": list(event_ids)}).all():
            if event.status != RECEIVED:
                continue
            try:
                order_id = self._apply_stored(session, event, now)
            except KeysBusy:  # (its savepoint rolled back)
                assert busy is not None
                busy.append(event.id)
                continue
            log.info(
                "webhook_applied",
                event_id=event.id,
                type=event.type,
                status=event.status,
                attempt=event.attempts,
                order_id=order_id,
            )
            done.append((event.type, event.status))
        return done

    def _apply_stored(self, session: Session, event: WebhookEvent, now: datetime) -> str | None:
        try:
            envelope = parse_envelope(event.payload.encode("utf-8"))
        except PayloadError as error:  # (it was read when it arrived: a row edited since)
            event.attempts += 1
            event.status = EventStatus.FAILED.value
            event.last_error = f"stored body cannot be read: {error}"
            event.next_attempt_at = None
            self._alert_apply_failed(session, event, now, retried=False)
            return None
        return self._apply_recording(session, event, envelope, now)

    def _apply_recording(
        self, session: Session, event: WebhookEvent, envelope: Envelope, now: datetime
    ) -> str | None:
        """Apply in a savepoint; on failure keep the event, `failed`, with its error. Returns
        the id of the order the event was applied to (None: none, or it failed). The attempt
        is counted with the outcome, in one UPDATE (counted before the savepoint, it would be
        flushed on its own first)."""
        try:
            with savepoint(session):
                handled, order_id = self._apply(session, envelope, now)
        except (OperationalError, DBInterfaceError, KeysBusy):
            raise
        except Exception as error:
            event.attempts += 1
            # Data that can never apply (a missing id, a value longer than its column) is not
            # retried: the admin hears at once, and `events replay` tries it again by hand.
            never = isinstance(error, (EventDataError, DataError))
            event.status = EventStatus.FAILED.value
            event.last_error = f"{type(error).__name__}: {error}"[:2000]
            delay = self._schedule[min(event.attempts - 1, len(self._schedule) - 1)]
            event.next_attempt_at = None if never else now + timedelta(seconds=delay)
            log.error(
                "webhook_apply_failed",
                event_id=event.id,
                type=event.type,
                attempt=event.attempts,
                error=event.last_error,
                retried=not never,
            )
            if never or event.attempts >= self._max_attempts:
                self._alert_apply_failed(session, event, now, retried=not never)
            return None
        self._applied(event, handled, order_id, now)
        return order_id

    def _applied(
        self, event: WebhookEvent, handled: bool, order_id: str | None, now: datetime
    ) -> None:
        event.attempts += 1
        event.status = (EventStatus.HANDLED if handled else EventStatus.IGNORED).value
        event.order_id = order_id or event.order_id
        event.handled_at = now
        event.last_error = None
        event.next_attempt_at = None

    def _apply(
        self, session: Session, envelope: Envelope, now: datetime
    ) -> tuple[bool, str | None]:
        """Apply one event; (False, None) when its type is not one we act on (stored as
        `ignored`). The second item is the order it concerns, for the purchase's timeline."""
        kind = envelope.type
        if kind == PAYMENT_SUCCEEDED:
            return True, self._orders.apply_payment(session, payment_facts(envelope.data), now).id
        if (
            kind in LIVE_MEMBERSHIP_EVENTS
            or kind in INACTIVE_MEMBERSHIP_EVENTS
            or (kind == "membership.updated")
        ):
            facts = membership_facts(envelope.data)
            inactive = kind in INACTIVE_MEMBERSHIP_EVENTS or facts.status in INACTIVE_STATUSES
            if inactive:  # (each cancellation it settles is logged with its order)
                mark_inactive_from_webhook(session, facts.membership_id, now)
                return True, order_of_membership(session, facts.membership_id)
            order = self._orders.apply_membership_live(session, facts, now)
            return True, order.id if order is not None else None
        if kind.startswith(CLAIM_PREFIXES):  # (not dispute_alert.*)
            claim = claim_facts(kind, envelope.data)
            return True, self._orders.apply_claim(session, claim, now).id
        return False, None

    def reapply(self, event_id: str) -> None:
        """The `webhooks.reapply` job: try a `failed` event again once it is due."""
        now = self._clock.now()
        with self._database.transaction() as session:
            event = session.get(WebhookEvent, event_id, with_for_update=True)
            if event is None or event.status != EventStatus.FAILED.value:
                return
            if event.next_attempt_at is not None and event.next_attempt_at > now:
                return
            order_id = self._apply_stored(session, event, now)
            applied = event.type, event.status
            log.info(
                "webhook_reapplied",
                event_id=event.id,
                status=event.status,
                attempt=event.attempts,
                order_id=order_id,
            )
        metrics.observe_webhook_apply(*applied)

    def _alert_signature_failures(self, last_reason: str) -> None:
        """Many refused signatures in a short time: most likely the wrong secret is set."""
        now = self._clock.now()

        def raise_alert(session: Session) -> None:
            self._alerts.raise_once(
                session,
                AlertKind.WEBHOOK_SIGNATURE_FAILURES,
                f"webhook_signature_failures:{now:%Y-%m-%dT%H}",
                AlertContent(
                    subject="Webhooks are being refused: check WHOP_WEBHOOK_SECRET",
                    summary=(
                        f"{self._rejections.threshold} or more webhooks were refused for their "
                        f"signature within {self._rejections.window:g} s (last reason: "
                        f"{last_reason}). If they are Whop's, purchases are not being recorded "
                        "from webhooks (the Whop sweep still finds them, later)."
                    ),
                    steps=[
                        "Copy the webhook's secret (ws_…) from Whop's dashboard into "
                        "WHOP_WEBHOOK_SECRET and restart; during a rotation list both secrets, "
                        "space-separated.",
                        "If the requests are not Whop's, nothing needs doing: they were refused.",
                    ],
                ),
                now,
            )

        try:
            self._database.run(raise_alert)
        except (OperationalError, DBInterfaceError):
            log.exception("signature_alert_failed")

    def _alert_apply_failed(
        self, session: Session, event: WebhookEvent, now: datetime, *, retried: bool
    ) -> None:
        self._alerts.raise_once(
            session,
            AlertKind.EVENT_APPLY_FAILED,
            f"event_apply_failed:{event.id}",
            AlertContent(
                subject=(
                    f"Webhook {event.type} {event.id} keeps failing to apply"
                    if retried
                    else f"Webhook {event.type} {event.id} cannot be applied"
                ),
                summary=(
                    f"The event was received and stored, but applying it failed "
                    f"{event.attempts} times: {event.last_error}. It keeps being retried."
                    if retried
                    else "The event was received and stored, but its data can never be "
                    f"applied: {event.last_error}. It is not retried."
                ),
                details=[
                    ("Event", event.id),
                    ("Type", event.type),
                    ("Received", event.received_at.isoformat()),
                ],
                steps=[
                    "Check the service's logs for webhook_apply_failed with this event id.",
                    "Fix the cause; the event is re-applied automatically."
                    if retried
                    else "Look the purchase up in the Whop dashboard and handle it by hand; "
                    f"`whop-autocancel events replay {event.id}` tries it again, "
                    f"`whop-autocancel events ignore {event.id}` sets it aside.",
                ],
            ),
            now,
        )


def _trying_purchases(session: Session, work: Callable[[Session], T], busy: list[str] | None) -> T:
    """Run `work`; with `busy` (emptied first: this may be a transaction's second run after a
    conflict), only trying each purchase's locks (`trying_locks`)."""
    if busy is None:
        return work(session)
    busy.clear()
    with trying_locks(session):
        return work(session)


class _ApplyFailed(Exception):
    """An event of a chunk applied without savepoints failed: the chunk goes again with them."""

    def __init__(self, event_id: str, message: str) -> None:
        super().__init__(message)
        self.event_id = event_id


def store_arrivals(session: Session, arrivals: Sequence[Arrival]) -> list[str]:
    """Insert the events not stored yet, `received`, in one statement; each arrival's status:
    `received`, or `duplicate` (stored before, by another request of this batch, or by a
    concurrent transaction: one row per event id whatever the race)."""
    first: dict[str, int] = {}
    for index, arrival in enumerate(arrivals):
        first.setdefault(arrival.event_id, index)
    rows = [
        {
            "id": arrival.event_id,
            "type": arrival.event_type,
            "payload": arrival.payload,
            "received_at": arrival.received_at,
            "status": RECEIVED,
            "attempts": 0,
            "object_id": arrival.object_id,
        }
        for arrival in sorted((arrivals[index] for index in first.values()), key=_event_id)
    ]
    inserted = insert_absent(session, WebhookEvent, rows, "id")
    return [
        RECEIVED if first[arrival.event_id] == index and arrival.event_id in inserted else DUPLICATE
        for index, arrival in enumerate(arrivals)
    ]


def stored_object_id(envelope: Envelope) -> str | None:
    """The `object_id` to store with an event: its `data.id`, or None when there is none or it
    is longer than the column (the event is stored all the same: applying judges its data)."""
    object_id = envelope.object_id
    return object_id if object_id is None or len(object_id) <= OBJECT_ID_LENGTH else None


def _event_id(arrival: Arrival) -> str:
    return arrival.event_id


def oldest_received_events(session: Session, limit: int) -> list[str]:
    """The ids of the events waiting to be applied, oldest first."""
    return list(session.scalars(_OLDEST_RECEIVED, {"limit": limit}))


# The statements each apply run makes, built once (their parameters bound at each run):
# building and keying a statement costs more than SQLite takes to run it.
_EVENTS = cast(Table, WebhookEvent.__table__)
# (Of the table's columns, not the mapped class's: a plain statement, which the session runs
# without the ORM's work for each statement.)
_OLDEST_RECEIVED = (
    select(_EVENTS.c.id)
    .where(_EVENTS.c.status == RECEIVED)
    .order_by(_EVENTS.c.received_at, _EVENTS.c.id)
    .limit(bindparam("limit", type_=Integer()))
)
# By their ids alone, the status checked on each row: SQLite, without statistics, may walk
# the status index (every waiting event) instead of looking the ids up
# (tests/integration/test_query_plans.py).
_AMONG = (
    select(WebhookEvent)
    .where(WebhookEvent.id.in_(bindparam("event_ids", expanding=True)))
    .order_by(WebhookEvent.received_at, WebhookEvent.id)
)
_AMONG_LOCKED = _AMONG.with_for_update(skip_locked=True)
# The same as table rows, with what applying them needs (`_apply_quickly`).
_ROWS_AMONG = (
    select(_EVENTS.c.id, _EVENTS.c.type, _EVENTS.c.status, _EVENTS.c.payload, _EVENTS.c.attempts)
    .where(_EVENTS.c.id.in_(bindparam("event_ids", expanding=True)))
    .order_by(_EVENTS.c.received_at, _EVENTS.c.id)
)
_ROWS_AMONG_LOCKED = _ROWS_AMONG.with_for_update(skip_locked=True)
# One of them still waiting that no other run holds (row locks: PostgreSQL, MariaDB), in the
# order of their ids: MariaDB locks every row it reads, and it reads them all to sort them by
# anything but the index it finds them by (the events of a window are a moment apart).
_ROWS_NEXT_CLAIMED = (
    _ROWS_AMONG.where(not_searched(_EVENTS.c.status) == RECEIVED)  # (by id alone: see `_AMONG`)
    .order_by(None)
    .order_by(_EVENTS.c.id)
    .limit(1)
    .with_for_update(skip_locked=True)
)
# Events applied, recorded as `_applied` records one (sent with a row for each).
_MARK_APPLIED = (
    update(_EVENTS)
    .where(_EVENTS.c.id == bindparam("event_id"))
    .values(
        status=bindparam("applied_status"),
        attempts=_EVENTS.c.attempts + 1,
        order_id=func.coalesce(bindparam("applied_to", type_=String()), _EVENTS.c.order_id),
        handled_at=bindparam("now", type_=UTCDateTime()),
        last_error=None,
        next_attempt_at=None,
    )
)

CLAIM_PREFIXES = ("refund.", "dispute.")  # the events that can stop a cancellation
# Their types (WHOP.md), for the (status, type) index.
CLAIM_TYPES = ("refund.created", "refund.updated", "dispute.created", "dispute.updated")


def names_unapplied(session: Session, ids: Sequence[str]) -> bool:
    """Whether a refund or dispute stored but not applied yet (`received`) names one of `ids`
    (a payment's or a membership's) in its body. Only those: no other event can stop a
    cancellation, and a backlog of payments must not be read at every claim: the (status,
    type) index finds the waiting claims alone, whose bodies are searched."""
    patterns = {f"pattern{n}": _containing(f'"{i}"') for n, i in enumerate(ids)}
    return session.scalars(_claims_naming(len(ids)), patterns).first() is not None


@cache
def _claims_naming(count: int) -> Select[str]:
    """`names_unapplied`'s statement for `count` ids, built once (every cancellation runs it):
    the body LIKE each of the parameters `pattern0`… (see `_containing`)."""
    return (
        select(_EVENTS.c.id)  # (the table's: see `_OLDEST_RECEIVED`)
        .where(
            _EVENTS.c.status == RECEIVED,
            _EVENTS.c.type.in_(CLAIM_TYPES),
            or_(
                *[
                    _EVENTS.c.payload.like(bindparam(f"pattern{n}"), escape=LIKE_ESCAPE)
                    for n in range(count)
                ]
            ),
        )
        .limit(1)
    )


LIKE_ESCAPE = "/"


def _containing(text: str) -> str:
    """A LIKE pattern (escaped with LIKE_ESCAPE) that matches any value containing `text`
    as it is: its own `%`, `_` and escape character match only themselves."""
    escaped = text.replace(LIKE_ESCAPE, LIKE_ESCAPE * 2)
    escaped = escaped.replace("%", LIKE_ESCAPE + "%").replace("_", LIKE_ESCAPE + "_")
    return f"%{escaped}%"


def stored_payment_webhooks(session: Session, payment_ids: Sequence[str]) -> set[str]:
    """Those of `payment_ids` whose `payment.succeeded` webhook is stored, whatever became of
    it (by the `object_id` index, one statement): waiting (`received`), applied, set aside by
    an admin (`ignored`) or `failed` (which has its own retries and alert). Its payment was
    not missed. Other `payment.*` events do not count: they apply nothing (stored `ignored`),
    so a payment whose `payment.succeeded` never came after its `payment.pending` did is still
    missed."""
    if not payment_ids:
        return set()
    return set(session.scalars(_PAYMENT_WEBHOOKS_AMONG, {"payment_ids": list(payment_ids)}))


_PAYMENT_WEBHOOKS_AMONG = select(WebhookEvent.object_id).where(
    WebhookEvent.object_id.in_(bindparam("payment_ids", expanding=True)),
    WebhookEvent.type == PAYMENT_SUCCEEDED,
)


def unapplied_events(session: Session, received_before: datetime, limit: int) -> list[str]:
    """Events still `received` that arrived before `received_before`: their apply job was lost
    (or is very late)."""
    return list(
        session.scalars(
            select(WebhookEvent.id)
            .where(WebhookEvent.status == RECEIVED, WebhookEvent.received_at < received_before)
            .limit(limit)
        )
    )


def due_failed_events(session: Session, now: datetime, limit: int) -> list[str]:
    return list(
        session.scalars(
            select(WebhookEvent.id)
            .where(
                WebhookEvent.status == EventStatus.FAILED.value, WebhookEvent.next_attempt_at <= now
            )
            .limit(limit)
        )
    )
