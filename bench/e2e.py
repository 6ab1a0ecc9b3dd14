"""End to end (issue 12): at 2 and at 50 purchases/s, the p99 from a purchase's payment webhook
accepted to its membership canceled at Whop is at most CANCEL_DELAY + 1 s, and nothing is lost.

Each row is a fresh deployment: the simulator (50 ms of latency, no rate limit, its webhook
sender up to 16 deliveries at once), an aiosmtpd sink and `whop-autocancel serve` (SQLite, its
in-process worker, default settings with CANCEL_DELAY 5 s, plus WHOP_RATE_LIMIT=100 and
WHOP_RATE_BURST=20), each in its own process. The driver buys the message plan at the
simulator at a steady rate (an open loop: 2/s for 30 s, 50/s for 10 s), so its webhooks reach
the service as Whop's would; the service delivers (an email) and cancels.

Per purchase, from the simulator's records: from the moment its sender got the service's 2xx
for the purchase's `payment.succeeded` (the delivery's `answered_at`) to the membership's
`canceled_at`. Lost: a purchase whose membership is not canceled DEADLINE seconds after the
last purchase plus CANCEL_DELAY.

    PYTHONPATH=src .venv/bin/python bench/e2e.py [--smoke]      # smoke: 2/s for 5 s
    BENCH_KEEP=1 keeps the process logs.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
import parties
import report
import sampling
import service_records
from parties import Simulator, percentile, seconds, smtp_sink, steady_rate

from support.harness import free_port, service_environment
from whop_autocancel.settings import Settings

#: The service's default delay between delivery and cancellation (a default, not set here).
CANCEL_DELAY = float(Settings.model_fields["CANCEL_DELAY"].default)
SLACK = 1.0  # the goal: p99 ≤ CANCEL_DELAY + SLACK
METRICS_TOKEN = secrets.token_urlsafe(16)  # a fresh one per run
SERVICE_SETTINGS = {
    "WHOP_RATE_LIMIT": "100",
    "WHOP_RATE_BURST": "20",
    "METRICS_TOKEN": METRICS_TOKEN,
}
LATENCY = 0.05  # of every Whop answer
SENDER_IN_FLIGHT = 16  # the simulator's webhook deliveries at once (see the notes)
#: (purchases a second, seconds of purchasing, worker processes, serve's children, serve's
#: in-process worker) for each row: 0 workers is `serve` with its in-process worker (the
#: default); N is `serve --no-worker` and N `worker` processes started beside it on the same
#: SQLite files (they take turns to write through its lock file); children M is `serve
#: --workers M` (M `worker` processes that serve starts itself), with `--no-worker` when the
#: last is False: one command for the deployment of the row before it.
ROWS = (
    (2.0, 30.0, 0, 0, True),
    (50.0, 10.0, 0, 0, True),
    (50.0, 10.0, 0, 1, True),
    (50.0, 10.0, 2, 0, True),
    (50.0, 10.0, 0, 2, False),
)
SMOKE_ROWS = ((2.0, 5.0, 0, 0, True), (2.0, 5.0, 1, 0, True))
DEADLINE = 60.0  # s after the last purchase (+ CANCEL_DELAY) for a membership to be canceled
POLL_SECONDS = 0.5


@dataclass
class Row:
    rate: float
    seconds: float
    workers: int = 0  # worker processes beside `serve --no-worker` (0: its in-process worker)
    children: int = 0  # `serve --workers N`: worker processes serve starts itself
    in_process: bool = True  # False: `serve --no-worker --workers N` (children only)
    purchases: int = 0
    made_per_second: float | None = None  # purchases the driver made a second (its clock)
    payments_in_per_second: float | None = None  # payment webhooks the service 2xx'd, steady
    accepted: int = 0  # purchases whose payment webhook got a 2xx
    canceled: int = 0  # memberships canceled at the simulator
    lost: int = 0  # not canceled by the deadline
    p50: float | None = None
    p99: float | None = None
    max: float | None = None
    # Where the time goes, from the service's database (p50, p99 in s): accepted → order
    # delivered; delivered → delivery email accepted by SMTP; delivered + CANCEL_DELAY → the
    # membership canceled at the simulator.
    stages: dict[str, dict[str, float | None]] = field(default_factory=dict)
    webhook_round_trip_p99: float | None = None  # the sender's POST → the service's answer
    latencies: list[float] = field(default_factory=list)  # s, per canceled purchase
    # Cores each party used from the first purchase to the end of the row (CPU s ÷ wall s).
    cores: dict[str, float | None] = field(default_factory=dict)
    # The service's CPU per purchase (ms): all of it, and each job's (its job metrics).
    cpu_ms_per_purchase: float | None = None
    job_cpu_ms_per_purchase: dict[str, float] = field(default_factory=dict)
    job_runs_per_purchase: dict[str, float] = field(default_factory=dict)

    @property
    def deployment(self) -> str:
        if self.children:
            web_only = "" if self.in_process else " --no-worker"
            return f"serve{web_only} --workers {self.children}"
        if not self.workers:
            return "serve"
        return f"serve --no-worker + {self.workers} worker{'s' if self.workers > 1 else ''}"

    @property
    def over_delay(self) -> float | None:
        return self.p99 - CANCEL_DELAY if self.p99 is not None else None

    @property
    def met(self) -> bool:
        return self.p99 is not None and self.p99 <= CANCEL_DELAY + SLACK and self.lost == 0


def job_metrics(url: str) -> tuple[dict[str, float], dict[str, float]]:
    """The service's job metrics: CPU seconds and runs, by job."""
    from prometheus_client.parser import text_string_to_metric_families

    answer = httpx.get(
        f"{url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=30
    )
    answer.raise_for_status()
    cpu: dict[str, float] = {}
    runs: dict[str, float] = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            if sample.name == "whop_autocancel_job_cpu_seconds_total":
                cpu[sample.labels["job"]] = sample.value
            elif sample.name == "whop_autocancel_job_runs_total":
                runs[sample.labels["job"]] = sample.value
    return cpu, runs


