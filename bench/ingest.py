"""Webhook ingest (issue 12): webhooks per second and p50/p99 of `POST /webhooks/whop`, next to
floors served by the same uvicorn in the same run, on this machine, one target at a time:

- bare: read the body, 200 (the HTTP stack, and proof that the load generator is not the
  bottleneck: it must go far faster than the service);
- verify: the same plus the Standard Webhooks signature check;
- durable floor SQLite: verify, INSERT the body, commit (WAL, synchronous=FULL), 200;
- service SQLite: `whop-autocancel serve` with its defaults (SQLite, in-process worker);
- durable floor PG: verify, INSERT + commit into PostgreSQL, 200;
- service PG: `serve --no-worker` and one `worker` on PostgreSQL, Redis queue.

Every request is a unique, pre-signed `payment.succeeded` of a plan the catalog lists, so the
service does the real work: store the event, create and pay an order, queue its delivery.
Targets: service ≥ 0.5 x its durable floor (closed loop, 32 connections), and p99 ≤ 25 ms at a
steady 200 requests/s (open loop, latency from the scheduled send time).

    .venv/bin/python bench/ingest.py [--profile DIR] [--smoke]

Knobs: BENCH_INGEST_SECONDS (closed loop, default 10), BENCH_INGEST_STEADY_SECONDS (default 10),
BENCH_INGEST_STEADY_RUNS (a service's steady runs, each a fresh deployment; the p99 reported is
their median; default 3), BENCH_INGEST_WARMUP (default 1), BENCH_INGEST_CONNECTIONS (32),
BENCH_INGEST_RATE (200),
BENCH_ONLY=sqlite|postgresql, BENCH_PROFILE=DIR (py-spy of the service's web process during its
closed-loop run), BENCH_KEEP=1 (keep the process logs). Smoke: ~2 s runs, SQLite only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when imported from elsewhere

import httpx
import parties
import pytest
import report
import sampling
from floors import SECRET_ENV
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from support import backends
from support.harness import MESSAGE_PLAN, SECRET, free_port, service_environment

BENCH = Path(__file__).resolve().parent
P99_TARGET_MS = 25.0
RATIO_TARGET = 0.5
# Nothing listens there: the worker's Whop and SMTP calls fail fast instead of leaving the
# machine (delivery emails wait for their retries; no cancellation is reached).
NOWHERE = {"WHOP_API_URL": "http://127.0.0.1:9/api/v1", "SMTP_URL": "smtp://127.0.0.1:9"}

BARE = "bare"
VERIFY = "verify"
FLOOR_SQLITE = "durable floor SQLite"
SERVICE_SQLITE = "service SQLite"
FLOOR_PG = "durable floor PG"
SERVICE_PG = "service PG"
FLOOR_OF = {SERVICE_SQLITE: FLOOR_SQLITE, SERVICE_PG: FLOOR_PG}


@dataclass(frozen=True)
class Knobs:
    seconds: float
    steady_seconds: float
    steady_runs: int
    warmup: float
    connections: int
    rate: float
    kinds: tuple[str, ...]
    profile: Path | None
    keep: bool
    smoke: bool


def knobs(smoke: bool, profile: Path | None = None) -> Knobs:
    env = os.environ.get
    only = env("BENCH_ONLY")
    profile = profile or (Path(env("BENCH_PROFILE", "")) if env("BENCH_PROFILE") else None)
    return Knobs(
        seconds=float(env("BENCH_INGEST_SECONDS", "2" if smoke else "10")),
        steady_seconds=float(env("BENCH_INGEST_STEADY_SECONDS", "2" if smoke else "10")),
        steady_runs=int(env("BENCH_INGEST_STEADY_RUNS", "1" if smoke else "3")),
        warmup=float(env("BENCH_INGEST_WARMUP", "0.5" if smoke else "1")),
        connections=int(env("BENCH_INGEST_CONNECTIONS", "32")),
        rate=float(env("BENCH_INGEST_RATE", "200")),
        kinds=("sqlite",)
        if smoke
        else tuple(k for k in ("sqlite", "postgresql") if only in (None, "", k)),
        profile=profile,
        keep=env("BENCH_KEEP") == "1",
        smoke=smoke,
    )


def say(message: str) -> None:
    print(f"ingest: {message}", file=sys.stderr, flush=True)


# -- processes -----------------------------------------------------------------------------


@dataclass
class Started:
    port: int
    pids: dict[str, int]  # by name; the first serves HTTP (the one to profile)

    @property
    def web_pid(self) -> int:
        return next(iter(self.pids.values()))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process that is running (all its threads) so far."""
    used = parties.cpu_seconds(pid)
    if used is None:
        raise RuntimeError(f"process {pid} ended during the run")
    return used


