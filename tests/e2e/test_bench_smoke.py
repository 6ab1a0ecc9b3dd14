"""The benchmarks keep running: `bench/run.py --smoke` as a real process (simulators, the
service, SMTP sinks and the guide-style worker, each its own process), every section small:
cancellations (one row), ingest (SQLite), e2e (2 purchases/s for 5 s), flash_sale (200
purchases in 10 s on SQLite), purchase_cpu (10 purchases, one round). No thresholds: timing
lives in bench/; this only checks that the run, its tables, JSON and chart still come out, and
the invariants (nothing lost or duplicated). About 75 s on an idle 2-core machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text

from support import backends

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_bench_smoke_prints_the_table_and_writes_json_and_chart(tmp_path: Path) -> None:
    figures_path, chart_path = tmp_path / "bench.json", tmp_path / "bench.png"
    command = [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke"]
    result = subprocess.run(
        [*command, "--json", str(figures_path), "--chart", str(chart_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    # The printed table has the smoke row (50 ms, 0 % 5xx) with numbers in it.
    row = next((line for line in result.stdout.splitlines() if line.startswith("| 50 ms")), None)
    assert row is not None, result.stdout
    cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
    assert cells[1] == "0 %"
    service_rate, guide_rate = float(cells[3]), float(cells[9])
    assert service_rate > 0
    assert guide_rate > 0
    assert cells[-1].endswith("/20")  # guide gave up: k/20

    # The JSON holds the section's raw figures.
    tables = json.loads(figures_path.read_text())
    figures = figures_of(tables, "cancellations")
    assert figures["smoke"] is True
    assert figures["purchases"] == 20
    [measured] = figures["rows"]
    assert (measured["latency_seconds"], measured["error_rate"]) == (0.05, 0.0)
    for side in ("service", "guide"):
        assert measured[side]["purchases"] == 20
        assert isinstance(measured[side]["per_second"], float)
        assert isinstance(measured[side]["calls"], int)
    assert measured["service"]["canceled"] == 20  # the service cancels every membership

    # e2e: two rows (serve with its in-process worker; serve --no-worker and one worker
    # process), 10 purchases each, each canceled, with its time from webhook to cancel.
    e2e = figures_of(tables, "e2e")
    assert e2e["smoke"] is True
    in_process, split = e2e["rows"]
    assert (in_process["deployment"], split["deployment"]) == (
        "serve",
        "serve --no-worker + 1 worker",
    )
    for e2e_row in (in_process, split):
        assert (e2e_row["rate"], e2e_row["purchases"]) == (2.0, 10)
        assert e2e_row["lost"] == 0
        assert len(e2e_row["latencies"]) == 10
        assert all(latency > 0 for latency in e2e_row["latencies"])
    assert table_row(result.stdout, "| serve   ")[2] == "10"
    assert table_row(result.stdout, "| serve --no-worker + 1 worker")[2] == "10"

    # flash_sale: SQLite only, 200 purchases, nothing lost, failed or duplicated; each
    # service process's peak memory and the service's cores read.
    flash = figures_of(tables, "flash_sale")
    assert (flash["smoke"], flash["purchases"]) == (True, 200)
    [sale] = flash["runs"]
    assert sale["deployment"] == "SQLite, 1 serve"
    assert (sale["not_canceled"], sale["failed"], sale["duplicated"]) == (0, 0, 0)
    assert sale["canceled_once"] == 200
    assert sale["counts"]["delivery_emails_sent"] == 200
    assert isinstance(sale["rss_mb"]["serve"], float)
    # The cores the service used while the purchases came in and after them, from its CPU
    # sampled every second.
    during, after = sale["service_cores"]
    assert during > 0
    assert after > 0
    assert table_row(result.stdout, "| SQLite, 1 serve")[1] == "200"

    # purchase_cpu: every job of a purchase timed in one thread, 10 purchases, each job's CPU
    # a positive figure, next to the plain commit measured in the same run.
    cpu = figures_of(tables, "purchase_cpu")
    assert (cpu["smoke"], cpu["purchases"], cpu["rounds"]) == (True, 10, 1)
    jobs = cpu["jobs"]
    assert set(jobs) >= {"webhooks.apply", "delivery.deliver", "mail.send", "cancellation.run"}
    assert all(job["ms"] > 0 and job["runs"] >= 1 for job in jobs.values())
    assert cpu["commit_floor_ms"] > 0
    assert float(table_row(result.stdout, "| all jobs")[2]) > 0

    # And the chart is a PNG.
    assert chart_path.read_bytes().startswith(PNG_SIGNATURE)


def figures_of(tables: list[dict[str, Any]], section: str) -> dict[str, Any]:
    figures: dict[str, Any] = next(
        t["figures"] for t in tables if t["figures"].get("section") == section
    )
    return figures


def table_row(output: str, start: str) -> list[str]:
    """The cells of the printed table row that starts with `start`."""
    row = next((line for line in output.splitlines() if line.startswith(start)), None)
    assert row is not None, output
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


def test_purchase_cpu_smoke_on_postgresql(tmp_path: Path) -> None:
    """`BENCH_CPU_DATABASE=postgresql`: the jobs' CPU with the service's database on
    PostgreSQL, in a database of the run's own that is gone after it."""
    server = create_engine(backends.require("postgresql"))
    before = run_databases(server)
    figures_path = tmp_path / "cpu.json"
    figures = str(figures_path)
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "purchase_cpu.py"), "--smoke", "--json", figures],
        cwd=tmp_path,
        env={**os.environ, "BENCH_CPU_DATABASE": "postgresql"},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "one job at a time, PostgreSQL)" in result.stdout
    found = json.loads(figures_path.read_text())
    assert found["database"] == "postgresql"
    assert all(job["ms"] > 0 for job in found["jobs"].values())
    assert float(table_row(result.stdout, "| all jobs")[2]) > 0
    assert run_databases(server) == before  # (none left behind; other runs' are not ours)
    server.dispose()


def run_databases(server: Engine) -> set[str]:
    """The databases `purchase_cpu.py` makes for its runs (`…_postgresql_cpu`)."""
    with server.connect() as connection:
        found = connection.execute(
            text("SELECT datname FROM pg_database WHERE datname LIKE '%\\_postgresql\\_cpu'")
        )
        return {str(name) for (name,) in found}
