"""Counts that scenarios want shown in every run (CI included): collected here and printed in
pytest's terminal summary by tests/conftest.py, past the output capture."""

from __future__ import annotations

COUNTS: list[str] = []


def show(text: str) -> None:
    COUNTS.append(text)
