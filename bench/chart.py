"""The performance chart: one panel per benchmark section that knows how to draw itself, from
the raw `figures` of its table (never from the rendered text).

A section's figures name it (`figures["section"]`); `DRAWINGS` maps that name to a function
that draws one panel. A section without a drawing is left out of the chart.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
import report
from matplotlib.axes import Axes

SERVICE_COLOR = "#2f6fb0"
GUIDE_COLOR = "#b0b0b0"


def _latency(seconds: float) -> str:
    return f"{seconds:g} s" if seconds >= 1 else f"{seconds * 1000:.0f} ms"


def cancellations(axes: Axes, figures: dict[str, Any]) -> None:
    """Grouped bars per row: service and guide-style cancels/s ÷ the rate limit, the target
    and the limit as lines, and where 5xx eat tokens, the attainable ceiling."""
    rows = figures["rows"]
    positions = list(range(len(rows)))
    width = 0.38
    for offset, side, label, color in (
        (-width / 2, "service", "service", SERVICE_COLOR),
        (width / 2, "guide", "guide-style worker", GUIDE_COLOR),
    ):
        values = [row[side]["ratio"] for row in rows]
        bars = axes.bar(
            [p + offset for p in positions],
            [v or 0.0 for v in values],
            width,
            label=label,
            color=color,
        )
        axes.bar_label(
            bars, labels=["n/a" if v is None else f"{v:.2f}" for v in values], fontsize=8
        )
    for position, row in zip(positions, rows, strict=True):
        if row["ceiling_ratio"] < 1:
            axes.hlines(
                row["ceiling_ratio"],
                position - width,
                position + width,
                colors="black",
                linestyles="dotted",
                label="ceiling with 5xx" if position == positions[-1] else None,
            )
    target = figures.get("target_ratio", 0.95)
    axes.axhline(1.0, color="black", linewidth=1, label="rate limit")
    axes.axhline(target, color="#c0392b", linestyle="--", linewidth=1, label=f"target {target}")
    axes.set_xticks(
        positions,
        [f"{_latency(r['latency_seconds'])}\n{r['error_rate'] * 100:.0f} % 5xx" for r in rows],
    )
    highest = max([1.0] + [r[s]["ratio"] or 0.0 for r in rows for s in ("service", "guide")])
    axes.set_ylim(0, highest * 1.15)
    axes.set_ylabel("cancellations/s ÷ rate limit")
    smoke = " (smoke run)" if figures.get("smoke") else ""
    guide_count = figures.get("guide_purchases", figures["purchases"])
    guide = f" (guide-style: {guide_count})" if guide_count != figures["purchases"] else ""
    axes.set_title(
        f"Cancellations against Whop's rate limit ({figures['rate_limit_per_second']:g}/s), "
        f"{figures['purchases']} a row{guide}{smoke}"
    )
    pad = max(0.0, (4 - len(rows)) / 2)  # a lone row keeps its bars narrow, in the middle
    axes.set_xlim(-0.5 - pad, len(rows) - 0.5 + pad)
    axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=5)


ROW_COLORS = (SERVICE_COLOR, "#e08a1e", "#3a9d5d", "#8e44ad")
GOAL_COLOR = "#c0392b"


def e2e(axes: Axes, figures: dict[str, Any]) -> None:
    """Per row, the share of purchases canceled within t seconds of their payment webhook's
    2xx (a step curve), CANCEL_DELAY and the goal as vertical lines."""
    delay = figures["cancel_delay_seconds"]
    goal = delay + figures["slack_seconds"]
    highest = goal
    for row, color in zip(figures["rows"], ROW_COLORS, strict=False):
        values = sorted(row["latencies"])
        if not values:
            continue
        shares = [(index + 1) / len(values) for index in range(len(values))]
        p99 = "n/a" if row["p99"] is None else f"{row['p99']:.2f} s"
        deployment = row.get("deployment", "serve")
        label = f"{row['rate']:g} purchases/s, {deployment}: p99 {p99}, {row['lost']} lost"
        axes.step(values, shares, where="post", color=color, label=label)
        highest = max(highest, values[-1])
    axes.axvline(delay, color="black", linestyle=":", linewidth=1, label="CANCEL_DELAY")
    axes.axvline(
        goal, color=GOAL_COLOR, linestyle="--", linewidth=1, label=f"goal: p99 ≤ {goal:g} s"
    )
    axes.axhline(0.99, color="grey", linewidth=0.5)
    axes.set_xlim(0, highest * 1.05)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("seconds from the payment webhook's 2xx to the membership canceled at Whop")
    axes.set_ylabel("share of purchases")
    smoke = " (smoke run)" if figures.get("smoke") else ""
    axes.set_title(f"End to end: webhook accepted → membership canceled{smoke}")
    axes.legend(fontsize=8, loc="lower right")


def flash_sale(axes: Axes, figures: dict[str, Any]) -> None:
    """Per deployment, memberships canceled (solid) and payment webhooks accepted (dashed)
    since the first purchase, next to the purchases made and the best drain possible."""
    purchases, seconds = figures["purchases"], figures["seconds"]
    limit, delay = figures["rate_limit_per_second"], figures["cancel_delay_seconds"]
    best = min(purchases / seconds, limit)  # a cancellation follows its purchase by the delay
    highest = delay + purchases / best
    for run, color in zip(figures["runs"], ROW_COLORS, strict=False):
        timeline = run["timeline"]
        if not timeline:
            continue
        moments = [point[0] for point in timeline]
        ratio = "n/a" if run["drain_ratio"] is None else f"{run['drain_ratio']:.2f}"
        unfinished = f" (+{run['unfinished']} unfinished)" if run["unfinished"] else ""
        label = (
            f"{run['deployment']}: canceled, {ratio} of the limit, {run['lost']} lost{unfinished}"
        )
        axes.plot(moments, [point[2] for point in timeline], color=color, label=label)
        axes.plot(
            moments,
            [point[1] for point in timeline],
            color=color,
            linestyle="--",
            linewidth=1,
            label=f"{run['deployment']}: payment webhooks accepted",
        )
        highest = max(highest, moments[-1])
    axes.plot([0, seconds], [0, purchases], color="black", linestyle=":", label="purchases made")
    axes.plot(
        [delay, delay + purchases / best],
        [0, purchases],
        color=GOAL_COLOR,
        linestyle="-.",
        linewidth=1,
        label=f"best possible: {best:g}/s from CANCEL_DELAY on",
    )
    axes.set_xlim(0, highest * 1.05)
    axes.set_ylim(0, purchases * 1.05)
    axes.set_xlabel("seconds since the first purchase")
    axes.set_ylabel("purchases")
    smoke = " (smoke run)" if figures.get("smoke") else ""
    axes.set_title(
        f"Flash sale: {purchases} purchases in {seconds:g} s, Whop at {limit:g} requests/s{smoke}"
    )
    axes.legend(fontsize=8, loc="lower right")


DRAWINGS: dict[str, Callable[[Axes, dict[str, Any]], None]] = {
    "cancellations": cancellations,
    "e2e": e2e,
    "flash_sale": flash_sale,
}


def draw(tables: list[report.Table], path: Path) -> bool:
    """Write the chart of every drawable table to `path` (PNG); False when none is."""
    panels = [
        (DRAWINGS[table.figures["section"]], table.figures)
        for table in tables
        if table.figures.get("section") in DRAWINGS
    ]
    if not panels:
        return False
    figure, axes = plt.subplots(len(panels), 1, figsize=(10, 4.8 * len(panels)), squeeze=False)
    for (drawing, figures), panel in zip(panels, axes[:, 0], strict=True):
        drawing(panel, figures)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True
