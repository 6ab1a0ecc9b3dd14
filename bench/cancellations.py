"""Cancellation throughput against Whop's rate limit (issue 12), next to the guide's worker.

For each Whop latency (50 ms, 200 ms, 1 s) and 5xx rate (0 %, 20 %), on a fresh simulator with
a token bucket of 10 requests/s (burst 10) per API key:

- the service: `whop-autocancel serve` (SQLite, in-process worker, default settings) gets the
  webhooks of N purchases made at the simulator and cancels every membership;
- the guide-style worker (bench/guide_worker.py: one thread, sleeping retries, no pacing)
  cancels memberships on another fresh simulator with the same settings (fewer of them: its
  steady rate is what counts, and at 1 s latency it takes a second each).

Every number comes from the simulator's own records (its call log and the memberships'
`canceled_at`), never from the driver's clock; the driver only polls to know when to stop.
Each simulator, the service, the SMTP sink and the guide worker run in their own processes.

    PYTHONPATH=src .venv/bin/python bench/cancellations.py [--smoke]
    BENCH_CANCELS=200 (purchases per row, the service), BENCH_GUIDE_CANCELS=60 (the
    guide-style worker's memberships per row), BENCH_KEEP=1 keeps the process logs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import parties
import report
from parties import (
    Simulator,
    after_start_up_sweep,
    environment,
    healthy,
    is_cancel,
    seconds,
    smtp_sink,
    steady_rate,
    wait_until,
)

from support.harness import API_KEY, free_port, service_environment

BENCH = Path(__file__).resolve().parent

#: The simulator's token bucket for every row: 10 requests/s, a burst of 1 s.
RATE_LIMIT = 10.0
BURST = 10
LATENCIES = (0.05, 0.2, 1.0)
ERROR_RATES = (0.0, 0.2)
TARGET = 0.95  # of the rate limit, the goal for every row
#: Default settings, plus the service's own pacing at the simulator's limit (explicit: the test
#: harness's environment sets a pacing of its own).
SERVICE_SETTINGS = {"WHOP_RATE_LIMIT": "10", "WHOP_RATE_BURST": "5"}
POLL_SECONDS = 0.5


def configure(sim: Simulator, latency: float, error_rate: float) -> None:
    """The row's settings: the token bucket, the latency and the 5xx rate."""
    sim.control("rate_limit", {"capacity": BURST, "refill_per_second": RATE_LIMIT})
    sim.control("latency", {"seconds": latency})
    sim.control("faults", {"error_rate": error_rate})


@dataclass
class Side:
    """What one side (the service or the guide worker) of one row achieved, per the simulator."""

    purchases: int
    canceled: int = 0
    per_second: float | None = None  # steady state, see steady_rate
    ratio: float | None = None  # per_second ÷ RATE_LIMIT
    # per_second ÷ the attainable ceiling, RATE_LIMIT x (1 - the row's 5xx rate)
    ratio_to_ceiling: float | None = None
    drain_seconds: float | None = None  # first cancel call → last membership canceled
    purchase_to_last_seconds: float | None = None  # first purchase → last membership canceled
    calls: int = 0  # every /api/v1 call from the first purchase on
    cancel_calls: int = 0
    calls_429: int = 0
    calls_5xx: int = 0
    other_calls: int = 0  # reads, lists (sweeps, read-backs): anything but a cancel
    calls_per_cancel: float | None = None
    percent_429: float | None = None
    finished: bool = True  # False: the deadline passed first
    gave_up: int | None = None  # the guide worker only
    # The service only: payment webhooks it acknowledged per second (steady state), how fast
    # it learned of purchases; the row measures cancellation only while this is above the limit.
    payments_in_per_second: float | None = None
    completion_offsets: list[float] = field(default_factory=list)  # s after the first cancel


