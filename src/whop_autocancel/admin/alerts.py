"""What `whop-autocancel alerts` shows: the open alerts, the ones resolved lately, and how
alerts were folded into digests (see `alerts.service.Alerts`). Reads only; nothing here prints."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.orm import Session

from whop_autocancel.alerts.models import Alert

DEFAULT_DAYS = 7
DEFAULT_LIMIT = 50


@dataclass(frozen=True)
class AlertRow:
    id: int
    kind: str
    subject: str
    order_id: str | None
    created_at: datetime
    notified_at: datetime | None  # None: folded, waiting for its kind's next digest
    resolved_at: datetime | None

    @property
    def open(self) -> bool:
        return self.resolved_at is None


@dataclass(frozen=True)
class DigestCount:
    """How the alerts of one kind raised within the window reached the admins.

    The first alert of a kind goes out at once; more of it within ALERT_THROTTLE are folded
    and go out together in one digest email once the window since the last message is over
    (the stuck-work sweep sends it). `waiting` counts every folded alert not sent yet,
    whenever it was raised."""

    kind: str
    raised: int  # raised within the window
    sent_at_once: int  # of those, emailed when raised
    in_digests: int  # of those, folded and sent in a digest since
    digests: int  # the digest emails that carried them
    waiting: int  # folded, waiting for the next digest of the kind
    last_notified_at: datetime | None  # the kind's last email (alone or a digest)
    next_digest_at: datetime | None  # when `waiting` go out, at the first sweep after it


@dataclass(frozen=True)
class AlertsReport:
    days: float
    since: datetime
    open_total: int  # every open alert; `open` holds the newest `limit` of them
    open: list[AlertRow]
    recent: list[AlertRow]  # resolved within the window, newest first
    digests: list[DigestCount]


_COLUMNS = (
    Alert.id,
    Alert.kind,
    Alert.subject,
    Alert.order_id,
    Alert.created_at,
    Alert.notified_at,
    Alert.resolved_at,
)


def alerts_report(
    session: Session,
    now: datetime,
    *,
    throttle: float,
    days: float = DEFAULT_DAYS,
    kind: str | None = None,
    limit: int = DEFAULT_LIMIT,
) -> AlertsReport:
    """Open alerts (newest first, at most `limit`), those resolved within `days`, and the
    digest counts per kind of the alerts raised within `days` (`throttle`: ALERT_THROTTLE)."""
    since = now - timedelta(days=days)
    only: list[ColumnElement[bool]] = [Alert.kind == kind] if kind else []
    newest = (Alert.created_at.desc(), Alert.id.desc())
    open_rows = session.execute(
        select(*_COLUMNS).where(Alert.resolved_at.is_(None), *only).order_by(*newest).limit(limit)
    ).all()
    open_total = session.scalar(
        select(func.count()).select_from(Alert).where(Alert.resolved_at.is_(None), *only)
    )
    recent_rows = session.execute(
        select(*_COLUMNS)
        .where(Alert.resolved_at >= since, *only)
        .order_by(Alert.resolved_at.desc(), Alert.id.desc())
        .limit(limit)
    ).all()
    return AlertsReport(
        days=days,
        since=since,
        open_total=int(open_total or 0),
        open=[AlertRow(*row) for row in open_rows],
        recent=[AlertRow(*row) for row in recent_rows],
        digests=_digest_counts(session, since, throttle, only),
    )


def _digest_counts(
    session: Session, since: datetime, throttle: float, only: list[ColumnElement[bool]]
) -> list[DigestCount]:
    raised: dict[str, int] = defaultdict(int)
    at_once: dict[str, int] = defaultdict(int)
    folded_sent: dict[str, int] = defaultdict(int)
    digest_times: dict[str, set[datetime]] = defaultdict(set)
    waiting: dict[str, int] = defaultdict(int)
    for kind, created_at, notified_at in session.execute(
        select(Alert.kind, Alert.created_at, Alert.notified_at).where(
            or_(Alert.created_at >= since, Alert.notified_at.is_(None)), *only
        )
    ):
        if notified_at is None:
            waiting[kind] += 1
        if created_at < since:
            continue
        raised[kind] += 1
        if notified_at is None:
            continue
        if notified_at <= created_at:
            at_once[kind] += 1
        else:  # a digest marks every alert it carries with the moment it went out
            folded_sent[kind] += 1
            digest_times[kind].add(notified_at)
    kinds = sorted(set(raised) | set(waiting))
    last = dict(
        session.execute(
            select(Alert.kind, func.max(Alert.notified_at))
            .where(Alert.kind.in_(kinds))
            .group_by(Alert.kind)
        ).all()
    )
    counts = []
    for kind in kinds:
        last_notified = last.get(kind)
        due = (
            last_notified + timedelta(seconds=throttle)
            if waiting[kind] and last_notified is not None
            else None
        )
        counts.append(
            DigestCount(
                kind=kind,
                raised=raised[kind],
                sent_at_once=at_once[kind],
                in_digests=folded_sent[kind],
                digests=len(digest_times[kind]),
                waiting=waiting[kind],
                last_notified_at=last_notified,
                next_digest_at=due,
            )
        )
    return counts