@contextmanager
def running(
    commands: dict[str, list[str]], env: dict[str, str], folder: Path, port: int
) -> Iterator[Started]:
    """Start `commands` (by name; the first serves HTTP on `port`), wait until /healthz
    answers, and stop them all (SIGTERM, then kill) afterwards. Logs: folder/NAME.log."""
    folder.mkdir(parents=True, exist_ok=True)
    processes: list[tuple[subprocess.Popen[bytes], Path]] = []
    pids: dict[str, int] = {}
    try:
        for name, command in commands.items():
            log = folder / f"{name}.log"
            with log.open("wb") as output:
                process = subprocess.Popen(
                    command, env=env, cwd=folder, stdout=output, stderr=subprocess.STDOUT
                )
            processes.append((process, log))
            pids[name] = process.pid
        deadline = time.monotonic() + 60
        while True:
            for process, log in processes:
                if process.poll() is not None:
                    tail = log.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{process.args} exited ({process.returncode}):\n{tail}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{next(iter(commands))} did not answer /healthz in 60 s")
            time.sleep(0.1)
        yield Started(port=port, pids=pids)
    finally:
        for process, _ in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process, _ in processes:
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def floor_process(folder: Path, **storage: str) -> Any:
    port = free_port()
    command = [sys.executable, str(BENCH / "floors.py"), "--port", str(port)]
    for option, value in storage.items():
        command += [f"--{option}", value]
    env = {**os.environ, SECRET_ENV: SECRET}
    return running({"floor": command}, env, folder, port)


def service_processes(folder: Path, split: bool, **settings: str) -> Any:
    """`serve` (with its in-process worker), or, when `split`, `serve --no-worker` + `worker`."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = service_environment(folder, **NOWHERE, **settings)
    command = [sys.executable, "-m", "whop_autocancel"]
    serve = [*command, "serve", "--port", str(port)]
    commands = (
        {"serve": [*serve, "--no-worker"], "worker": [*command, "worker"]}
        if split
        else {"serve": serve}
    )
    return running(commands, env, folder, port)


# -- load ------------------------------------------------------------------------------------


def load(
    started: Started,
    path: str,
    settings: Knobs,
    *,
    steady: bool = False,
    profile_to: Path | None = None,
) -> dict[str, Any]:
    """Run the load generator (its own process) once against `path`; its JSON result, with
    the CPU seconds each server process used while the clock ran (`server_cpu`)."""
    command = [
        sys.executable,
        str(BENCH / "loadgen.py"),
        "--port",
        str(started.port),
        "--path",
        path,
        "--connections",
        str(settings.connections),
        "--plan",
        MESSAGE_PLAN,
        "--announce",
    ]
    if steady:
        command += ["--mode", "open", "--rate", str(settings.rate)]
        command += ["--seconds", str(settings.steady_seconds)]
    else:
        command += ["--mode", "closed", "--seconds", str(settings.seconds)]
    command += ["--warmup", str(settings.warmup)]
    generator = subprocess.Popen(
        command, env={**os.environ, SECRET_ENV: SECRET}, stdout=subprocess.PIPE, text=True
    )
    assert generator.stdout is not None
    spy = None
    result: dict[str, Any] | None = None
    cpu: dict[str, float] = {}
    for line in generator.stdout:
        if line.strip() == "timing":
            cpu = {name: cpu_seconds(pid) for name, pid in started.pids.items()}
            if profile_to is not None and not steady:
                spy = sampling.record(started.web_pid, profile_to, settings.seconds)
        elif line.startswith("{"):
            result = json.loads(line)
            result["server_cpu"] = {
                name: round(cpu_seconds(pid) - cpu[name], 2) for name, pid in started.pids.items()
            }
    if generator.wait() != 0 or result is None:
        raise RuntimeError(f"the load generator failed ({generator.returncode})")
    if spy is not None:
        _, error = spy.communicate(timeout=settings.seconds + 60)
        if spy.returncode != 0:
            raise RuntimeError(f"py-spy failed: {error.decode(errors='replace')[-1000:]}")
    return result


def measure(started: Started, path: str, settings: Knobs, *, steady: bool) -> dict[str, Any]:
    """A floor's runs, on one process: the steady one first (when asked), then the closed
    loop."""
    figures: dict[str, Any] = {}
    if steady:
        figures["steady"] = load(started, path, settings, steady=True)
        say(f"  steady {settings.rate:g} req/s: p99 {figures['steady']['p99_ms']:.1f} ms")
    figures["closed"] = closed = load(started, path, settings)
    say(f"  closed loop {closed['rate']:.0f} req/s, p99 {closed['p99_ms']:.1f} ms")
    return figures


# -- databases -------------------------------------------------------------------------------


def unavailable(*kinds: str) -> str | None:
    """Why a server the PostgreSQL rows need does not answer (None: they all do)."""
    for kind in kinds:
        try:
            backends.require(kind)
        except (pytest.skip.Exception, pytest.fail.Exception) as error:
            return str(error)
    return None


@contextmanager
def scratch_postgres() -> Iterator[str]:
    """An empty scratch database for the PostgreSQL floor (a plain psycopg URL), dropped after."""
    server = make_url(backends.require("postgresql")).set(drivername="postgresql")
    name = f"{backends.RUN_ID}_ingest_floor"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = server.set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        backends.drop_database("postgresql", url)


def stored(url: str) -> dict[str, int]:
    """What the service made of the load: its inbox by status, and paid orders."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            counts = {
                f"events {status}": count
                for status, count in connection.execute(
                    text("SELECT status, COUNT(*) FROM webhook_events GROUP BY status")
                )
            }
            counts["orders with a payment"] = connection.execute(
                text("SELECT COUNT(*) FROM orders WHERE whop_payment_id IS NOT NULL")
            ).scalar_one()
    finally:
        engine.dispose()
    return counts


