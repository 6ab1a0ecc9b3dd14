"""Chaos: the database goes away while webhooks arrive (PostgreSQL, real processes). The web
process answers 503, so Whop redelivers (+10/+20/+40 s, time-scaled); once the database is
back the redelivery is stored and every purchase completes exactly once."""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path

import pytest

from support import backends
from support.chaos import Cluster, report, wait

pytestmark = pytest.mark.e2e


def test_database_unavailable_during_ingest_then_whop_redelivers(
    tmp_path: Path, server_databases: dict[str, str]
) -> None:
    if "postgresql" not in server_databases:
        server_databases["postgresql"] = backends.create_database("postgresql")
    url = server_databases["postgresql"]
    backends.empty_tables(url)
    settings = {
        "DATABASE_URL": url,
        "QUEUE_URL": backends.queue_url("redis", tmp_path),
        "QUEUE_NAME": f"{backends.RUN_ID}-{uuid.uuid4().hex[:8]}",
    }
    with Cluster(tmp_path, workers=1, time_scale=0.05, **settings) as cluster:
        backends.allow_connections(url, False)
        try:
            purchases = cluster.buy(10)
            ids = {p["payment_id"] for p in purchases}

            def first_attempts_refused() -> bool:
                first = [
                    d
                    for d in cluster.state.deliveries()
                    if d["attempt"] == 1 and d["type"] == "payment.succeeded"
                ]
                return len(first) == 10

            wait(first_attempts_refused, 30, "every payment webhook's first attempt")
        finally:
            backends.allow_connections(url, True)
        wait(lambda: cluster.settled(10), 60, "every purchase to complete after recovery")
        deliveries = [d for d in cluster.state.deliveries() if d["type"] == "payment.succeeded"]
        first = Counter(d["status"] for d in deliveries if d["attempt"] == 1)
        final = Counter(d["status"] for d in deliveries if d["status"] == 200)
        report(
            "database unavailable during ingest (PostgreSQL)",
            {
                "purchases": len(ids),
                "first attempts answered": dict(first),
                "redelivered attempts": sum(1 for d in deliveries if d["attempt"] > 1),
                "payment webhooks finally stored (200)": sum(final.values()),
                "orders": cluster.orders(),
                "cancellations by status": dict(cluster.cancellation_statuses()),
                "buyers by emails received": dict(cluster.delivery_counts()),
            },
        )
        assert first == Counter({503: 10})
        assert sum(final.values()) == 10
        assert cluster.orders() == 10
        assert cluster.cancellation_statuses() == Counter({"canceled": 10})
        assert cluster.delivery_counts() == Counter({1: 10})
