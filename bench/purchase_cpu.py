"""What one purchase costs the service's jobs in CPU, measured one job at a time in one thread.

The end-to-end and flash-sale sections measure the whole service under load, where the GIL,
the other parties and the machine's other work move every figure by 10-20 % from run to run:
too coarse to see a change of a few per cent. Here the same jobs run one after another in this
thread, as a worker runs them, and each is timed with the thread's own CPU clock
(`time.thread_time`), which counts neither the other threads of this process (the web thread
storing the webhooks, the simulator's, the SMTP sink's) nor the machine's other work.

One round: `BENCH_CPU_PURCHASES` purchases (the message plan) at the Whop simulator, whose
webhooks the service's web process stores over real HTTP; then every queued job runs (apply,
deliver, send the emails to an SMTP sink on loopback); the clock moves past CANCEL_DELAY and the
cancellations run as a worker's dispatcher runs them (`Dispatcher`: their call to the simulator
over real HTTP with the asynchronous client), then the apply of the webhooks Whop sends back. Every
membership must end canceled at the simulator, or the round fails. `BENCH_CPU_ROUNDS` rounds,
after a warm-up round; the table gives the median of the rounds and their spread.

Read as ratios: next to each job, how many plain durable SQLite commits (one 10-column insert
and a commit, WAL, `synchronous=NORMAL` like our non-durable commits, the standard library's
driver) cost the same CPU in the same run.

And as work, which no machine moves: one more round, not timed, counts the function calls
(Python's and C's, the profiler hook `sys.setprofile`) each job makes a purchase. Two trees
compared by their calls need no second run side by side: a change of a few per cent that the
CPU clock cannot tell from the machine's minute shows here the same on every run.

    PYTHONPATH=src .venv/bin/python bench/purchase_cpu.py [--smoke] [--json FILE]
    BENCH_CPU_DATABASE=postgresql: the service's database on PostgreSQL (TEST_POSTGRES_URL's
    server, a database of the run's own); BENCH_CPU_PURCHASES, BENCH_CPU_ROUNDS.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import report

from support import backends
from support.calls import python_calls
from support.harness import API_KEY, MESSAGE_PLAN, SECRET, drain, wait_for
from support.shop import Shop, open_shop
from whop_autocancel.cancellation.models import CANCEL_TASK
from whop_autocancel.cancellation.service import inline
from whop_autocancel.clock import FrozenClock
from whop_autocancel.logs import configure_logging
from whop_autocancel.runtime import Runtime
from whop_autocancel.simulator import SimulatorServer

PURCHASES = int(os.environ.get("BENCH_CPU_PURCHASES", "200"))
ROUNDS = int(os.environ.get("BENCH_CPU_ROUNDS", "3"))
# The service's database: a SQLite file of the run's own, or a PostgreSQL database created for
# the run and dropped after it (the queue stays a SQLite file: its dequeue is not timed).
DATABASE = os.environ.get("BENCH_CPU_DATABASE", "sqlite")
SMOKE = (10, 1)  # purchases, rounds
FLOOR_COMMITS = 2000
CANCEL_DELAY = 5.0


class Dispatcher:
    """What a worker's cancellation dispatcher does with a `cancellation.run` job: one attempt
    on its event loop with its asynchronous Whop client (kept open), the database work done
    in this thread (the dispatcher hands it to a small pool), so it is timed like the rest."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.loop = asyncio.new_event_loop()
        self.client = runtime.async_whop()

    def attempt(self, cancellation_id: int) -> None:
        work = self.runtime.cancellations.attempt(cancellation_id, self.client, inline)
        self.loop.run_until_complete(work)

    def close(self) -> None:
        self.loop.run_until_complete(self.client.aclose())
        self.loop.close()