def forget_queue(url: str, name: str) -> None:
    from whop_autocancel.jobs import Jobs

    Jobs(url, name).huey.storage.flush_all()


# -- the section -----------------------------------------------------------------------------


def service_run(
    settings: Knobs, db: str, folder: Path, *, steady: bool, profile_to: Path | None = None
) -> dict[str, Any]:
    """One run against a fresh deployment of the service (so that neither run inherits the
    other's backlog): SQLite, `serve` with its in-process worker; PostgreSQL, a scratch
    database, a Redis queue of its own, `serve --no-worker` + `worker`. The run's figures, with
    what the service stored (`stored`)."""
    if db == "sqlite":
        url = f"sqlite:///{folder / 'service.db'}"
        with service_processes(folder, False, DATABASE_URL=url) as started:
            result = load(started, "/webhooks/whop", settings, steady=steady, profile_to=profile_to)
        result["stored"] = stored(url)
        return result
    url = backends.create_database("postgresql")
    queue_url = backends.require("redis")
    queue_name = f"{backends.RUN_ID}-ingest-{uuid.uuid4().hex[:8]}"
    try:
        backend = {"DATABASE_URL": url, "QUEUE_URL": queue_url, "QUEUE_NAME": queue_name}
        with service_processes(folder, True, **backend) as started:
            result = load(started, "/webhooks/whop", settings, steady=steady, profile_to=profile_to)
        result["stored"] = stored(url)
    finally:
        backends.drop_database("postgresql", url)
        forget_queue(queue_url, queue_name)
    return result