def _spread(values: list[float]) -> dict[str, float | None]:
    return {"p50": percentile(values, 0.5), "p99": percentile(values, 0.99)}


def _profile(pid: int, folder: Path, rate: float, duration: float) -> Any:
    """With BENCH_PROFILE=DIR: a py-spy recording of the service from the first purchase to
    CANCEL_DELAY + 5 s after the last (DIR/e2e-<rate>.txt)."""
    where = os.environ.get("BENCH_PROFILE")
    if not where:
        return None
    return sampling.record(pid, Path(where) / f"e2e-{rate:g}.txt", duration + CANCEL_DELAY + 5)


def run_row(
    folder: Path,
    rate: float,
    duration: float,
    workers: int = 0,
    children: int = 0,
    in_process: bool = True,
) -> Row:
    """One fresh deployment, `rate` purchases a second for `duration` seconds, measured."""
    folder.mkdir(parents=True)
    row = Row(
        rate=rate,
        seconds=duration,
        workers=workers,
        children=children,
        in_process=in_process,
        purchases=round(rate * duration),
    )
    with ExitStack() as stack:
        sim = Simulator(stack, folder, "simulator")
        sim.control("latency", {"seconds": LATENCY})
        sim.control("webhooks/concurrency", {"in_flight": SENDER_IN_FLIGHT})
        env = service_environment(
            folder, WHOP_API_URL=sim.api_url, SMTP_URL=smtp_sink(stack, folder), **SERVICE_SETTINGS
        )
        port = free_port()
        web_only = workers or not in_process
        serve = ["serve", "--port", str(port)] + (["--no-worker"] if web_only else [])
        serve += ["--workers", str(children)] if children else []
        service = parties.service(stack, folder, "service", serve, env)
        url = f"http://127.0.0.1:{port}"
        parties.wait_until(lambda: parties.healthy(url), 60, "the service", service)
        helpers = [
            parties.service(stack, folder, f"worker-{n}", ["worker"], env)
            for n in range(1, workers + 1)
        ]
        parties.after_start_up_sweep(sim, LATENCY)
        sim.control("config", {"webhook_url": f"{url}/webhooks/whop"})
        watched = {"service": service.pid, "simulator": sim.child.pid}
        watched.update({f"worker-{n}": child.pid for n, child in enumerate(helpers, 1)})
        watched.update(parties.serve_workers(service, children))
        cpu_before = {name: parties.cpu_seconds(pid) for name, pid in watched.items()}
        began = time.monotonic()
        spy = _profile(service.pid, folder, rate, duration)
        made = parties.purchase_at_rate(sim.url, row.purchases, rate)
        row.made_per_second = steady_rate([purchase.answered_at for purchase in made])
        wanted = {purchase.membership_id for purchase in made}
        deadline = time.monotonic() + CANCEL_DELAY + DEADLINE
        while not wanted <= sim.canceled() and time.monotonic() < deadline:
            service.check("the service")
            for child in helpers:
                child.check("a worker")
            time.sleep(POLL_SECONDS)
        wall = time.monotonic() - began
        if spy is not None:
            spy.wait()
        service_cpu: float | None = 0.0
        for name, pid in watched.items():
            now, before = parties.cpu_seconds(pid), cpu_before[name]
            used = now - before if now is not None and before is not None else None
            row.cores[name] = round(used / wall, 2) if used is not None else None
            if name != "simulator":  # the service: serve, and its worker processes
                service_cpu = None if service_cpu is None or used is None else service_cpu + used
        if service_cpu is not None:
            row.cpu_ms_per_purchase = round(service_cpu * 1000 / row.purchases, 1)
        # (The job metrics are the web process's: with worker processes beside it, its own
        # jobs only, or none; so they are left out then.)
        cpu, runs = job_metrics(url) if not workers and not children else ({}, {})
        row.job_cpu_ms_per_purchase = {
            job: round(seconds * 1000 / row.purchases, 2) for job, seconds in cpu.items()
        }
        row.job_runs_per_purchase = {
            job: round(count / row.purchases, 2) for job, count in runs.items()
        }
        deliveries = sim.webhooks()["deliveries"]
        views = {p.membership_id: sim.membership(p.membership_id) for p in made}
        steps = service_records.steps_by_membership(env["DATABASE_URL"])
    accepted: dict[str, float] = {}
    for delivery in deliveries:
        if delivery["status"] is not None and 200 <= delivery["status"] < 300:
            moment = seconds(delivery["answered_at"])
            accepted[delivery["webhook_id"]] = min(
                moment, accepted.get(delivery["webhook_id"], moment)
            )
    payments = {p.payment_webhook_id for p in made}
    row.payments_in_per_second = steady_rate(
        [moment for webhook_id, moment in accepted.items() if webhook_id in payments]
    )
    trips = [seconds(d["answered_at"]) - seconds(d["at"]) for d in deliveries if d["answered_at"]]
    row.webhook_round_trip_p99 = percentile(trips, 0.99)
    to_delivered, to_email, after_delay = [], [], []
    for purchase in made:
        view = views[purchase.membership_id]
        canceled = seconds(view["canceled_at"]) if view["status"] == "canceled" else None
        start = accepted.get(purchase.payment_webhook_id)
        row.accepted += start is not None
        row.canceled += canceled is not None
        if canceled is None:
            row.lost += 1
        elif start is not None:
            row.latencies.append(round(canceled - start, 3))
        step = steps.get(purchase.membership_id)
        if step is None or step.delivered_at is None or start is None:
            continue
        to_delivered.append(step.delivered_at - start)
        if step.email_sent_at is not None:
            to_email.append(step.email_sent_at - step.delivered_at)
        if canceled is not None:
            after_delay.append(canceled - (step.delivered_at + CANCEL_DELAY))
    row.p50 = percentile(row.latencies, 0.5)
    row.p99 = percentile(row.latencies, 0.99)
    row.max = max(row.latencies) if row.latencies else None
    row.stages = {
        "accepted → delivered": _spread(to_delivered),
        "delivered → email accepted": _spread(to_email),
        "delivered + CANCEL_DELAY → canceled": _spread(after_delay),
    }
    return row


