"""`whop-autocancel alerts` (issue 11, item 2): the open alerts, those resolved within --days,
and how the alerts of that window reached the admins: sent at once, folded into a digest (and
how many digests), or waiting for the next one. Alerts are raised, folded, sent in digests and
resolved by the real alert service and stuck-work sweep, on SQLite, PostgreSQL and MariaDB; the
command runs as a real process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from support.harness import make_runtime, make_settings, run_cli, service_environment
from whop_autocancel.admin.alerts import alerts_report
from whop_autocancel.alerts.models import Alert, AlertKind
from whop_autocancel.alerts.service import AlertContent
from whop_autocancel.clock import FrozenClock
from whop_autocancel.mail.sink import SmtpSink
from whop_autocancel.runtime import Runtime

THROTTLE = 900
DAY = timedelta(days=1)


def raise_alert(runtime: Runtime, kind: AlertKind, key: str, at: datetime) -> Alert:
    with runtime.database.transaction() as session:
        alert = runtime.alerts.raise_once(
            session,
            kind,
            f"{kind.value}:{key}",
            AlertContent(subject=f"Problem {key}", summary=f"Details of {key}."),
            at,
        )
        assert alert is not None
        session.expunge(alert)
        return alert


@dataclass
class History:
    t0: datetime
    old_open: Alert  # raised 30 days ago, never resolved
    old_resolved: Alert  # raised 20 days ago, resolved 10 days ago
    resolved: Alert  # raised now, resolved a minute later
    auth: Alert
    burst: list[Alert]  # 5 delivery_failed now: 1 at once, 4 in one digest
    late: list[Alert]  # 2 more after the digest: waiting for the next one


@pytest.fixture
def runtime(
    tmp_path: Path, clock: FrozenClock, smtp_sink: SmtpSink, database_url: str
) -> Iterator[Runtime]:
    built = make_runtime(
        make_settings(
            tmp_path, DATABASE_URL=database_url, SMTP_URL=smtp_sink.url, ALERT_THROTTLE=THROTTLE
        ),
        clock,
    )
    yield built
    built.close()


@pytest.fixture
def history(runtime: Runtime, clock: FrozenClock) -> History:
    t0 = clock.now()
    old_open = raise_alert(runtime, AlertKind.LOW_STOCK, "old", t0 - 30 * DAY)
    old_resolved = raise_alert(runtime, AlertKind.OUT_OF_STOCK, "older", t0 - 20 * DAY)
    with runtime.database.transaction() as session:
        runtime.alerts.resolve(session, "out_of_stock:older", t0 - 10 * DAY)
    burst = [raise_alert(runtime, AlertKind.DELIVERY_FAILED, str(n), t0) for n in range(5)]
    auth = raise_alert(runtime, AlertKind.WHOP_AUTH, "open", t0)
    resolved = raise_alert(runtime, AlertKind.BINDING_CONFLICT, "one", t0)
    with runtime.database.transaction() as session:
        runtime.alerts.resolve(session, "binding_conflict:one", t0 + timedelta(minutes=1))
    clock.advance(THROTTLE + 1)
    assert runtime.stuck_sweep.run(force=True).digests == 1  # the 4 folded delivery_failed
    clock.advance(100)
    late = [
        raise_alert(runtime, AlertKind.DELIVERY_FAILED, f"late{n}", clock.now()) for n in (1, 2)
    ]
    return History(t0, old_open, old_resolved, resolved, auth, burst, late)


def stored(runtime: Runtime, alert: Alert) -> Alert:
    with runtime.database.transaction() as session:
        row = session.get(Alert, alert.id)
        assert row is not None
        session.expunge(row)
        return row


def test_open_recent_and_digest_counts(
    runtime: Runtime, clock: FrozenClock, history: History
) -> None:
    with runtime.database.transaction() as session:
        report = alerts_report(session, clock.now(), throttle=THROTTLE, days=7)
    open_ids = [alert.id for alert in report.open]
    # Every unresolved alert, newest first, whatever its age.
    assert open_ids == [
        *(alert.id for alert in reversed(history.late)),
        history.auth.id,
        *(alert.id for alert in reversed(history.burst)),
        history.old_open.id,
    ]
    assert report.open_total == 9
    assert all(alert.open for alert in report.open)
    # Resolved within the week only (the one resolved ten days ago is not recent).
    assert [alert.id for alert in report.recent] == [history.resolved.id]
    [recent] = report.recent
    assert recent.resolved_at == history.t0 + timedelta(minutes=1)
    assert recent.subject == "Problem one"

    counts = {count.kind: count for count in report.digests}
    assert set(counts) == {"delivery_failed", "whop_auth", "binding_conflict"}
    delivery = counts["delivery_failed"]
    digest_at = history.t0 + timedelta(seconds=THROTTLE + 1)
    assert (
        delivery.raised,
        delivery.sent_at_once,
        delivery.in_digests,
        delivery.digests,
        delivery.waiting,
    ) == (7, 1, 4, 1, 2)
    assert delivery.last_notified_at == digest_at
    assert delivery.next_digest_at == digest_at + timedelta(seconds=THROTTLE)
    auth = counts["whop_auth"]
    assert (auth.raised, auth.sent_at_once, auth.waiting, auth.next_digest_at) == (1, 1, 0, None)
    assert [stored(runtime, alert).notified_at for alert in history.late] == [None, None]

    with runtime.database.transaction() as session:
        month = alerts_report(session, clock.now(), throttle=THROTTLE, days=31)
        only = alerts_report(session, clock.now(), throttle=THROTTLE, kind="whop_auth", limit=1)
        few = alerts_report(session, clock.now(), throttle=THROTTLE, limit=2)
    assert [alert.id for alert in month.recent] == [history.resolved.id, history.old_resolved.id]
    assert {count.kind for count in month.digests} >= {"low_stock", "out_of_stock"}
    assert [alert.id for alert in only.open] == [history.auth.id]
    assert [count.kind for count in only.digests] == ["whop_auth"]
    assert (len(few.open), few.open_total) == (2, 9)


def test_the_command_prints_them_as_json_and_as_text(
    tmp_path: Path, runtime: Runtime, history: History, database_url: str
) -> None:
    env = service_environment(tmp_path, DATABASE_URL=database_url)
    result = run_cli(tmp_path, "alerts", "--json", env=env)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert set(document) == {
        "days",
        "since",
        "alert_throttle_seconds",
        "open_total",
        "open",
        "recent",
        "digests",
    }
    assert (document["days"], document["alert_throttle_seconds"]) == (7, THROTTLE)
    assert document["open_total"] == 9
    by_id = {row["id"]: row for row in document["open"]}
    late = stored(runtime, history.late[0])
    assert by_id[late.id] == {
        "id": late.id,
        "kind": "delivery_failed",
        "subject": "Problem late1",
        "order_id": None,
        "open": True,
        "created_at": late.created_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "notified_at": None,  # waiting for the next digest
        "resolved_at": None,
    }
    first = stored(runtime, history.burst[0])
    assert by_id[first.id]["notified_at"] == by_id[first.id]["created_at"]  # at once
    [recent] = document["recent"]
    assert recent["id"] == history.resolved.id
    assert recent["open"] is False
    assert recent["resolved_at"] == (history.t0 + timedelta(minutes=1)).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    digests = {row["kind"]: row for row in document["digests"]}
    assert digests["delivery_failed"] == {
        "kind": "delivery_failed",
        "raised": 7,
        "sent_at_once": 1,
        "in_digests": 4,
        "digests": 1,
        "waiting": 2,
        "last_notified_at": (history.t0 + timedelta(seconds=THROTTLE + 1)).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        ),
        "next_digest_at": (history.t0 + timedelta(seconds=2 * THROTTLE + 1)).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        ),
    }

    text = run_cli(tmp_path, "alerts", "--days", "31", env=env)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == "9 open alert(s), newest first:"
    assert "2 alert(s) resolved in the last 31 days, newest first:" in lines
    assert any(line.startswith("How the alerts of the last 31 days went out") for line in lines)
    [row] = [line for line in lines if line.startswith("delivery_failed ")]
    assert row.split()[1:6] == ["7", "1", "4", "1", "2"]
    waiting = [line for line in lines if "in next digest" in line]
    assert len(waiting) == 2

    none = run_cli(tmp_path, "alerts", "--kind", "email_failed", env=env)
    assert none.returncode == 0, none.stderr
    assert none.stdout.splitlines() == [
        "No open alerts.",
        "",
        "No alert resolved in the last 7 days.",
        "",
        "No alert raised in the last 7 days.",
    ]
    bad = run_cli(tmp_path, "alerts", "--kind", "nonsense", env=env)
    assert bad.returncode == 2
