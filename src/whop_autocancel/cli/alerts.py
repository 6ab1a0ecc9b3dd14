"""Alerts: `alerts` (open, recently resolved, and the digest counts)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from whop_autocancel.admin.alerts import (
    DEFAULT_DAYS,
    DEFAULT_LIMIT,
    AlertRow,
    AlertsReport,
    DigestCount,
    alerts_report,
)
from whop_autocancel.alerts.models import AlertKind
from whop_autocancel.cli.common import LimitOption, cli_settings, open_session
from whop_autocancel.cli.output import (
    Column,
    JsonOption,
    Row,
    WideOption,
    iso,
    out,
    print_json,
    print_table,
)
from whop_autocancel.clock import SystemClock


def alerts(
    days: Annotated[
        float,
        typer.Option(
            "--days",
            min=0,
            metavar="N",
            help="Resolved alerts and digest counts of the last N days.",
        ),
    ] = DEFAULT_DAYS,
    kind: Annotated[
        AlertKind | None,
        typer.Option(
            "--kind",
            metavar="KIND",
            help=f"Only alerts of this kind: {', '.join(kind.value for kind in AlertKind)}.",
        ),
    ] = None,
    limit: LimitOption = DEFAULT_LIMIT,
    json_output: JsonOption = False,
    wide: WideOption = False,
) -> None:
    """List the open and recent alerts, and how they were sent. The open alerts, those
    resolved within --days, and how they reached the admins: sent at once, folded into
    digests, or waiting for the next digest."""
    settings = cli_settings()
    with open_session(settings) as session:
        report = alerts_report(
            session,
            SystemClock().now(),
            throttle=settings.ALERT_THROTTLE,
            days=days,
            kind=kind.value if kind else None,
            limit=limit,
        )
    if json_output:
        print_json(alerts_document(report, settings.ALERT_THROTTLE))
        return
    _print_report(report, settings.ALERT_THROTTLE, wide=wide)


def alert_row(alert: AlertRow) -> dict[str, Any]:
    """An alert as `alerts` shows it (its email's body is not included)."""
    return {
        "id": alert.id,
        "kind": alert.kind,
        "subject": alert.subject,
        "order_id": alert.order_id,
        "open": alert.open,
        "created_at": iso(alert.created_at),
        "notified_at": iso(alert.notified_at),
        "resolved_at": iso(alert.resolved_at),
    }


def digest_row(count: DigestCount) -> dict[str, Any]:
    return {
        "kind": count.kind,
        "raised": count.raised,
        "sent_at_once": count.sent_at_once,
        "in_digests": count.in_digests,
        "digests": count.digests,
        "waiting": count.waiting,
        "last_notified_at": iso(count.last_notified_at),
        "next_digest_at": iso(count.next_digest_at),
    }


def alerts_document(report: AlertsReport, throttle: float) -> dict[str, Any]:
    return {
        "days": report.days,
        "since": iso(report.since),
        "alert_throttle_seconds": throttle,
        "open_total": report.open_total,
        "open": [alert_row(alert) for alert in report.open],
        "recent": [alert_row(alert) for alert in report.recent],
        "digests": [digest_row(count) for count in report.digests],
    }


def _notified_cell(row: Row) -> str:
    return str(row["notified_at"] or "in next digest")


ALERT_COLUMNS = (
    Column("ID", "id", priority=100, identifier=True, keep=True, right=True),
    Column("Kind", "kind", priority=90),
    Column("Order", "order_id", priority=80, identifier=True),
    Column("Subject", "subject", priority=70, free_text=True),
    Column("Created", "created_at", priority=60),
    Column("Notified", "notified_at", priority=50, cell=_notified_cell),
    Column("Resolved", "resolved_at", priority=65),
)
OPEN_COLUMNS = tuple(column for column in ALERT_COLUMNS if column.key != "resolved_at")
DIGEST_COLUMNS = (
    Column("Kind", "kind", priority=100, keep=True),
    Column("Raised", "raised", priority=90, right=True),
    Column("At once", "sent_at_once", priority=70, right=True),
    Column("In digests", "in_digests", priority=70, right=True),
    Column("Digests", "digests", priority=60, right=True),
    Column("Waiting", "waiting", priority=80, right=True),
    Column("Next digest", "next_digest_at", priority=75, cell=lambda row: _next_digest(row)),
)


def _next_digest(row: Row) -> str:
    if not row["waiting"]:
        return "-"
    return str(row["next_digest_at"] or "next sweep")


def _days(days: float) -> str:
    return f"{days:g} day" + ("" if days == 1 else "s")


def _print_report(report: AlertsReport, throttle: float, *, wide: bool) -> None:
    if report.open:
        shown = (
            f", the newest {len(report.open)} shown" if report.open_total > len(report.open) else ""
        )
        print_table(
            OPEN_COLUMNS,
            [alert_row(alert) for alert in report.open],
            title=f"{report.open_total} open alert(s), newest first{shown}:",
            wide=wide,
        )
    else:
        out.print("No open alerts.")
    out.print()
    if report.recent:
        print_table(
            ALERT_COLUMNS,
            [alert_row(alert) for alert in report.recent],
            title=f"{len(report.recent)} alert(s) resolved in the last {_days(report.days)}, "
            "newest first:",
            wide=wide,
        )
    else:
        out.print(f"No alert resolved in the last {_days(report.days)}.")
    out.print()
    if report.digests:
        print_table(
            DIGEST_COLUMNS,
            [digest_row(count) for count in report.digests],
            title=f"How the alerts of the last {_days(report.days)} went out (ALERT_THROTTLE "
            f"{throttle:g} s; waiting ones go in the next digest):",
            wide=wide,
        )
    else:
        out.print(f"No alert raised in the last {_days(report.days)}.")