# ----- the table ----------------------------------------------------------------------------


def _number(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:.0f}"


COLUMNS = [
    "deployment",
    "purchases/s",
    "purchases",
    "made/s",
    "payments in/s",
    "p50 (s)",
    "p99 (s)",
    "max (s)",
    "p99 - CANCEL_DELAY (s)",
    f"≤ CANCEL_DELAY + {SLACK:g} s",
    "lost",
]


def _row(row: Row) -> list[str]:
    return [
        row.deployment,
        f"{row.rate:g}",
        str(row.purchases),
        _number(row.made_per_second, 1),
        _number(row.payments_in_per_second, 1),
        _number(row.p50),
        _number(row.p99),
        _number(row.max),
        _number(row.over_delay),
        "yes" if row.met else "NO",
        str(row.lost),
    ]


NOTES = [
    "Per purchase: from the moment the simulator's webhook sender got the service's 2xx for "
    "the purchase's payment.succeeded (the delivery's answered_at) to the membership's "
    "canceled_at, both the simulator's records (ms). p50/p99 are nearest-rank percentiles "
    "over the purchases canceled.",
    f"The goal: p99 ≤ CANCEL_DELAY + {SLACK:g} s (CANCEL_DELAY is the service's default, "
    f"{CANCEL_DELAY:g} s) and 0 lost. lost: not canceled {DEADLINE:g} s + CANCEL_DELAY after "
    "the last purchase.",
    "made/s: the purchases the driver made a second (its own clock, steady state between the "
    "10th and 90th percentile answer), an open loop; payments in/s: payment.succeeded webhooks "
    "the service answered 2xx a second (the simulator's answered_at, the same steady state): "
    "below made/s, the service (or the sender) is behind the sale.",
    f"Parties, each its own process, a fresh set per row: the simulator ({LATENCY * 1000:.0f} "
    "ms per API answer, no rate limit, webhook sender up to "
    f"{SENDER_IN_FLIGHT} deliveries at once, one purchase's events one at a time and in order: "
    "one at a time it caps the feed near 60 webhooks/s here), an aiosmtpd sink, "
    "`whop-autocancel serve` on SQLite with its in-process worker (deployment `serve`), "
    "`serve --workers 1` (that and one `worker` process serve starts), `serve --no-worker "
    "--workers 2` (a web process and two `worker` processes it starts: one command), or "
    "`serve --no-worker` and `worker` processes on the same SQLite files, default settings plus "
    "WHOP_RATE_LIMIT=100 and WHOP_RATE_BURST=20; the message plan, so every purchase is an "
    "email (the cancellation waits for its acceptance) and a cancel.",
]


