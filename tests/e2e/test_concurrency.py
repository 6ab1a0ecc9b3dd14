"""Concurrency proof on PostgreSQL and MariaDB: 2 web processes, 3 workers, every webhook sent
concurrently to both web processes. The large run is bench/concurrency.py."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from support import backends, concurrency
from support.reporting import show

pytestmark = pytest.mark.e2e
PURCHASES = int(os.environ.get("WA_CONCURRENCY_PURCHASES", "120"))


@pytest.mark.parametrize(
    ("database_kind", "queue_kind"), [("postgresql", "redis"), ("mariadb", "postgresql")]
)
def test_every_purchase_exactly_once_under_concurrency(
    tmp_path: Path, server_databases: dict[str, str], database_kind: str, queue_kind: str
) -> None:
    if database_kind not in server_databases:
        server_databases[database_kind] = backends.create_database(database_kind)
    database_url = server_databases[database_kind]
    backends.empty_tables(database_url)
    backend = {
        "DATABASE_URL": database_url,
        "QUEUE_URL": backends.queue_url(queue_kind, tmp_path),
        "QUEUE_NAME": f"{backends.RUN_ID}-{uuid.uuid4().hex[:8]}",
    }
    result = concurrency.run(tmp_path, backend, PURCHASES, settle_seconds=240)
    show(f"\n== concurrency: {database_kind} + {queue_kind} queue ==\n{result.table()}")
    assert all(status < 500 for status in result.statuses), result.statuses
    assert result.orders == PURCHASES  # no stray order from a race
    assert result.orders_with_payment == result.distinct_payments == PURCHASES
    assert result.delivery_emails == PURCHASES
    assert result.buyers_with_one_delivery == PURCHASES
    assert result.canceled == PURCHASES
    assert result.successful_cancel_calls == PURCHASES
    assert result.memberships_cancelled_once == PURCHASES