def measure(sim: Simulator, membership_ids: list[str], after_seq: int, side: Side) -> Side:
    """Fill `side` from the simulator's records: calls whose `seq` is past `after_seq`, and
    the memberships' `canceled_at`."""
    calls = [call for call in sim.calls() if call["seq"] > after_seq]
    views = [sim.membership(membership_id) for membership_id in membership_ids]
    done = sorted(seconds(v["canceled_at"]) for v in views if v["status"] == "canceled")
    cancels = [call for call in calls if is_cancel(call)]
    side.canceled = len(done)
    side.calls = len(calls)
    side.cancel_calls = len(cancels)
    side.other_calls = len(calls) - len(cancels)
    side.calls_429 = sum(1 for call in calls if call["status"] == 429)
    side.calls_5xx = sum(1 for call in calls if call["status"] >= 500)
    side.per_second = steady_rate(done)
    side.ratio = side.per_second / RATE_LIMIT if side.per_second is not None else None
    if done:
        side.calls_per_cancel = len(calls) / len(done)
    if calls:
        side.percent_429 = 100 * side.calls_429 / len(calls)
    if cancels and done:
        first_cancel = min(seconds(call["at"]) for call in cancels)
        first_purchase = min(seconds(view["created_at"]) for view in views)
        side.drain_seconds = done[-1] - first_cancel
        side.purchase_to_last_seconds = done[-1] - first_purchase
        side.completion_offsets = [round(moment - first_cancel, 3) for moment in done]
    return side


def ceiling(error_rate: float) -> float:
    """The most cancels/s that can succeed: a 5xx'd request spends a token too."""
    return RATE_LIMIT * (1 - error_rate)


def run_service(folder: Path, latency: float, error_rate: float, purchases: int) -> Side:
    """The service on a fresh simulator: purchases whose webhooks reach it, until every
    membership is canceled at the simulator (or a generous deadline passes)."""
    folder.mkdir(parents=True)
    side = Side(purchases=purchases)
    with ExitStack() as stack:
        sim = Simulator(stack, folder, "simulator")
        configure(sim, latency, error_rate)
        smtp_url = smtp_sink(stack, folder)
        env = service_environment(
            folder, WHOP_API_URL=sim.api_url, SMTP_URL=smtp_url, **SERVICE_SETTINGS
        )
        port = free_port()
        service = parties.service(stack, folder, "service", ["serve", "--port", str(port)], env)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: healthy(url), 60, "the service", service)
        after_seq = after_start_up_sweep(sim, latency)
        sim.control("config", {"webhook_url": f"{url}/webhooks/whop"})
        membership_ids = sim.purchases(purchases, send_webhooks=True)
        wanted = set(membership_ids)
        deadline = time.monotonic() + 120 + 3 * purchases * max(latency, 1 / RATE_LIMIT)
        while not wanted <= sim.canceled():
            service.check("the service")
            if time.monotonic() > deadline:
                side.finished = False
                break
            time.sleep(POLL_SECONDS)
        measure(sim, membership_ids, after_seq, side)
        if side.per_second is not None:
            side.ratio_to_ceiling = side.per_second / ceiling(error_rate)
        payments = [
            seconds(delivery["answered_at"])
            for delivery in sim.webhooks()["deliveries"]
            if delivery["type"] == "payment.succeeded" and delivery["status"] == 200
        ]
        side.payments_in_per_second = steady_rate(payments)
        return side


def run_guide(folder: Path, latency: float, error_rate: float, purchases: int) -> Side:
    """The guide worker on a fresh simulator with the same settings and as many memberships."""
    folder.mkdir(parents=True)
    side = Side(purchases=purchases)
    with ExitStack() as stack:
        sim = Simulator(stack, folder, "simulator")
        configure(sim, latency, error_rate)
        membership_ids = sim.purchases(purchases, send_webhooks=False)
        ids = folder / "memberships.txt"
        ids.write_text("\n".join(membership_ids) + "\n")
        args = [sys.executable, str(BENCH / "guide_worker.py"), "--api-url", sim.api_url]
        args += ["--api-key", API_KEY, "--ids", str(ids)]
        worst = purchases * (3 * latency + 3.5)  # 3 attempts and both sleeps, every time
        worker = subprocess.Popen(args, env=environment(), cwd=folder, stdout=subprocess.PIPE)
        try:
            output, _ = worker.communicate(timeout=60 + worst)
        except subprocess.TimeoutExpired:
            worker.kill()
            output, _ = worker.communicate()
            side.finished = False
        if worker.returncode == 0:
            side.gave_up = len(json.loads(output.decode().strip().splitlines()[-1])["gave_up"])
        else:
            side.finished = False
        return measure(sim, membership_ids, 0, side)