def _stage_note(rows: list[Row]) -> str:
    parts = []
    for row in rows:
        stages = "; ".join(
            f"{name} {_ms(spread['p50'])}/{_ms(spread['p99'])} ms"
            for name, spread in row.stages.items()
        )
        cores = ", ".join(
            f"{name} {value:.2f}" for name, value in row.cores.items() if value is not None
        )
        jobs = ", ".join(
            f"{job} {ms:g} ms ({row.job_runs_per_purchase.get(job, 0):g} runs)"
            for job, ms in sorted(row.job_cpu_ms_per_purchase.items(), key=lambda i: -i[1])
        )
        parts.append(
            f"{row.deployment} at {row.rate:g}/s: {stages}; webhook round trip p99 "
            f"{_ms(row.webhook_round_trip_p99)} ms; cores used: {cores}; service CPU per "
            f"purchase {_number(row.cpu_ms_per_purchase, 1)} ms, of which jobs: {jobs}"
        )
    return (
        "Where the time goes (p50/p99, the service's database against the simulator's "
        "records, one machine's clock): " + " | ".join(parts) + "."
    )


def section(*, smoke: bool = False) -> report.Table:
    """The end-to-end table (smoke: one row, 2/s for 5 s)."""
    folder = Path(tempfile.mkdtemp(prefix="wa-bench-e2e-"))
    rows: list[Row] = []
    try:
        for rate, duration, workers, children, in_process in SMOKE_ROWS if smoke else ROWS:
            name = f"{rate:g}-per-second" + (f"-{workers}-workers" if workers else "")
            name += f"-{children}-children" if children else ""
            name += "" if in_process else "-web-only"
            rows.append(run_row(folder / name, rate, duration, workers, children, in_process))
            done = f"e2e: {rate:g} purchases/s, {rows[-1].deployment}: done"
            print(done, file=sys.stderr, flush=True)
    finally:
        if os.environ.get("BENCH_KEEP") == "1":
            print(f"process logs kept in {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    load = os.getloadavg()
    notes = [
        *NOTES,
        _stage_note(rows),
        f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on "
        f"{os.cpu_count()} cores (other work on the machine moves every figure).",
    ]
    missed = [f"{row.rate:g}/s ({row.deployment})" for row in rows if not row.met]
    notes.append("goal: " + (f"NOT met at {', '.join(missed)}." if missed else "met in every row."))
    if smoke:
        notes.append("smoke run: 10 purchases a row, too few for a p99.")
    figures: dict[str, Any] = {
        "section": "e2e",
        "smoke": smoke,
        "cancel_delay_seconds": CANCEL_DELAY,
        "slack_seconds": SLACK,
        "rows": [{**asdict(row), "met": row.met, "deployment": row.deployment} for row in rows],
    }
    return report.Table(
        title=(
            "End to end: payment webhook accepted → membership canceled at Whop "
            f"(CANCEL_DELAY {CANCEL_DELAY:g} s)"
        ),
        columns=COLUMNS,
        rows=[_row(row) for row in rows],
        notes=notes,
        figures=figures,
    )


def main() -> int:
    table = section(smoke="--smoke" in sys.argv[1:])
    print(table.render())
    where = os.environ.get("BENCH_PROFILE")
    for path in sorted(Path(where).glob("e2e-*.txt")) if where else []:
        print(f"\n== profile of the service ({path})")
        print("\n".join(sampling.summarize_file(path).lines(top=25)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
