"""Raising alerts: one row per failure (dedupe key), its emails written in the same transaction.

Incidents (Whop unreachable, API key refused) have one open alert at a time: the key
`<kind>:open` is taken by the first raiser and freed when the incident resolves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import cast
from uuid import uuid4

import structlog
from sqlalchemy import String, Table, bindparam, func, select, update
from sqlalchemy.orm import Session

from whop_autocancel import metrics
from whop_autocancel.alerts.models import DEDUPE_KEY_LENGTH, Alert, AlertKind
from whop_autocancel.db.base import UTCDateTime, not_searched
from whop_autocancel.db.engine import after_commit, insert_once
from whop_autocancel.mail.outbox import Outbox
from whop_autocancel.mail.render import RenderedEmail, render_email

log = structlog.get_logger(__name__)
DIGEST_DETAILS = 20  # alerts shown in full in a digest; the rest are counted


@dataclass(frozen=True)
class AlertContent:
    subject: str
    summary: str
    details: Sequence[tuple[str, str]] = ()
    steps: Sequence[str] = ()


class Alerts:
    """Raising alerts. The first of a kind goes out at once; more of the same kind within
    `throttle` seconds are folded into one digest (sent by `flush_digests`), so a burst of
    failures is one email, not a flood."""

    def __init__(
        self,
        outbox: Outbox,
        admin_emails: Sequence[str],
        *,
        throttle: float = 0.0,
        chat_webhook_url: str | None = None,
    ) -> None:
        self._outbox = outbox
        self._admins = list(admin_emails)
        self._throttle = throttle
        self._chat_url = chat_webhook_url

    def raise_once(
        self,
        session: Session,
        kind: AlertKind,
        dedupe_key: str,
        content: AlertContent,
        now: datetime,
        order_id: str | None = None,
    ) -> Alert | None:
        """Record the alert and notify the admins, unless `dedupe_key` was raised before."""
        email = render_email(
            "alert",
            content.subject,
            kind=kind.value,
            summary=content.summary,
            details=list(content.details),
            steps=list(content.steps),
        )
        alert = Alert(
            kind=kind.value,
            dedupe_key=dedupe_key,
            subject=content.subject,
            text_body=email.text,
            order_id=order_id,
            created_at=now,
        )
        if not insert_once(session, alert):
            log.info(
                "alert_already_raised", kind=kind.value, dedupe_key=dedupe_key, order_id=order_id
            )
            _count(session, kind.value, "deduplicated")
            return None
        last = self._last_notified(session, kind.value)
        if last is not None and (now - last).total_seconds() < self._throttle:
            log.warning("alert_folded", kind=kind.value, alert_id=alert.id, order_id=order_id)
            _count(session, kind.value, "folded")
            return alert  # goes out in the next digest of its kind
        alert.notified_at = now
        self._notify(session, kind.value, email, now, order_id=order_id, alert_id=alert.id)
        log.warning("alert_raised", kind=kind.value, alert_id=alert.id, order_id=order_id)
        _count(session, kind.value, "sent")
        return alert

    def flush_digests(self, session: Session, now: datetime) -> int:
        """Send one digest per kind whose folded alerts' throttle window is over."""
        sent = 0
        pending_kinds = session.scalars(
            select(Alert.kind).where(Alert.notified_at.is_(None)).distinct()
        ).all()
        for kind in pending_kinds:
            last = self._last_notified(session, kind)
            if last is not None and (now - last).total_seconds() < self._throttle:
                continue
            folded = list(
                session.scalars(
                    select(Alert)
                    # (By the notified_at index: the folded ones, not every alert of the kind.)
                    .where(not_searched(Alert.kind) == kind, Alert.notified_at.is_(None))
                    .order_by(Alert.id)
                    .with_for_update()
                )
            )
            if not folded:
                continue
            shown, rest = folded[:DIGEST_DETAILS], len(folded) - DIGEST_DETAILS
            subject = f"{len(folded)} more {kind.replace('_', ' ')} alert(s)"
            email = render_email(
                "alert_digest",
                subject,
                kind=kind,
                alerts=[(a.subject, a.text_body) for a in shown],
                more=max(rest, 0),
            )
            for alert in folded:
                alert.notified_at = now
            self._notify(session, kind, email, now, alert_id=folded[0].id)
            log.warning("alert_digest_sent", kind=kind, alerts=len(folded))
            after_commit(session, partial(metrics.ALERT_DIGESTS.labels(kind).inc, 1))
            sent += 1
        return sent

    def _last_notified(self, session: Session, kind: str) -> datetime | None:
        return session.scalar(select(func.max(Alert.notified_at)).where(Alert.kind == kind))

    def _notify(
        self,
        session: Session,
        kind: str,
        email: RenderedEmail,
        now: datetime,
        *,
        alert_id: int,
        order_id: str | None = None,
    ) -> None:
        for address in self._admins:
            self._outbox.queue(
                session,
                kind=f"alert:{kind}",
                to=address,
                email=email,
                now=now,
                order_id=order_id,
                alert_id=alert_id,
            )
        if self._chat_url:
            self._outbox.queue_chat(
                session, self._chat_url, f"{email.subject}\n\n{email.text}", now, alert_id
            )

    def open_incident(
        self, session: Session, kind: AlertKind, content: AlertContent, now: datetime
    ) -> Alert | None:
        """Raise `kind` unless an incident of that kind is already open."""
        return self.raise_once(session, kind, f"{kind.value}:open", content, now)

    def resolve_incidents(self, session: Session, kinds: Sequence[AlertKind], now: datetime) -> int:
        """Close open incidents of `kinds` (a later failure opens a new one). Every successful
        cancellation runs this, nearly always finding none open: one statement for all."""
        return self.resolve_keys(session, [f"{kind.value}:open" for kind in kinds], now)

    def resolve(self, session: Session, dedupe_key: str, now: datetime) -> int:
        """Mark the alert with `dedupe_key` resolved and free its key, so the same trouble
        raises a new alert if it comes back."""
        return self.resolve_keys(session, [dedupe_key], now)

    def resolve_keys(self, session: Session, keys: Sequence[str], now: datetime) -> int:
        """`resolve` for several keys in one UPDATE: each freed key becomes
        `KEY:resolved:<random>`, KEY cut so the whole fits the column (a key as long as the
        column would otherwise stay itself, never freed). The rows are not brought into the
        session (its objects are not synchronised: no caller holds the alerts it resolves)."""
        result = session.execute(
            _RESOLVE_KEYS, {"keys": list(keys), "suffix": f":resolved:{uuid4().hex}", "now": now}
        )
        return result.rowcount  # type: ignore[attr-defined,no-any-return]


_ALERTS = cast(Table, Alert.__table__)
_SUFFIX_LENGTH = len(f":resolved:{uuid4().hex}")
# Built once (every successful cancellation runs it): a table statement, see `resolve_keys`.
_RESOLVE_KEYS = (
    update(_ALERTS)
    .where(_ALERTS.c.dedupe_key.in_(bindparam("keys", expanding=True)))
    .values(
        dedupe_key=func.substr(_ALERTS.c.dedupe_key, 1, DEDUPE_KEY_LENGTH - _SUFFIX_LENGTH)
        + bindparam("suffix", type_=String()),
        resolved_at=bindparam("now", type_=UTCDateTime()),
    )
)


def _count(session: Session, kind: str, outcome: str) -> None:
    """Count a raised alert once the transaction that records it commits."""
    after_commit(session, lambda: metrics.ALERTS.labels(kind, outcome).inc())