def run_jobs(
    runtime: Runtime,
    dispatcher: Dispatcher,
    cost: Counter[str],
    runs: Counter[str],
    *,
    due: bool,
    count: bool = False,
) -> None:
    """Run what the queue holds (and, `due`, what its schedule holds) until it is empty, as the
    tests' `drain` does: huey's own `execute` (a cancellation: `Dispatcher.attempt`). Each
    job's cost: this thread's CPU seconds, or with `count` the calls it made (`python_calls`)."""
    huey = runtime.jobs.huey

    def timed(task: Any, timestamp: datetime | None) -> None:
        if not huey.ready_to_run(task, timestamp):
            huey.add_schedule(task)  # (what `execute` does with a task due later)
            return

        def job() -> None:
            if task.name == CANCEL_TASK:
                dispatcher.attempt(int(task.args[0]))
            else:
                huey.execute(task, timestamp=timestamp)

        if count:
            cost[task.name] += python_calls(job)
        else:
            started = time.thread_time()
            job()
            cost[task.name] += time.thread_time() - started
        runs[task.name] += 1

    drain(runtime, include_scheduled=due, execute=timed)


def one_round(
    shop: Shop, dispatcher: Dispatcher, purchases: int, tag: str, count: bool = False
) -> tuple[Counter[str], Counter[str]]:
    cost: Counter[str] = Counter()
    runs: Counter[str] = Counter()
    state = shop.simulator.state
    made = [
        state.create_purchase(MESSAGE_PLAN, email=f"buyer-{tag}-{n}@example.com")
        for n in range(purchases)
    ]
    wait_for(lambda: state.pending_webhooks() == 0, 120, "the simulator's webhooks")
    run_jobs(shop.runtime, dispatcher, cost, runs, due=False, count=count)
    shop.clock.advance(CANCEL_DELAY + 1)
    run_jobs(shop.runtime, dispatcher, cost, runs, due=True, count=count)  # the cancellations
    wait_for(lambda: state.pending_webhooks() == 0, 120, "the webhooks of the cancellations")
    run_jobs(shop.runtime, dispatcher, cost, runs, due=True, count=count)
    not_canceled = [
        p["membership_id"]
        for p in made
        if state.membership(p["membership_id"])["status"] != "canceled"
    ]
    if not_canceled:
        raise RuntimeError(f"{len(not_canceled)} memberships not canceled, e.g. {not_canceled[0]}")
    return cost, runs