# ----- the table ----------------------------------------------------------------------------


def _latency(seconds: float) -> str:
    return f"{seconds:g} s" if seconds >= 1 else f"{seconds * 1000:.0f} ms"


def _number(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _calls_429(side: Side) -> str:
    return f"{side.calls_429} ({_number(side.percent_429, 1)} %)"


def _drain(side: Side) -> str:
    text = _number(side.drain_seconds, 1)
    return text if side.finished else f"{text} (stopped: {side.canceled}/{side.purchases})"


def _row(latency: float, error_rate: float, service: Side, guide: Side) -> list[str]:
    return [
        _latency(latency),
        f"{error_rate * 100:.0f} %",
        _number(1 - error_rate),
        _number(service.per_second, 1),
        _number(service.ratio),
        _number(service.ratio_to_ceiling),
        _number(service.calls_per_cancel),
        _calls_429(service),
        _drain(service),
        _number(guide.per_second, 1),
        _number(guide.ratio),
        _calls_429(guide),
        _drain(guide),
        f"{guide.gave_up if guide.gave_up is not None else 'n/a'}/{guide.purchases}",
    ]


COLUMNS = [
    "Whop latency",
    "5xx",
    "ceiling ÷ limit",
    "service cancels/s",
    "÷ limit",
    "÷ ceiling",
    "calls/cancel",
    "429s (% calls)",
    "drain (s)",
    "guide-style cancels/s",
    "÷ limit",
    "guide 429s (% calls)",
    "guide drain (s)",
    "guide gave up",
]

NOTES = [
    "cancels/s is the steady state: the memberships' `canceled_at` at the simulator (server "
    "side, ms) sorted; between the completion at the 10th percentile and the one at the 90th "
    "(indices round(0.1 (n-1)) and round(0.9 (n-1))), the completions after the first up to "
    "and including the last, ÷ the time between the two. ÷ limit divides it by the "
    "simulator's 10 requests/s; ÷ ceiling (the service) by the attainable ceiling, "
    "10 x (1 - the row's 5xx rate), the same with 0 % 5xx. The goal, ≥ 0.95 in every row, "
    "is the ÷ ceiling column (see ceiling below). A pause inside the window "
    "lets the bucket fill up again, so a row can read a little above 1.00 (by at most "
    "burst ÷ window, about 0.06 with 200 purchases).",
    "drain: from the first cancel call the simulator recorded to the last membership "
    "canceled. For the service it leaves out webhook ingest and CANCEL_DELAY (5 s): the JSON "
    "has purchase_to_last_seconds too.",
    "ceiling ÷ limit: a 5xx'd request costs a token (Simulator.handle_api runs _admit, which "
    "takes the token, before it rolls the random 500), so at most (1 - 5xx rate) x 10 "
    "cancels/s can succeed. A 429 costs no token (TokenBucket.take spends only when one is "
    "there). Latency is waited before admission, so the bucket sees requests as they end. "
    "In these rows the goal of 0.95 can only mean 0.95 of the ceiling (0.76 of the limit): "
    "the ÷ ceiling column. The 500s come from the simulator's seeded dice (its default "
    "seed, every row and side alike), so a row's share of 5xx is near, not exactly, 20 %.",
    "calls/cancel: every /api/v1 call the simulator recorded from the first purchase on "
    "(cancels, read-backs, sweep lists, 429s and 5xx included) ÷ memberships canceled; the "
    "service's start-up Whop sweep (its first tick, waited out before the purchases) is left "
    "out; any later sweep counts.",
    "service: `whop-autocancel serve` on SQLite with its in-process worker, default settings "
    "(WORKER_THREADS 4, CANCEL_DELAY 5 s, RETRY_SCHEDULE 1,2,4,10,30,60) plus "
    "WHOP_RATE_LIMIT=10 and WHOP_RATE_BURST=5 (the service's own pacing); a message "
    "plan, its emails to an aiosmtpd sink; webhooks from the simulator (payment and "
    "activation per purchase).",
    "guide-style: bench/guide_worker.py, one thread taking the memberships in order, 3 "
    "attempts with sleep(1), sleep(2) between them on 429/5xx/transport errors, then it gives "
    "up; no pacing. Same simulator settings, fresh simulator. It cancels BENCH_GUIDE_CANCELS "
    "memberships (default 60; the service: BENCH_CANCELS, 200): taking them one at a time, "
    "its steady rate does not depend on how many there are, and it is the rate that counts; "
    "200 took 200-300 s a row at 1 s latency. Its drain covers its own count.",
]


def section(*, smoke: bool = False) -> report.Table:
    """The cancellation-throughput table (smoke: one row, 50 ms and 0 %, 20 purchases, the
    guide-style worker too)."""
    purchases = 20 if smoke else int(os.environ.get("BENCH_CANCELS", "200"))
    guide_purchases = 20 if smoke else int(os.environ.get("BENCH_GUIDE_CANCELS", "60"))
    grid = (
        [(0.05, 0.0)]
        if smoke
        else [(latency, rate) for latency in LATENCIES for rate in ERROR_RATES]
    )
    folder = Path(tempfile.mkdtemp(prefix="wa-bench-cancel-"))
    rows, records = [], []
    try:
        for latency, error_rate in grid:
            name = f"{latency * 1000:.0f}ms-{error_rate * 100:.0f}pct"
            service = run_service(folder / name / "service", latency, error_rate, purchases)
            guide = run_guide(folder / name / "guide", latency, error_rate, guide_purchases)
            rows.append(_row(latency, error_rate, service, guide))
            records.append(
                {
                    "latency_seconds": latency,
                    "error_rate": error_rate,
                    "ceiling_ratio": 1 - error_rate,
                    "ceiling_per_second": ceiling(error_rate),
                    "service": asdict(service),
                    "guide": asdict(guide),
                }
            )
            print(
                f"cancellations: {_latency(latency)}, {error_rate:.0%} 5xx done",
                file=sys.stderr,
                flush=True,
            )
    finally:
        if os.environ.get("BENCH_KEEP") == "1":
            print(f"process logs kept in {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    notes = list(NOTES)
    feeds = [r["service"]["payments_in_per_second"] for r in records]
    if feeds and None not in feeds:
        low, high = min(feeds), max(feeds)
        verdict = (
            "above the limit, so the limit, not ingest, bounds the service's rows"
            if low > RATE_LIMIT
            else "NOT above the limit in every row: there, ingest bounds the service"
        )
        notes.append(
            f"the service learned of purchases at {low:.0f}"
            f"{'' if round(low) == round(high) else f'-{high:.0f}'} payments/s (payment "
            f"webhooks it acknowledged, steady state as above): {verdict}."
        )
    short = [
        f"{_latency(r['latency_seconds'])} {r['error_rate']:.0%}"
        for r in records
        if (r["service"]["ratio_to_ceiling"] or 0.0) < TARGET
    ]
    notes.append(
        f"goal ≥ {TARGET} of the ceiling: "
        + (f"NOT met in {', '.join(short)}." if short else "met in every row.")
    )
    if smoke:
        notes.append("smoke run: one row of 20 purchases, too few for a steady state.")
    return report.Table(
        title=(
            f"Cancellation throughput against Whop's rate limit ({RATE_LIMIT:g} requests/s, "
            f"burst {BURST}), {purchases} purchases a row (guide-style worker: "
            f"{guide_purchases})"
        ),
        columns=COLUMNS,
        rows=rows,
        notes=notes,
        figures={
            "section": "cancellations",
            "smoke": smoke,
            "purchases": purchases,
            "guide_purchases": guide_purchases,
            "rate_limit_per_second": RATE_LIMIT,
            "burst": BURST,
            "target_ratio": TARGET,
            "rows": records,
        },
    )


def main() -> int:
    print(section(smoke="--smoke" in sys.argv[1:]).render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
