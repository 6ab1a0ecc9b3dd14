"""What every benchmark section hands back: one plain table (measured side by side in one run)
plus the raw figures, so `bench/run.py` can print, save (JSON) and chart them together."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)  # raw numbers, for JSON and charts

    def render(self) -> str:
        """A markdown table (it reads as plain text too), then the notes."""
        widths = [
            max(len(str(cell)) for cell in [column, *(row[i] for row in self.rows)])
            for i, column in enumerate(self.columns)
        ]

        def line(cells: list[str]) -> str:
            return (
                "| "
                + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))
                + " |"
            )

        out = [f"## {self.title}", "", line(self.columns)]
        out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        out += [line(row) for row in self.rows]
        out += [""] + [f"- {note}" for note in self.notes] if self.notes else []
        return "\n".join(out)


def save(tables: list[Table], path: Path) -> None:
    path.write_text(json.dumps([asdict(table) for table in tables], indent=2, default=str))
