"""The overview's charts as plain numbers for an inline SVG (no JavaScript, no library): one
small bar chart per series, an hour per bar, a line and a label at each UTC midnight."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

BAR_WIDTH = 2.0  # SVG units per hour: a week is 336 wide
PLOT_HEIGHT = 48.0
LABEL_SPACE = 14.0
LABEL_WIDTH = 24.0  # a day's label ("Nov 30") needs this much room before the right edge


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    title: str


@dataclass(frozen=True)
class Midnight:
    x: float
    label: str


@dataclass(frozen=True)
class SeriesChart:
    name: str
    total: int
    peak: int
    bars: list[Bar]
    midnights: list[Midnight]
    width: float
    plot_height: float
    height: float


def series_chart(name: str, hours: list[datetime], counts: list[int]) -> SeriesChart:
    peak = max(counts, default=0)
    bars = []
    for index, (hour, count) in enumerate(zip(hours, counts, strict=True)):
        if not count:
            continue
        height = max(1.5, PLOT_HEIGHT * count / peak)
        bars.append(
            Bar(
                x=index * BAR_WIDTH + 0.2,
                y=PLOT_HEIGHT - height,
                width=BAR_WIDTH - 0.4,
                height=height,
                title=f"{hour:%Y-%m-%d %H}:00 UTC: {count} {name}",
            )
        )
    midnights = [
        Midnight(x=index * BAR_WIDTH, label=f"{hour:%b} {hour.day}")
        for index, hour in enumerate(hours)
        if hour.hour == 0 and (len(hours) - index) * BAR_WIDTH >= LABEL_WIDTH
    ]
    return SeriesChart(
        name=name,
        total=sum(counts),
        peak=peak,
        bars=bars,
        midnights=midnights,
        width=len(hours) * BAR_WIDTH,
        plot_height=PLOT_HEIGHT,
        height=PLOT_HEIGHT + LABEL_SPACE,
    )