def run_all(settings: Knobs, folder: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Every target, one at a time; their figures by row name, and notes on what went odd."""
    results: dict[str, dict[str, Any]] = {}
    notes: list[str] = []

    def floor(name: str, path: str, steady: bool, **storage: str) -> None:
        say(f"{name} (POST {path})")
        with floor_process(folder / path.strip("/"), **storage) as started:
            results[name] = measure(started, path, settings, steady=steady)

    def service(name: str, db: str) -> None:
        say(f"{name} (POST /webhooks/whop), a fresh deployment for each run")
        spy = settings.profile / f"ingest-{db}.txt" if settings.profile is not None else None
        # One steady run's p99 is one draw from a wide spread (the same code gave 24-300 ms in
        # ten-second runs on one afternoon): the median of several fresh deployments.
        runs = []
        for number in range(settings.steady_runs):
            folder_n = folder / f"service-{db}-steady-{number + 1}"
            runs.append(service_run(settings, db, folder_n, steady=True))
            p99 = runs[-1]["p99_ms"]
            say(f"  steady {settings.rate:g} req/s, run {number + 1}: p99 {p99:.1f} ms")
        steady = median_run(runs)
        steady["p99_ms_runs"] = [run["p99_ms"] for run in runs]
        closed = service_run(settings, db, folder / f"service-{db}", steady=False, profile_to=spy)
        say(f"  closed loop {closed['rate']:.0f} req/s, p99 {closed['p99_ms']:.1f} ms")
        results[name] = {"steady": steady, "closed": closed}

    floor(BARE, "/bare", steady=False)
    if not settings.smoke:
        floor(VERIFY, "/verify", steady=False)
    if "sqlite" in settings.kinds:
        floor(FLOOR_SQLITE, "/durable-sqlite", True, sqlite=str(folder / "floor.db"))
        service(SERVICE_SQLITE, "sqlite")
    if "postgresql" in settings.kinds:
        reason = unavailable("postgresql", "redis")
        if reason is not None:
            notes.append(f"PostgreSQL rows skipped: {reason}")
        else:
            with scratch_postgres() as url:
                floor(FLOOR_PG, "/durable-pg", True, postgres=url)
            service(SERVICE_PG, "postgresql")
    return results, notes


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run whose p99 is the median (the higher middle one of an even count)."""
    return sorted(runs, key=lambda run: run["p99_ms"])[len(runs) // 2]


def steady_p99(steady: dict[str, Any]) -> str:
    """A steady phase's p99 for the table: the median run's, with the runs' range."""
    runs = steady.get("p99_ms_runs", [])
    if len(runs) < 2:
        return ms(steady["p99_ms"])
    return f"{ms(steady['p99_ms'])} ({ms(min(runs))} to {ms(max(runs))})"


def stored_note(run: dict[str, Any]) -> str:
    """Whether every 200 (warm-up included) is a stored, handled event with its paid order."""
    answered = run["statuses"].get("200", 0) + run["warmup_statuses"].get("200", 0)
    counts = run["stored"]
    if counts.get("events handled") == counts["orders with a payment"] == answered:
        return f"all {answered} answered 200 stored, handled, with a paid order"
    return f"answered 200: {answered}, stored: " + ", ".join(f"{k} {v}" for k, v in counts.items())


def web_cpu_ms(run: dict[str, Any]) -> float:
    """CPU milliseconds of the process serving HTTP per answer, during the run."""
    return next(iter(run["server_cpu"].values())) / max(run["requests"], 1) * 1e3


def ms(value: float) -> str:
    return f"{value:.1f}"


def build_table(
    settings: Knobs, results: dict[str, dict[str, Any]], odd: list[str]
) -> report.Table:
    ratios: dict[str, float] = {}
    rows = []
    for name in (BARE, VERIFY, FLOOR_SQLITE, SERVICE_SQLITE, FLOOR_PG, SERVICE_PG):
        if name not in results:
            continue
        closed, steady = results[name]["closed"], results[name].get("steady")
        floor = FLOOR_OF.get(name, name if name in FLOOR_OF.values() else None)
        ratio = "—"
        if floor in results:
            ratios[name] = closed["rate"] / results[floor]["closed"]["rate"]
            ratio = f"{ratios[name]:.2f}"
        rows.append(
            [
                name,
                f"{closed['rate']:,.0f}",
                ms(closed["p50_ms"]),
                ms(closed["p99_ms"]),
                ratio,
                steady_p99(steady) if steady else "—",
                f"{web_cpu_ms(closed):.2f}",
            ]
        )
        for phase, figures in (("closed loop", closed), ("steady", steady)):
            if figures and set(figures["statuses"]) != {"200"}:
                odd.append(f"{name}, {phase}: answers by status {figures['statuses']}")
            if figures and figures.get("exhausted"):
                odd.append(f"{name}: ran out of pre-made bodies after {figures['seconds']} s")
    notes = [
        f"Closed loop: {settings.connections} keep-alive connections for {settings.seconds:g} s; "
        f"steady: {settings.rate:g} requests/s for {settings.steady_seconds:g} s, latency from "
        f"the scheduled send time (a service's p99: the median of {settings.steady_runs} "
        "runs, their range in brackets; its other figures are the median run's); each after "
        f"{settings.warmup:g} s of uncounted warm-up, each "
        "service run on a fresh deployment (a floor runs both on one process). Every request "
        f"is a unique payment.succeeded signed before the clock starts, of a listed plan "
        f"({MESSAGE_PLAN}): the service stores it, creates and pays an order, queues delivery.",
    ]
    if BARE in results and SERVICE_SQLITE in results:
        bare = results[BARE]["closed"]
        notes.append(
            f"Load generator ceiling: it drove the bare route at {bare['rate']:,.0f} req/s, "
            f"{bare['rate'] / results[SERVICE_SQLITE]['closed']['rate']:.1f} x the SQLite "
            f"service, using {bare['loadgen_cpu']:.0%} of one core."
        )
    for name in FLOOR_OF:
        if name in ratios:
            steady = results[name]["steady"]["p99_ms"]
            notes.append(
                f"{name}: {ratios[name]:.2f} x its durable floor (target ≥ {RATIO_TARGET}: "
                f"{'met' if ratios[name] >= RATIO_TARGET else 'missed'}); p99 at "
                f"{settings.rate:g} req/s {steady:.1f} ms (target ≤ {P99_TARGET_MS:g} ms: "
                f"{'met' if steady <= P99_TARGET_MS else 'missed'}). Steady run: "
                f"{stored_note(results[name]['steady'])}; closed loop: "
                f"{stored_note(results[name]['closed'])}."
            )
    load_average = "/".join(f"{x:.1f}" for x in os.getloadavg())
    notes.append(
        f"One machine, {os.cpu_count()} cores (load average {load_average} at the end), "
        "shared by the server, the load generator and (PG rows) PostgreSQL, Redis and the "
        "worker. The service's SQLite connections use synchronous=NORMAL (db/engine.py); the "
        "floor commits with FULL. Web CPU ms/req: CPU time of the process serving HTTP "
        "during the closed loop, per answer (service SQLite: with its in-process worker)."
    )
    if SERVICE_PG in results:
        closed = results[SERVICE_PG]["closed"]
        worker = closed["server_cpu"].get("worker", 0.0) / max(closed["requests"], 1) * 1e3
        notes.append(f"service PG: its worker process used {worker:.2f} ms CPU per answer.")
    notes += odd
    figures: dict[str, Any] = {
        "rows": results,
        "ratio_to_floor": ratios,
        "knobs": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
    }
    return report.Table(
        title="Webhook ingest: POST /webhooks/whop against its floors",
        columns=[
            "target",
            f"req/s ({settings.connections} conn)",
            "p50 ms",
            "p99 ms",
            "÷ durable floor",
            f"p99 ms at {settings.rate:g} req/s",
            "web CPU ms/req",
        ],
        rows=rows,
        notes=notes,
        figures=figures,
    )


def profile_notes(settings: Knobs, table: report.Table) -> None:
    """Summaries of the py-spy records, into the table (notes and figures) and on stdout."""
    if settings.profile is None:
        return
    summaries = {}
    for db in settings.kinds:
        path = settings.profile / f"ingest-{db}.txt"
        if not path.exists():
            continue
        summary = sampling.summarize_file(path)
        summaries[db] = asdict(summary)
        lines = summary.lines(top=8)
        print(f"\n== profile of the {db} service's web process ({path})")
        print("\n".join(summary.lines(top=15)))
        table.notes.append(f"Profile, service {db} web process: " + lines[0])
        table.notes += [f"  {line}" for line in lines[1:]]
    table.figures["profile"] = summaries


def section(*, smoke: bool = False, profile: Path | None = None) -> report.Table:
    settings = knobs(smoke, profile)
    folder = Path(tempfile.mkdtemp(prefix="wa-bench-ingest-"))
    try:
        results, odd = run_all(settings, folder)
    finally:
        if settings.keep:
            say(f"process logs kept in {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    table = build_table(settings, results, odd)
    profile_notes(settings, table)
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", type=Path, help="py-spy the service into DIR")
    parser.add_argument("--smoke", action="store_true", help="~2 s runs, SQLite only")
    options = parser.parse_args()
    table = section(smoke=options.smoke, profile=options.profile)
    print()
    print(table.render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
