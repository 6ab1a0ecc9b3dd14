"""The whole flow through a real consumer on each queue backend (SQLite, PostgreSQL, Redis),
and the readiness endpoint that watches the workers."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url

from support import backends
from support.harness import MESSAGE_PLAN, ServiceServer, make_runtime, make_settings, wait_for
from whop_autocancel.cancellation.models import Cancellation
from whop_autocancel.jobs import Jobs
from whop_autocancel.mail.sink import SmtpSink
from whop_autocancel.simulator import SimulatorServer


def test_purchases_are_delivered_and_cancelled_through_each_queue_backend(
    tmp_path: Path,
    queue_settings: dict[str, str],
    database_url: str,
    simulator: SimulatorServer,
    smtp_sink: SmtpSink,
) -> None:
    settings = make_settings(
        tmp_path,
        DATABASE_URL=database_url,
        WHOP_API_URL=simulator.api_url,
        SMTP_URL=smtp_sink.url,
        CANCEL_DELAY=0.3,
        SWEEP_INTERVAL=1,
        STUCK_GRACE=1,
        RETRY_SCHEDULE="0.3,0.6",
        **queue_settings,
    )
    runtime = make_runtime(settings)
    server = ServiceServer(runtime, with_worker=True)
    try:
        with server.running(), httpx.Client(base_url=server.url) as http:
            simulator.state.set_webhook_url(f"{server.url}/webhooks/whop")
            purchases = [
                simulator.state.create_purchase(MESSAGE_PLAN, email=f"q{n}@example.com")
                for n in range(3)
            ]

            def all_cancelled() -> bool:
                with runtime.database.transaction() as session:
                    statuses = list(session.scalars(select(Cancellation.status)))
                return statuses == ["canceled"] * 3

            wait_for(all_cancelled, 30, "three cancellations")
            for purchase in purchases:
                assert simulator.state.membership(purchase["membership_id"])["status"] == (
                    "canceled"
                )
            wait_for(lambda: len(smtp_sink.messages) == 6, 15, "3 deliveries + 3 notices")
            ready = http.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json()["worker"] == "ok"
    finally:
        runtime.close()


def test_readyz_fails_without_a_worker_and_says_why(tmp_path: Path, database_url: str) -> None:
    runtime = make_runtime(make_settings(tmp_path, DATABASE_URL=database_url))
    server = ServiceServer(runtime, with_worker=False)
    try:
        with server.running(), httpx.Client(base_url=server.url) as http:
            response = http.get("/readyz")
            assert response.status_code == 503
            body = response.json()
            assert (body["database"], body["queue"]) == ("ok", "ok")
            assert body["worker"] == "no worker has ever reported"
            assert http.get("/healthz").status_code == 200
    finally:
        runtime.close()


def test_the_sqlite_queue_commits_without_a_disk_flush_and_keeps_what_it_committed(
    tmp_path: Path,
) -> None:
    """The embedded queue holds only job ids whose rows are the truth: it runs WAL with
    `synchronous=NORMAL` (no flush per enqueue and dequeue, which serialized every thread
    behind the disk), and a job committed there is still there for the next process."""
    url = f"sqlite:///{tmp_path / 'queue.db'}"
    jobs = Jobs(url, name="flush")
    jobs.register("test.noop", lambda *args: None)
    jobs.enqueue("test.noop", 1)
    storage = jobs.huey.storage
    assert storage.conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert storage.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    storage.close()
    again = Jobs(url, name="flush")
    again.register("test.noop", lambda *args: None)
    assert [task.args for task in again.huey.pending()] == [(1,)]
    again.huey.storage.close()


_LEAN_QUEUE = """
import json, sys
from whop_autocancel.jobs import Jobs
drivers = ("redis", "psycopg")
before = [name for name in drivers if name in sys.modules]
jobs = Jobs(sys.argv[1], sys.argv[2])
done = []
jobs.register("test.echo", lambda value: done.append(value))
jobs.enqueue("test.echo", 7)
task = jobs.huey.dequeue()
jobs.huey.execute(task)
jobs.huey.flush()
print(json.dumps({"before": before, "after": [n for n in drivers if n in sys.modules],
                  "done": done}))
"""


def test_a_queue_loads_only_its_own_driver(queue_settings: dict[str, str]) -> None:
    """huey imports the Redis and PostgreSQL drivers whatever the queue (17 MB of a process's
    150 MB budget): a process loads only the one its QUEUE_URL needs, and every backend
    still runs a job."""
    import json
    import subprocess
    import sys

    url = queue_settings["QUEUE_URL"]
    done = subprocess.run(
        [sys.executable, "-c", _LEAN_QUEUE, url, queue_settings["QUEUE_NAME"]],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    needed = {"sqlite": [], "postgresql": ["psycopg"], "redis": ["redis"]}[url.split(":")[0]]
    assert report == {"before": [], "after": needed, "done": [7]}


def test_processes_starting_at_once_on_a_new_postgresql_queue_all_start() -> None:
    """The first start of a scaled-out deployment: every web and worker process creates the
    queue's tables if they are missing, all at the same moment. PostgreSQL's `CREATE TABLE IF
    NOT EXISTS` run at once by two sessions fails one of them (a duplicate key in its catalog),
    and that process stopped with a configuration error; none may."""
    backends.require("postgresql")
    admin = create_engine(make_url(backends.SERVERS["postgresql"]), isolation_level="AUTOCOMMIT")
    name = f"{backends.RUN_ID}_new_queue"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = (
        make_url(backends.require("postgresql"))
        .set(drivername="postgresql", database=name)
        .render_as_string(hide_password=False)
    )
    starting = 8
    barrier = threading.Barrier(starting)
    failures: list[BaseException] = []
    started: list[Jobs] = []

    def start() -> None:
        barrier.wait()
        try:
            started.append(Jobs(url))
        except BaseException as error:  # each start's failure is the finding
            failures.append(error)

    try:
        threads = [threading.Thread(target=start) for _ in range(starting)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert failures == []
        assert len(started) == starting
        jobs = started[0]
        jobs.huey.enqueue(jobs.huey.task(name="queues.probe")(lambda: None).s())
        assert started[-1].huey.pending_count() == 1  # one queue, every process sees it
    finally:
        for jobs in started:
            jobs.huey.storage.close()
        backends.drop_database("postgresql", url)
