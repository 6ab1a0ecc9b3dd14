"""Raising alerts: one row per failure (dedupe key), its emails written in the same transaction.

Incidents (Whop unreachable, API key refused) have one open alert at a time: the key
`<kind>:open` is taken by the first raiser and freed when the incident resolves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import uuid4

import structlog
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from whop_autocancel.alerts.models import Alert, AlertKind
from whop_autocancel.db.engine import insert_once
from whop_autocancel.mail.outbox import Outbox
from whop_autocancel.mail.render import render_email

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class AlertContent:
    subject: str
    summary: str
    details: Sequence[tuple[str, str]] = ()
    steps: Sequence[str] = ()


class Alerts:
    def __init__(self, outbox: Outbox, admin_emails: Sequence[str]) -> None:
        self._outbox = outbox
        self._admins = list(admin_emails)

    def raise_once(
        self,
        session: Session,
        kind: AlertKind,
        dedupe_key: str,
        content: AlertContent,
        now: datetime,
        order_id: str | None = None,
    ) -> Alert | None:
        """Record the alert and email the admins, unless `dedupe_key` was raised before."""
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
            log.info("alert_already_raised", kind=kind.value, dedupe_key=dedupe_key)
            return None
        for address in self._admins:
            self._outbox.queue(
                session,
                kind=f"alert:{kind.value}",
                to=address,
                email=email,
                now=now,
                order_id=order_id,
                alert_id=alert.id,
            )
        log.warning("alert_raised", kind=kind.value, alert_id=alert.id, order_id=order_id)
        return alert

    def open_incident(
        self, session: Session, kind: AlertKind, content: AlertContent, now: datetime
    ) -> Alert | None:
        """Raise `kind` unless an incident of that kind is already open."""
        return self.raise_once(session, kind, f"{kind.value}:open", content, now)

    def resolve_incidents(self, session: Session, kinds: Sequence[AlertKind], now: datetime) -> int:
        """Close open incidents of `kinds` (a later failure opens a new one)."""
        closed = 0
        for kind in kinds:
            result = session.execute(
                update(Alert)
                .where(Alert.dedupe_key == f"{kind.value}:open")
                .values(dedupe_key=f"{kind.value}:resolved:{uuid4().hex}", resolved_at=now)
            )
            closed += result.rowcount  # type: ignore[attr-defined]
        return closed


def open_incident_kinds(session: Session) -> list[str]:
    rows = session.execute(select(Alert.kind).where(Alert.dedupe_key.like("%:open")))
    return [row[0] for row in rows]
