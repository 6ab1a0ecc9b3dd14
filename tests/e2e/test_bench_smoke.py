"""The benchmarks keep running: `bench/run.py --smoke` as a real process (a simulator, the
service, an SMTP sink and the guide-style worker, each its own process), one small row. No
thresholds: timing lives in bench/; this only checks that the run, its JSON and its chart
still come out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
        timeout=100,
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
    figures = next(t["figures"] for t in tables if t["figures"].get("section") == "cancellations")
    assert figures["smoke"] is True
    assert figures["purchases"] == 20
    [measured] = figures["rows"]
    assert (measured["latency_seconds"], measured["error_rate"]) == (0.05, 0.0)
    for side in ("service", "guide"):
        assert measured[side]["purchases"] == 20
        assert isinstance(measured[side]["per_second"], float)
        assert isinstance(measured[side]["calls"], int)
    assert measured["service"]["canceled"] == 20  # the service cancels every membership

    # And the chart is a PNG.
    assert chart_path.read_bytes().startswith(PNG_SIGNATURE)