def commit_floor(folder: Path) -> float:
    """Thread CPU seconds of one plain insert + commit (WAL, synchronous=NORMAL)."""
    connection = sqlite3.connect(folder / "floor.db", isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    columns = ", ".join(f"c{n} TEXT" for n in range(9))
    connection.execute(f"CREATE TABLE t (id INTEGER PRIMARY KEY, {columns})")
    insert = "INSERT INTO t VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    values = tuple(f"value-{n}" for n in range(9))
    started = time.thread_time()
    for _ in range(FLOOR_COMMITS):
        connection.execute("BEGIN IMMEDIATE")
        connection.execute(insert, values)
        connection.execute("COMMIT")
    spent = (time.thread_time() - started) / FLOOR_COMMITS
    connection.close()
    return spent


def log_like_serve() -> None:
    """Log as `serve` does (INFO, JSON lines), into /dev/null: formatting each line is part of
    a job's cost, printing them here is not."""
    configure_logging("INFO", "json", stream=open(os.devnull, "w"))  # noqa: SIM115 (for good)


@contextmanager
def service_database(kind: str) -> Iterator[dict[str, str]]:
    """The settings that put the service on `kind`'s database (none: SQLite, the default)."""
    if kind == "sqlite":
        yield {}
        return
    if kind != "postgresql":
        raise SystemExit(f"BENCH_CPU_DATABASE must be sqlite or postgresql, not {kind!r}")
    url = backends.create_database("postgresql", "_cpu")
    try:
        yield {"DATABASE_URL": url}
    finally:
        backends.drop_database("postgresql", url)


def measure(purchases: int, rounds: int, kind: str = "sqlite") -> dict[str, Any]:
    with service_database(kind) as database:
        figures = _measure(purchases, rounds, database)
    return {"database": kind, **figures}


def _measure(purchases: int, rounds: int, database: dict[str, str]) -> dict[str, Any]:
    log_like_serve()
    folder = Path(tempfile.mkdtemp(prefix="wa-bench-cpu-"))
    clock = FrozenClock(datetime.now(UTC).replace(microsecond=0))
    simulator = SimulatorServer(api_key=API_KEY, webhook_secret=SECRET, time_scale=0.01)
    simulator.start()
    simulator.state.create_plan(MESSAGE_PLAN)
    per_round: list[dict[str, float]] = []
    runs_per_round: list[dict[str, float]] = []
    calls: Counter[str] = Counter()
    try:
        shops = open_shop(folder, clock, simulator, **database)
        shop = next(shops)
        try:
            shop.smtp_up()
            dispatcher = Dispatcher(shop.runtime)
            try:
                one_round(shop, dispatcher, min(purchases, 20), "warm-up")
                for number in range(rounds):
                    cpu, runs = one_round(shop, dispatcher, purchases, f"r{number}")
                    per_round.append({job: s * 1000 / purchases for job, s in cpu.items()})
                    runs_per_round.append({job: n / purchases for job, n in runs.items()})
                calls, _ = one_round(shop, dispatcher, purchases, "counted", count=True)
            finally:
                dispatcher.close()
        finally:
            shops.close()
        floor = commit_floor(folder)
    finally:
        simulator.stop()
    jobs = sorted({job for found in per_round for job in found})
    figures: dict[str, Any] = {
        "purchases": purchases,
        "rounds": rounds,
        "commit_floor_ms": floor * 1000,
        "jobs": {},
    }
    for job in jobs:
        values = [found.get(job, 0.0) for found in per_round]
        figures["jobs"][job] = {
            "ms": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "runs": statistics.median(found.get(job, 0.0) for found in runs_per_round),
            "calls": calls[job] / purchases,
        }
    totals = [sum(found.values()) for found in per_round]
    figures["total_ms"] = {
        "ms": statistics.median(totals),
        "min": min(totals),
        "max": max(totals),
        "calls": sum(calls.values()) / purchases,
    }
    return figures


def table(figures: dict[str, Any], smoke: bool) -> report.Table:
    floor = figures["commit_floor_ms"]

    def row(name: str, found: dict[str, float], runs: str) -> list[str]:
        return [
            name,
            runs,
            f"{found['ms']:.2f}",
            f"{found['min']:.2f} to {found['max']:.2f}",
            f"{found['ms'] / floor:.0f}",
            f"{found['calls']:,.0f}",
        ]

    rows = [row(job, found, f"{found['runs']:.2f}") for job, found in figures["jobs"].items()] + [
        row("all jobs", figures["total_ms"], "")
    ]
    notes = [
        f"{figures['purchases']} purchases a round, {figures['rounds']} round(s) after a "
        "warm-up; ms: the median of the rounds (thread CPU of the jobs ÷ purchases), spread: "
        "the rounds' lowest to highest.",
        f"÷ commit: the job's CPU ÷ one plain SQLite insert + commit measured in the same run "
        f"({floor * 1000:.0f} µs here).",
        "calls/purchase: the function calls (Python's and C's) of the job a purchase, counted "
        "by the profiler hook in one more round, not timed: work, the same on any machine.",
        "cancellation.run: one attempt as a worker's dispatcher makes it (claim, the call to "
        "Whop with the asynchronous client, the answer recorded), here on an event loop in "
        "this thread. Not counted: the web process's work on each webhook (the ingest "
        "section measures it) and huey's dequeue.",
    ]
    if smoke:
        notes.append("smoke run: too few purchases for stable figures.")
    return report.Table(
        title="CPU a purchase costs the service's jobs (one thread, one job at a time, "
        f"{'PostgreSQL' if figures['database'] == 'postgresql' else 'SQLite'})",
        columns=["job", "runs/purchase", "ms/purchase", "spread", "÷ commit", "calls/purchase"],
        rows=rows,
        notes=notes,
        figures={"section": "purchase_cpu", "smoke": smoke, **figures},
    )


def section(*, smoke: bool = False) -> report.Table:
    purchases, rounds = SMOKE if smoke else (PURCHASES, ROUNDS)
    return table(measure(purchases, rounds, DATABASE), smoke)


def main() -> int:
    smoke = "--smoke" in sys.argv[1:]
    result = section(smoke=smoke)
    print(result.render())
    if "--json" in sys.argv[1:]:
        where = Path(sys.argv[sys.argv.index("--json") + 1])
        where.write_text(json.dumps(result.figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
