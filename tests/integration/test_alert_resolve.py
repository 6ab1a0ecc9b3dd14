"""Resolving alerts frees their dedupe keys, so the same trouble alerts again; several at once
(a cancellation that went through closes the Whop incidents) in one statement. On SQLite,
PostgreSQL and MariaDB."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from support.harness import make_runtime, make_settings
from whop_autocancel.alerts.models import DEDUPE_KEY_LENGTH, Alert, AlertKind
from whop_autocancel.alerts.service import AlertContent
from whop_autocancel.clock import FrozenClock
from whop_autocancel.runtime import Runtime


@pytest.fixture
def runtime(tmp_path: Path, clock: FrozenClock, database_url: str) -> Iterator[Runtime]:
    runtime = make_runtime(make_settings(tmp_path, DATABASE_URL=database_url), clock)
    yield runtime
    runtime.close()


def raise_alert(runtime: Runtime, kind: AlertKind, key: str) -> bool:
    with runtime.database.transaction() as session:
        raised = runtime.alerts.raise_once(
            session, kind, key, AlertContent(subject=key[:50], summary="s"), runtime.clock.now()
        )
        return raised is not None


def test_resolved_keys_are_freed_even_at_the_column_length_and_others_stay(
    runtime: Runtime,
) -> None:
    long_key = "out_of_stock:" + "x" * (DEDUPE_KEY_LENGTH - len("out_of_stock:"))
    keys = [f"{AlertKind.WHOP_UNREACHABLE.value}:open", f"{AlertKind.WHOP_AUTH.value}:open"]
    for kind, key in [
        (AlertKind.WHOP_UNREACHABLE, keys[0]),
        (AlertKind.WHOP_AUTH, keys[1]),
        (AlertKind.OUT_OF_STOCK, long_key),
        (AlertKind.OUT_OF_STOCK, "out_of_stock:other"),
    ]:
        assert raise_alert(runtime, kind, key)
    now = runtime.clock.now()
    with runtime.database.transaction() as session:
        closed = runtime.alerts.resolve_incidents(
            session, [AlertKind.WHOP_UNREACHABLE, AlertKind.WHOP_AUTH], now
        )
        assert closed == 2
        assert runtime.alerts.resolve(session, long_key, now) == 1
    with runtime.database.transaction() as session:
        rows = {alert.dedupe_key: alert for alert in session.scalars(select(Alert))}
    assert "out_of_stock:other" in rows
    assert rows["out_of_stock:other"].resolved_at is None
    freed = [key for key in rows if ":resolved:" in key]
    assert len(freed) == 3
    assert all(rows[key].resolved_at is not None for key in freed)
    assert all(len(key) <= DEDUPE_KEY_LENGTH for key in rows)
    assert not set(keys) & set(rows)
    assert long_key not in rows
    # The same trouble alerts again.
    assert raise_alert(runtime, AlertKind.WHOP_UNREACHABLE, keys[0])
    assert raise_alert(runtime, AlertKind.OUT_OF_STOCK, long_key)
