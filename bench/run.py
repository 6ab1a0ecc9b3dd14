"""Every benchmark section in one command: print the tables, save the figures, draw the chart.

    PYTHONPATH=src .venv/bin/python bench/run.py [--smoke] [--only cancellations,...]
        [--json out.json] [--chart docs/images/performance.png]

A section is a `section(*, smoke: bool = False) -> report.Table` function, registered below as
"module:function" (modules of bench/) and imported only when it runs: a section whose module
is not there yet is skipped with a message, unless `--only` asked for it. No thresholds: the
tables say how far each goal is.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report

SECTIONS: dict[str, str] = {
    "cancellations": "cancellations:section",
    "ingest": "ingest:section",
    "e2e": "e2e:section",
    "flash_sale": "flash_sale:section",
    "purchase_cpu": "purchase_cpu:section",
}

Section = Callable[..., report.Table]


def load(name: str) -> Section | None:
    """The section's function, or None when its module does not exist (yet)."""
    module_name, _, function = SECTIONS[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise  # the module is there but something it imports is not: a real failure
        return None
    section: Section = getattr(module, function)
    return section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny run of every section")
    parser.add_argument("--only", help=f"comma-separated sections: {', '.join(SECTIONS)}")
    parser.add_argument("--json", type=Path, help="save every table and its figures here")
    parser.add_argument("--chart", type=Path, help="draw the chart (PNG) here")
    options = parser.parse_args(argv)
    wanted = [name.strip() for name in options.only.split(",")] if options.only else []
    unknown = [name for name in wanted if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s): {', '.join(unknown)} (known: {', '.join(SECTIONS)})")
    missing = []
    tables: list[report.Table] = []
    for name in wanted or list(SECTIONS):
        section = load(name)
        if section is None:
            module = SECTIONS[name].partition(":")[0]
            print(f"skipped {name}: bench/{module}.py is not there yet", file=sys.stderr)
            missing.append(name)
            continue
        table = section(smoke=options.smoke)
        print(table.render() + "\n", flush=True)
        tables.append(table)
    if options.json:
        options.json.parent.mkdir(parents=True, exist_ok=True)
        report.save(tables, options.json)
        print(f"figures saved to {options.json}", file=sys.stderr)
    if options.chart:
        import chart  # matplotlib only when a chart is asked for

        if chart.draw(tables, options.chart):
            print(f"chart drawn to {options.chart}", file=sys.stderr)
        else:
            print("no chart: no section with a drawing ran", file=sys.stderr)
    return 1 if wanted and missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
