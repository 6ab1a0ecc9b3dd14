"""Webhook ingest (DESIGN §5): verify → store once → apply in the same transaction → commit →
enqueue follow-up jobs → answer. An event that fails to apply is stored `failed` and re-applied
by the stuck-work sweep with backoff; only an event that cannot be stored at all gets a 5xx."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import structlog
from sqlalchemy import select
from sqlalchemy.exc import DataError, OperationalError
from sqlalchemy.exc import InterfaceError as DBInterfaceError
from sqlalchemy.orm import Session

from whop_autocancel.alerts.models import AlertKind
from whop_autocancel.alerts.service import AlertContent, Alerts
from whop_autocancel.cancellation.service import mark_inactive_from_webhook
from whop_autocancel.clock import Clock
from whop_autocancel.db.engine import Database, insert_once, savepoint
from whop_autocancel.orders.service import OrderService, order_of_membership
from whop_autocancel.webhooks.models import EventStatus, WebhookEvent
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

REAPPLY_TASK = "webhooks.reapply"
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


@dataclass(frozen=True)
class IngestResult:
    http_status: int
    body: dict[str, str] = field(default_factory=dict)


class Inbox:
    def __init__(
        self,
        database: Database,
        orders: OrderService,
        alerts: Alerts,
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
        self._clock = clock
        self._secrets = list(secrets)
        self._tolerance = tolerance
        self._schedule = list(retry_schedule)
        self._max_attempts = max_attempts
        self._rejections = RejectionCounter(signature_alert_at, signature_window)

    def ingest(self, body: bytes, headers: Mapping[str, str]) -> IngestResult:
        now = self._clock.now()
        try:
            verified = verify_signature(body, headers, self._secrets, now, self._tolerance)
        except SignatureError as error:
            log.warning("webhook_rejected", reason=str(error), http_status=401)
            if self._rejections.add(now):
                self._alert_signature_failures(now, str(error))
            return IngestResult(401, {"error": str(error)})
        try:
            envelope = parse_envelope(body)
        except PayloadError as error:
            log.warning(
                "webhook_rejected", reason=str(error), http_status=400, event_id=verified.webhook_id
            )
            return IngestResult(400, {"error": str(error)})
        event_id = verified.webhook_id
        try:
            status = self._store_and_apply(event_id, envelope, body, now)
        except (OperationalError, DBInterfaceError) as error:
            log.error("webhook_store_failed", event_id=event_id, error=type(error).__name__)
            return IngestResult(503, {"error": "database unavailable; retry later"})
        log.info("webhook_received", event_id=event_id, type=envelope.type, status=status)
        return IngestResult(200, {"status": status})

    def _store_and_apply(
        self, event_id: str, envelope: Envelope, body: bytes, now: datetime
    ) -> str:
        def store_and_apply(session: Session) -> str:
            if session.get(WebhookEvent, event_id) is not None:
                return "duplicate"
            event = WebhookEvent(
                id=event_id,
                type=envelope.type,
                payload=body.decode("utf-8"),
                received_at=now,
                status=EventStatus.RECEIVED.value,
                attempts=0,
            )
            if not insert_once(session, event):
                return "duplicate"  # a concurrent delivery of the same event won
            self._apply_recording(session, event, envelope, now)
            return event.status

        return self._database.run(store_and_apply)

    def _apply_recording(
        self, session: Session, event: WebhookEvent, envelope: Envelope, now: datetime
    ) -> None:
        """Apply in a savepoint; on failure keep the event, `failed`, with its error."""
        event.attempts += 1
        try:
            with savepoint(session):
                handled, order_id = self._apply(session, envelope, now)
        except (OperationalError, DBInterfaceError):
            raise
        except Exception as error:
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
            return
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
        if kind == "payment.succeeded":
            return True, self._orders.apply_payment(session, payment_facts(envelope.data), now).id
        if (
            kind in LIVE_MEMBERSHIP_EVENTS
            or kind in INACTIVE_MEMBERSHIP_EVENTS
            or (kind == "membership.updated")
        ):
            facts = membership_facts(envelope.data)
            inactive = kind in INACTIVE_MEMBERSHIP_EVENTS or facts.status in INACTIVE_STATUSES
            if inactive:
                mark_inactive_from_webhook(session, facts.membership_id, now)
                return True, order_of_membership(session, facts.membership_id)
            order = self._orders.apply_membership_live(session, facts, now)
            return True, order.id if order is not None else None
        if kind.startswith(("refund.", "dispute.")):  # (not dispute_alert.*)
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
            envelope = parse_envelope(event.payload.encode("utf-8"))
            self._apply_recording(session, event, envelope, now)
            log.info(
                "webhook_reapplied", event_id=event.id, status=event.status, attempt=event.attempts
            )

    def _alert_signature_failures(self, now: datetime, last_reason: str) -> None:
        """Many refused signatures in a short time: most likely the wrong secret is set."""

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
