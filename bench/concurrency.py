"""The large concurrency run: 1,000 purchases (or BENCH_PURCHASES) through 2 web processes and
3 workers, on PostgreSQL (+ Redis queue) and on MariaDB (+ PostgreSQL queue), side by side.

    .venv/bin/python bench/concurrency.py            # needs the local PostgreSQL, MariaDB, Redis

Prints each run's counts (the same invariants the e2e test asserts) and the throughput ratio of
the two runs. Timing lives here, never in the test suite.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from support import backends, concurrency


def main() -> int:
    purchases = int(os.environ.get("BENCH_PURCHASES", "1000"))
    results = {}
    pairs = [("postgresql", "redis"), ("mariadb", "postgresql")]
    only = os.environ.get("BENCH_ONLY")
    for database_kind, queue_kind in [p for p in pairs if only in (None, p[0])]:
        url = backends.create_database(database_kind)
        try:
            folder = tempfile.mkdtemp(prefix="wa-bench-")
            try:
                backend = {
                    "DATABASE_URL": url,
                    "QUEUE_URL": backends.queue_url(queue_kind, folder),
                    "QUEUE_NAME": f"{backends.RUN_ID}-{uuid.uuid4().hex[:8]}",
                }
                result = concurrency.run(Path(folder), backend, purchases, settle_seconds=900)
            finally:
                if os.environ.get("BENCH_KEEP") == "1":
                    print(f"process logs kept in {folder}")
                else:
                    shutil.rmtree(folder, ignore_errors=True)
        finally:
            backends.drop_database(database_kind, url)
        name = f"{database_kind} + {queue_kind} queue"
        results[name] = result
        print(f"\n== {name}\n{result.table()}")
    ok = all(
        r.orders
        == r.distinct_payments
        == r.delivery_emails
        == r.canceled
        == r.memberships_cancelled_once
        == purchases
        and all(s < 500 for s in r.statuses)
        for r in results.values()
    )
    (first, a), (second, b) = results.items()
    print(
        f"\nend-to-end throughput: {first} {purchases / a.seconds:.0f} purchases/s, "
        f"{second} {purchases / b.seconds:.0f} purchases/s "
        f"(ratio {b.seconds / a.seconds:.2f} : 1 in time to settle)"
    )
    print("invariants:", "all held" if ok else "VIOLATED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
