"""A flash sale (issue 12): 10,000 purchases in 60 s against Whop's rate limit of 100 requests/s,
on SQLite (one `serve`) and on PostgreSQL + Redis (2 web and 3 worker processes): nothing lost,
failed or duplicated, cancellations drained at ≥ 0.95 of the limit, and every service process
at most 150 MB at its peak.

Each deployment is fresh, every party its own process: the simulator (50 ms of latency, a token
bucket of 100 requests/s with a capacity of 100, its webhook sender up to 16 deliveries at
once), an aiosmtpd sink, the service (WHOP_RATE_LIMIT=100, WHOP_RATE_BURST=20, otherwise
defaults) and, in front of the two web processes, bench/balancer.py (round robin per
connection: Whop has one webhook URL). The driver buys the message plan at the simulator at a
steady rate (an open loop), so the webhooks reach the service as Whop's would; the service
delivers (an email) and cancels every membership.

The counts come from the simulator (purchases, its call log: successful cancel calls per
membership; its webhook deliveries) and the service's database (orders, delivery emails,
cancellations, alerts); the drain rate from the simulator's call log; the peak memory from
/proc/PID/status (VmHWM) of every service process at the end; the cores the service used
(its processes' CPU, /proc/PID/stat, read every second) while the purchases came in and after
them, up to the last cancel: what bounds the drain where one process has one core. The run
ends when every cancellation is settled, when nothing moved for STALL seconds, or
BENCH_FLASH_DEADLINE after the last purchase. A membership not canceled then is unfinished
while the service still holds its work (or Whop still has webhooks queued for a purchase the
service does not know), else lost.

    PYTHONPATH=src .venv/bin/python bench/flash_sale.py [--smoke]   # needs PostgreSQL, Redis
    BENCH_FLASH_PURCHASES=10000, BENCH_FLASH_SECONDS=60, BENCH_FLASH_DEADLINE=1800 (s),
    BENCH_ONLY=sqlite|postgresql, BENCH_KEEP=1 keeps the process logs.
    Smoke: 200 purchases in 10 s, SQLite only.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import parties
import report
import sampling
import service_records
from parties import Child, Simulator, is_cancel, seconds, steady_rate

from support import backends
from support.harness import free_port, service_environment
from whop_autocancel.cancellation.models import Cancellation
from whop_autocancel.db.engine import Database
from whop_autocancel.settings import Settings
from whop_autocancel.webhooks.models import WebhookEvent

BENCH = Path(__file__).resolve().parent
RATE_LIMIT = 100.0  # the simulator's token bucket, requests/s, and the service's pacing
CAPACITY = 100
SERVICE_SETTINGS = {"WHOP_RATE_LIMIT": "100", "WHOP_RATE_BURST": "20"}
LATENCY = 0.05
SENDER_IN_FLIGHT = 16
TARGET = 0.95  # of the limit: the drain goal
RSS_LIMIT_MB = 150.0
STALL = 120.0  # s without progress (cancellations settled, webhooks stored) ends a run
POLL_SECONDS = 2.0
SAMPLE_SECONDS = 1.0  # the service's CPU, for its cores during the purchases and after
#: The service's default delay between delivery and cancellation (for the chart).
CANCEL_DELAY = float(Settings.model_fields["CANCEL_DELAY"].default)
SQLITE = "SQLite, 1 serve"
SQLITE_WORKERS = "SQLite, 1 serve --workers 1"
POSTGRES = "PostgreSQL + Redis, 2 web + 3 workers"
#: BENCH_ONLY's names (a comma-separated list of them), in the order the runs go.
KINDS = ("sqlite", "sqlite-workers", "postgresql")


def say(message: str) -> None:
    print(f"flash_sale: {message}", file=sys.stderr, flush=True)


@dataclass
class Knobs:
    purchases: int
    seconds: float
    deadline: float
    kinds: tuple[str, ...]
    smoke: bool


def knobs(smoke: bool) -> Knobs:
    if smoke:
        return Knobs(200, 10.0, 120.0, ("sqlite",), True)
    only = {kind.strip() for kind in os.environ.get("BENCH_ONLY", "").split(",") if kind.strip()}
    return Knobs(
        purchases=int(os.environ.get("BENCH_FLASH_PURCHASES", "10000")),
        seconds=float(os.environ.get("BENCH_FLASH_SECONDS", "60")),
        deadline=float(os.environ.get("BENCH_FLASH_DEADLINE", "1800")),
        kinds=tuple(kind for kind in KINDS if not only or kind in only),
        smoke=False,
    )


@dataclass
class Run:
    """What one deployment made of the sale."""

    deployment: str
    purchases: int
    seconds: float
    made_per_second: float | None = None  # the driver's clock: purchases answered a second
    payments_in_per_second: float | None = None  # payment webhooks 2xx'd a second, steady
    webhooks_in_per_second: float | None = None  # every webhook 2xx'd a second, steady
    feed_seconds: float | None = None  # first purchase → last payment webhook 2xx'd
    cancels_per_second: float | None = None  # successful cancel calls a second, steady
    drain_ratio: float | None = None  # cancels_per_second ÷ RATE_LIMIT
    drain_seconds: float | None = None  # first successful cancel → last
    total_seconds: float | None = None  # first purchase → last successful cancel
    ended: str = ""  # why the run stopped waiting
    # The simulator
    canceled_once: int = 0  # memberships with exactly one successful cancel call
    canceled_more_than_once: int = 0
    not_canceled: int = 0  # at the end of the run: unfinished + lost
    unfinished: int = 0  # not canceled, but the service holds it as work, or Whop still
    # has webhooks queued for a purchase the service does not know yet
    lost: int = 0  # not canceled and nobody is working on it
    cancel_calls: dict[int, int] = field(default_factory=dict)  # by status (not a Counter:
    # dataclasses.asdict rebuilds a Counter from its items)
    api_calls: int = 0  # every /api/v1 call from the first purchase on
    webhook_attempts: int = 0
    webhook_failed_attempts: int = 0  # non-2xx or no answer (timeouts)
    webhooks_dropped: int = 0  # 4 attempts failed: only the sweep can find those
    webhooks_pending: int = 0  # still queued at the simulator at the end
    # The service
    counts: dict[str, Any] = field(default_factory=dict)
    rss_mb: dict[str, float | None] = field(default_factory=dict)  # peak (VmHWM), per process
    cpu_seconds: dict[str, float | None] = field(default_factory=dict)  # per process, the run
    # The same by thread, each service process's threads grouped by their Python name (pool
    # numbers dropped: `Worker`, `cancel-db`): {process: {thread: CPU seconds}}; empty where
    # py-spy could not name them.
    thread_cpu: dict[str, dict[str, float]] = field(default_factory=dict)
    # What the stuck-work sweep put on the job queue again (work queued longer than
    # STUCK_GRACE), summed over its log lines in every service process.
    requeued: dict[str, int] = field(default_factory=dict)
    progress: list[tuple[float, int, int]] = field(default_factory=list)  # (s, events, settled)
    # Second by second since the first purchase: (s, payment webhooks 2xx'd, memberships
    # canceled) so far, per the simulator.
    timeline: list[tuple[int, int, int]] = field(default_factory=list)
    # The service processes' CPU (user + system, all together) every SAMPLE_SECONDS: (time.time(),
    # seconds so far); read for the cores they used while purchases came in and after.
    cpu_samples: list[tuple[float, float]] = field(default_factory=list)
    last_purchase_at: float | None = None  # the driver's clock: the last purchase answered
    last_cancel_at: float | None = None  # the simulator's: the last successful cancel

    @property
    def duplicated(self) -> int:
        counts = self.counts
        return (
            max(0, counts.get("orders_paid", 0) - self.purchases)
            + counts.get("buyers_with_more_than_one_delivery", 0)
            + self.canceled_more_than_once
        )

    @property
    def failed(self) -> int:
        counts = self.counts
        return int(counts.get("cancellations", {}).get("failed", 0)) + int(
            counts.get("delivery_emails_failed", 0)
        )

    @property
    def service_cpu_ms_per_purchase(self) -> float | None:
        """The CPU the service's processes used during the run (web, workers, serve's
        children; not the simulator or the balancer), per purchase."""
        used = [
            value
            for name, value in self.cpu_seconds.items()
            if name not in ("simulator", "balancer")
        ]
        if not used or None in used or not self.purchases:
            return None
        return sum(v for v in used if v is not None) * 1000 / self.purchases

    @property
    def service_cores(self) -> tuple[float | None, float | None]:
        """Cores the service's processes used (CPU seconds a second, all together) while the
        purchases came in (up to the last one answered) and after (up to the last cancel)."""
        if self.last_purchase_at is None:
            return None, None
        split = self.last_purchase_at
        end = self.last_cancel_at if self.last_cancel_at is not None else math.inf
        during = [sample for sample in self.cpu_samples if sample[0] <= split]
        after = [sample for sample in self.cpu_samples if split <= sample[0] <= end]
        return _cores(during), _cores(after)

    def rss(self, prefix: str) -> list[float]:
        return [v for k, v in self.rss_mb.items() if k.startswith(prefix) and v is not None]


def _cores(samples: list[tuple[float, float]]) -> float | None:
    """CPU seconds a second between the first and the last of (time, CPU seconds) samples."""
    if len(samples) < 2 or samples[-1][0] <= samples[0][0]:
        return None
    (start, before), (end, after) = samples[0], samples[-1]
    return (after - before) / (end - start)


@contextmanager
def cpu_sampler(pids: dict[str, int], samples: list[tuple[float, float]]) -> Iterator[None]:
    """Append (time.time(), the processes' CPU seconds together) every SAMPLE_SECONDS while
    the block runs, and once more at its end (a process gone counts with its last reading)."""
    stop = threading.Event()
    last: dict[int, float] = {}

    def sample() -> None:
        for pid in pids.values():
            used = parties.cpu_seconds(pid)
            if used is not None:
                last[pid] = used
        samples.append((time.time(), sum(last.values())))

    def loop() -> None:
        while not stop.wait(SAMPLE_SECONDS):
            sample()

    sample()
    thread = threading.Thread(target=loop, name="cpu-sampler", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        sample()


# ----- deployments --------------------------------------------------------------------------


@dataclass
class Deployment:
    """The service's processes (by name: web-N, worker-N, serve) and its webhook URL."""

    url: str
    database_url: str
    processes: dict[str, Child]
    helpers: dict[str, Child] = field(default_factory=dict)  # the balancer
    # Processes a service process started itself (`serve --workers`' children), by pid: read
    # like the others (peak RSS, CPU), watched by their parent.
    children: dict[str, int] = field(default_factory=dict)


def _env(folder: Path, sim: Simulator, smtp_url: str, **backend: str) -> dict[str, str]:
    return service_environment(
        folder, WHOP_API_URL=sim.api_url, SMTP_URL=smtp_url, **SERVICE_SETTINGS, **backend
    )


def sqlite_deployment(
    stack: ExitStack, folder: Path, sim: Simulator, smtp: str, workers: int = 0
) -> Deployment:
    """One `serve` on SQLite; with `workers`, `serve --workers N` (its worker children)."""
    env = _env(folder, sim, smtp)
    port = free_port()
    args = ["serve", "--port", str(port)] + (["--workers", str(workers)] if workers else [])
    serve = parties.service(stack, folder, "serve", args, env)
    url = f"http://127.0.0.1:{port}"
    parties.wait_until(lambda: parties.healthy(url), 60, "serve", serve)
    children = parties.serve_workers(serve, workers)
    return Deployment(url, env["DATABASE_URL"], {"serve": serve}, children=children)


def sqlite_workers_deployment(
    stack: ExitStack, folder: Path, sim: Simulator, smtp: str
) -> Deployment:
    return sqlite_deployment(stack, folder, sim, smtp, workers=1)


@contextmanager
def postgres_backend() -> Iterator[dict[str, str]]:
    """A fresh, migrated PostgreSQL database and a Redis queue of its own; dropped after."""
    url = backends.create_database("postgresql")
    queue_url = backends.require("redis")
    name = f"{backends.RUN_ID}-flash-{uuid.uuid4().hex[:8]}"
    try:
        yield {"DATABASE_URL": url, "QUEUE_URL": queue_url, "QUEUE_NAME": name}
    finally:
        backends.drop_database("postgresql", url)
        from whop_autocancel.jobs import Jobs

        Jobs(queue_url, name).huey.storage.flush_all()


def postgres_deployment(
    stack: ExitStack, folder: Path, sim: Simulator, smtp: str, backend: dict[str, str]
) -> Deployment:
    env = _env(folder, sim, smtp, **backend)
    processes: dict[str, Child] = {}
    ports = {"web-1": free_port(), "web-2": free_port()}
    for name, port in ports.items():
        args = ["serve", "--no-worker", "--port", str(port)]
        processes[name] = parties.service(stack, folder, name, args, env)
    for number in range(1, 4):
        processes[f"worker-{number}"] = parties.service(
            stack, folder, f"worker-{number}", ["worker"], env
        )
    for name, port in ports.items():
        url = f"http://127.0.0.1:{port}"
        parties.wait_until(lambda url=url: parties.healthy(url), 60, name, processes[name])
    port = free_port()
    args = [sys.executable, str(BENCH / "balancer.py"), "--port", str(port)]
    for backend_port in ports.values():
        args += ["--backend", str(backend_port)]
    balancer = stack.enter_context(
        parties.running(Child(args, folder / "balancer.log", env=parties.environment(), cwd=folder))
    )
    parties.wait_until(lambda: parties.accepts(port), 30, "the balancer", balancer)
    return Deployment(
        f"http://127.0.0.1:{port}", env["DATABASE_URL"], processes, {"balancer": balancer}
    )


# ----- one run ------------------------------------------------------------------------------


def _progress(database_url: str) -> tuple[int, int]:
    """(webhook events stored, cancellations settled) in the service's database."""
    database = Database(database_url)
    try:
        with database.transaction() as session:
            events = session.scalar(select(func.count()).select_from(WebhookEvent)) or 0
            settled = (
                session.scalar(
                    select(func.count())
                    .select_from(Cancellation)
                    .where(Cancellation.status.in_(service_records.FINAL))
                )
                or 0
            )
    finally:
        database.dispose()
    return int(events), int(settled)


def run_sale(
    folder: Path,
    deployment_name: str,
    settings: Knobs,
    deploy: Callable[[ExitStack, Path, Simulator, str], Deployment],
) -> Run:
    folder.mkdir(parents=True)
    result = Run(deployment_name, settings.purchases, settings.seconds)
    with ExitStack() as stack:
        sim = Simulator(stack, folder, "simulator")
        sim.control("rate_limit", {"capacity": CAPACITY, "refill_per_second": RATE_LIMIT})
        sim.control("latency", {"seconds": LATENCY})
        sim.control("webhooks/concurrency", {"in_flight": SENDER_IN_FLIGHT})
        deployment = deploy(stack, folder, sim, parties.smtp_sink(stack, folder))
        after_seq = parties.after_start_up_sweep(sim, LATENCY)
        sim.control("config", {"webhook_url": f"{deployment.url}/webhooks/whop"})
        # The service's processes (serve's worker children too), and every process watched.
        service = {
            name: child.pid for name, child in deployment.processes.items()
        } | deployment.children
        others = {**deployment.helpers, "simulator": sim.child}
        pids = service | {name: child.pid for name, child in others.items()}
        cpu_before = {name: parties.cpu_seconds(pid) for name, pid in pids.items()}
        threads_before = {name: parties.thread_cpu(pid) for name, pid in service.items()}
        say(f"{deployment_name}: {settings.purchases} purchases in {settings.seconds:g} s")
        with cpu_sampler(service, result.cpu_samples):
            made = parties.purchase_at_rate(
                sim.url, settings.purchases, settings.purchases / settings.seconds
            )
            started = made[0].asked_at
            result.made_per_second = steady_rate([purchase.answered_at for purchase in made])
            result.last_purchase_at = max(purchase.answered_at for purchase in made)
            # (Named once the sale has started every thread: pools start theirs when used.)
            names = {name: sampling.thread_names(pid) for name, pid in service.items()}
            result.ended = _wait(deployment, settings, result, started)
        for name, pid in service.items():
            result.thread_cpu[name] = _by_thread(
                threads_before[name], parties.thread_cpu(pid), names[name]
            )
        for name, pid in service.items():
            result.rss_mb[name] = parties.peak_rss_mb(pid)
        for name, pid in pids.items():
            now, before = parties.cpu_seconds(pid), cpu_before[name]
            used = now - before if now is not None and before is not None else None
            result.cpu_seconds[name] = used
        calls = [call for call in sim.calls() if call["seq"] > after_seq]
        webhooks = sim.webhooks()
        result.counts = asdict(service_records.counts(deployment.database_url))
        open_work = service_records.open_work(deployment.database_url)
        known = set(service_records.steps_by_membership(deployment.database_url))
    for child in deployment.processes.values():
        for kind, number in requeued(child.log).items():
            result.requeued[kind] = result.requeued.get(kind, 0) + number
    _from_simulator(result, made, calls, webhooks, started)
    _classify(result, made, calls, open_work, known, webhooks["pending"])
    return result


def _by_thread(
    before: dict[int, float], after: dict[int, float], names: dict[int, str]
) -> dict[str, float]:
    """CPU seconds each named group of threads used between two readings (a thread started
    meanwhile from 0; one that ended meanwhile is not counted), largest first. Empty when no
    thread has a name (py-spy missing, or not allowed to read the process)."""
    if not names:
        return {}
    used: dict[str, float] = {}
    for tid, seconds_now in after.items():
        group = names.get(tid, "unnamed")
        used[group] = used.get(group, 0.0) + seconds_now - before.get(tid, 0.0)
    return dict(sorted(used.items(), key=lambda item: -item[1]))


def _classify(
    result: Run,
    made: list[parties.Purchase],
    calls: list[dict[str, Any]],
    open_work: set[str],
    known: set[str],
    queued_webhooks: int,
) -> None:
    """Split the memberships not canceled into unfinished (the service holds the work, or
    the simulator still has webhooks queued for one the service does not know) and lost."""
    canceled = {
        call["membership_id"]
        for call in calls
        if is_cancel(call) and call["status"] == 200 and not call["replayed"]
    }
    for purchase in made:
        membership = purchase.membership_id
        if membership in canceled:
            continue
        waiting = membership in open_work or (membership not in known and queued_webhooks > 0)
        result.unfinished += waiting
        result.lost += not waiting


def requeued(log: Path) -> dict[str, int]:
    """What the stuck-work sweep put on the queue again, by kind, per one process's log."""
    found: dict[str, int] = {}
    with log.open(errors="replace") as lines:
        for line in lines:
            if '"stuck_work_requeued"' not in line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            for kind, number in record.items():
                if isinstance(number, int) and not isinstance(number, bool):
                    found[kind] = found.get(kind, 0) + number
    return found


def _wait(deployment: Deployment, settings: Knobs, result: Run, started: float) -> str:
    """Until every cancellation is settled, nothing moves for STALL s, or the deadline."""
    deadline = time.monotonic() + settings.deadline
    last, moved, told = (-1, -1), time.monotonic(), time.monotonic()
    while True:
        for name, child in deployment.processes.items():
            child.check(name)
        now = _progress(deployment.database_url)
        result.progress.append((round(time.time() - started, 1), *now))
        if now[1] >= settings.purchases:
            return "every cancellation settled"
        if now != last:
            last, moved = now, time.monotonic()
        elif time.monotonic() - moved > STALL:
            return f"nothing moved for {STALL:g} s"
        if time.monotonic() > deadline:
            return f"deadline ({settings.deadline:g} s after the last purchase)"
        if time.monotonic() - told > 30:
            told = time.monotonic()
            say(f"{time.time() - started:.0f} s: {now[0]} webhooks stored, {now[1]} settled")
        time.sleep(POLL_SECONDS)


def _from_simulator(
    result: Run,
    made: list[parties.Purchase],
    calls: list[dict[str, Any]],
    webhooks: dict[str, Any],
    started: float,
) -> None:
    result.api_calls = len(calls)
    cancels = [call for call in calls if is_cancel(call)]
    result.cancel_calls = dict(Counter(call["status"] for call in cancels))
    succeeded = [call for call in cancels if call["status"] == 200 and not call["replayed"]]
    per_membership = Counter(call["membership_id"] for call in succeeded)
    for purchase in made:
        times = per_membership[purchase.membership_id]
        result.canceled_once += times == 1
        result.canceled_more_than_once += times > 1
        result.not_canceled += times == 0
    done = [seconds(call["at"]) for call in succeeded]
    result.cancels_per_second = steady_rate(done)
    if result.cancels_per_second is not None:
        result.drain_ratio = result.cancels_per_second / RATE_LIMIT
    if done:
        result.drain_seconds = max(done) - min(done)
        result.total_seconds = max(done) - started
        result.last_cancel_at = max(done)
    deliveries = webhooks["deliveries"]
    result.webhook_attempts = len(deliveries)
    result.webhooks_pending = webhooks["pending"]
    accepted: dict[str, float] = {}
    failed_by_id: Counter[str] = Counter()
    for delivery in deliveries:
        status = delivery["status"]
        if status is not None and 200 <= status < 300:
            moment = seconds(delivery["answered_at"])
            accepted[delivery["webhook_id"]] = min(
                moment, accepted.get(delivery["webhook_id"], moment)
            )
        else:
            result.webhook_failed_attempts += 1
            failed_by_id[delivery["webhook_id"]] += 1
    result.webhooks_dropped = sum(
        1
        for webhook_id, failures in failed_by_id.items()
        if failures >= 4 and webhook_id not in accepted
    )
    payments = {purchase.payment_webhook_id for purchase in made}
    paid = [moment for webhook_id, moment in accepted.items() if webhook_id in payments]
    result.payments_in_per_second = steady_rate(paid)
    result.webhooks_in_per_second = steady_rate(list(accepted.values()))
    if paid:
        result.feed_seconds = max(paid) - started
    paid.sort()
    done.sort()
    end = max([*paid, *done, started]) - started
    result.timeline = [
        (
            second,
            bisect.bisect_right(paid, started + second),
            bisect.bisect_right(done, started + second),
        )
        for second in range(math.ceil(end) + 1)
    ]


# ----- the table ----------------------------------------------------------------------------


def _number(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _mbs(values: list[float]) -> str:
    return "/".join(f"{value:.0f}" for value in values) if values else "n/a"


COLUMNS = [
    "deployment",
    "purchases",
    "made/s",
    "payments in/s",
    "cancels/s",
    "÷ limit",
    "drain (s)",
    "lost",
    "failed",
    "duplicated",
    "service CPU/purchase (ms)",
    "peak RSS web (MB)",
    "peak RSS worker (MB)",
]


def _row(run: Run) -> list[str]:
    if run.deployment == SQLITE:
        web, worker = f"{_mbs(run.rss('serve'))} (web + worker)", "(in serve)"
    elif run.deployment == SQLITE_WORKERS:
        serve = run.rss_mb.get("serve")
        web = f"{_mbs([serve] if serve is not None else [])} (web + worker)"
        worker = f"{_mbs(run.rss('serve-worker'))} (serve's child)"
    else:
        web, worker = _mbs(run.rss("web")), _mbs(run.rss("worker"))
    return [
        run.deployment,
        str(run.purchases),
        _number(run.made_per_second),
        _number(run.payments_in_per_second),
        _number(run.cancels_per_second),
        _number(run.drain_ratio, 2),
        _number(run.drain_seconds) + (" (cut)" if run.unfinished else ""),
        f"{run.lost}" + (f" (+{run.unfinished} unfinished)" if run.unfinished else ""),
        str(run.failed),
        str(run.duplicated),
        _number(run.service_cpu_ms_per_purchase),
        web,
        worker,
    ]


def _verdict(run: Run) -> str:
    misses = []
    if run.lost:
        misses.append(f"{run.lost} lost")
    if run.unfinished:
        misses.append(f"{run.unfinished} unfinished at the end")
    if run.failed:
        misses.append(f"{run.failed} failed")
    if run.duplicated:
        misses.append(f"{run.duplicated} duplicated")
    if run.drain_ratio is None or run.drain_ratio < TARGET:
        misses.append(f"drained at {_number(run.drain_ratio, 2)} of the limit")
    over = [f"{name} {mb:.0f} MB" for name, mb in run.rss_mb.items() if mb and mb > RSS_LIMIT_MB]
    if over:
        misses.append("over 150 MB: " + ", ".join(over))
    return "met" if not misses else "NOT met (" + "; ".join(misses) + ")"


def _run_note(run: Run) -> str:
    counts = run.counts
    cancellations = dict(sorted(counts.get("cancellations", {}).items()))
    alerts = dict(sorted(counts.get("alerts", {}).items())) or "none"
    requeued = {
        kind: number for kind, number in sorted(run.requeued.items()) if number
    } or "nothing"
    cpu = ", ".join(
        f"{name} {value:.0f}" for name, value in run.cpu_seconds.items() if value is not None
    )
    feed = _number(run.feed_seconds)
    during, after = run.service_cores
    asked = run.purchases / run.seconds
    offered = (
        f"The driver made {_number(run.made_per_second)} purchases/s of the {asked:.0f} asked: "
        "the machine could not offer the sale at its rate. "
        if run.made_per_second is not None and run.made_per_second < 0.9 * asked
        else ""
    )
    return (
        f"{run.deployment}: {run.ended}. Goal {_verdict(run)}. {offered}"
        f"Simulator: {run.purchases} purchases, {run.canceled_once} memberships canceled by "
        f"exactly one successful cancel call, {run.canceled_more_than_once} by more, "
        f"{run.not_canceled} not canceled ({run.unfinished} unfinished, {run.lost} lost); "
        "cancel calls by status "
        f"{dict(sorted(run.cancel_calls.items()))}, {run.api_calls} API calls in all; "
        f"webhooks: {run.webhook_attempts} attempts, {run.webhook_failed_attempts} failed "
        f"(non-2xx or no answer in 5 s), {run.webhooks_dropped} dropped after 4, "
        f"{run.webhooks_pending} still queued; all webhooks 2xx'd at "
        f"{_number(run.webhooks_in_per_second)}/s, the last payment webhook {feed} s after "
        f"the first purchase; last cancel {_number(run.total_seconds)} s after it. "
        f"Service: {counts.get('orders', 0)} orders, {counts.get('orders_paid', 0)} paid, "
        f"{counts.get('delivery_emails_sent', 0)} delivery emails sent "
        f"({counts.get('delivery_emails_failed', 0)} failed, "
        f"{counts.get('buyers_with_more_than_one_delivery', 0)} buyers with more than one), "
        f"{counts.get('unsent_emails', 0)} emails of any kind unsent; cancellations "
        f"{cancellations}; alerts {alerts}; the stuck-work sweep queued again "
        f"{requeued} (work that waited longer than STUCK_GRACE, 30 s; events are stored "
        "webhooks not applied yet, up to 500 a sweep, handed to one apply job). CPU s during "
        "the run: "
        f"{cpu}. Cores the service used: {_number(during, 2)} while the purchases came in, "
        f"{_number(after, 2)} after them (to the last cancel).{_threads_note(run)}"
    )


def _threads_note(run: Run) -> str:
    """The service's CPU a purchase by thread, for each process whose threads were named."""
    parts = [
        f"{process}: "
        + ", ".join(
            f"{group} {seconds * 1000 / run.purchases:.2f}"
            for group, seconds in groups.items()
            if seconds * 1000 / run.purchases >= 0.01
        )
        for process, groups in run.thread_cpu.items()
        if groups and run.purchases
    ]
    if not parts:
        return ""
    return " Service CPU ms a purchase by thread (Python's thread names): " + "; ".join(parts) + "."


NOTES = [
    "made/s: purchases the driver made a second (its clock; an open loop over 8 connections "
    "to the simulator's control API). payments in/s: payment.succeeded webhooks the service "
    "answered 2xx a second (the simulator's answered_at). cancels/s: successful cancel calls "
    "a second (the simulator's call log; a 200 cancel is the membership's canceled_at). All "
    "three are the steady state of cancellations.py: between the 10th and the 90th "
    "percentile event, the events after the first up to the last ÷ the time between them.",
    f"÷ limit: cancels/s ÷ {RATE_LIMIT:g} (the simulator's bucket: capacity {CAPACITY}, "
    f"{RATE_LIMIT:g}/s; the service paces at WHOP_RATE_LIMIT={RATE_LIMIT:g}, burst 20); the "
    f"goal is ≥ {TARGET}. Cancellations can only drain as fast as purchases reach the service: "
    "while payments in/s is below the limit, the feed, not the limit, bounds cancels/s. "
    "drain: first successful cancel → last.",
    "lost: memberships no successful cancel call reached by the end of the run (the "
    "simulator's call log) that nobody is working on; unfinished (next to it): those the "
    "service still holds as work (no cancellation yet, or one scheduled or running), or, "
    "while the simulator still has webhooks queued, whose purchase the service does not know "
    "yet. With any unfinished, the drain is cut short. failed: cancellations `failed` plus "
    "delivery emails `failed` (the service's database). duplicated: paid orders beyond one "
    "per purchase, buyers with more than one delivery email, memberships with more than one "
    "successful cancel call.",
    "peak RSS: VmHWM of /proc/PID/status of each service process, read at the end (the peak "
    f"since it started); the goal is ≤ {RSS_LIMIT_MB:g} MB each. In the SQLite deployments one "
    "`serve` is web and worker; `serve --workers 1` also runs one `worker` process as its "
    "child (found in /proc once serve answers, read like the others). service CPU/purchase: "
    "user + system CPU of every service process from the first purchase to the end of the "
    "run (/proc/PID/stat) ÷ purchases; the simulator and the balancer are not counted.",
    f"Parties, each its own process: the simulator ({LATENCY * 1000:.0f} ms per API answer; "
    f"its webhook sender {SENDER_IN_FLIGHT} deliveries at once, one purchase's events one at a "
    "time and in order: one at a time it fed `serve` 59 webhooks/s where 16 fed it 173/s), an "
    "aiosmtpd sink, the service, and for the two web processes bench/balancer.py (round robin "
    "per connection). The message plan: every purchase is an order, an email, a cancel.",
]


def section(*, smoke: bool = False) -> report.Table:
    """The flash-sale table (smoke: 200 purchases in 10 s, SQLite only)."""
    settings = knobs(smoke)
    folder = Path(tempfile.mkdtemp(prefix="wa-bench-flash-"))
    runs: list[Run] = []
    notes = list(NOTES)
    try:
        if "sqlite" in settings.kinds:
            runs.append(run_sale(folder / "sqlite", SQLITE, settings, sqlite_deployment))
        if "sqlite-workers" in settings.kinds:
            runs.append(
                run_sale(
                    folder / "sqlite-workers", SQLITE_WORKERS, settings, sqlite_workers_deployment
                )
            )
        if "postgresql" in settings.kinds:
            reason = _unavailable("postgresql", "redis")
            if reason:
                notes.append(f"{POSTGRES}: skipped, {reason}")
            else:
                with postgres_backend() as backend:

                    def deploy(
                        stack: ExitStack, where: Path, sim: Simulator, smtp: str
                    ) -> Deployment:
                        return postgres_deployment(stack, where, sim, smtp, backend)

                    runs.append(run_sale(folder / "postgresql", POSTGRES, settings, deploy))
    finally:
        if os.environ.get("BENCH_KEEP") == "1":
            print(f"process logs kept in {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    notes += [_run_note(run_) for run_ in runs]
    load = os.getloadavg()
    notes.append(
        f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on "
        f"{os.cpu_count()} cores (other work on the machine moves every figure)."
    )
    if smoke:
        notes.append("smoke run: 200 purchases in 10 s on SQLite, far below the limit.")
    records = []
    for run_ in runs:
        record = asdict(run_)
        record.update(
            duplicated=run_.duplicated,
            failed=run_.failed,
            service_cpu_ms_per_purchase=run_.service_cpu_ms_per_purchase,
            service_cores=run_.service_cores,
            verdict=_verdict(run_),
        )
        records.append(record)
    return report.Table(
        title=(
            f"Flash sale: {settings.purchases} purchases in {settings.seconds:g} s, Whop "
            f"limited to {RATE_LIMIT:g} requests/s"
        ),
        columns=COLUMNS,
        rows=[_row(run_) for run_ in runs],
        notes=notes,
        figures={
            "section": "flash_sale",
            "smoke": smoke,
            "purchases": settings.purchases,
            "seconds": settings.seconds,
            "rate_limit_per_second": RATE_LIMIT,
            "cancel_delay_seconds": CANCEL_DELAY,
            "target_ratio": TARGET,
            "rss_limit_mb": RSS_LIMIT_MB,
            "runs": records,
        },
    )


def _unavailable(*kinds: str) -> str | None:
    """Why a server the PostgreSQL deployment needs does not answer (None: they all do)."""
    for kind in kinds:
        try:
            backends.require(kind)
        except (pytest.skip.Exception, pytest.fail.Exception) as error:
            return str(error)
    return None


def main() -> int:
    print(section(smoke="--smoke" in sys.argv[1:]).render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
