"""Work counted, not timed: for tests that pin how much a path costs, the same on any machine."""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import FrameType
from typing import Any


def python_calls(work: Callable[[], object]) -> int:
    """How many functions `work` calls, Python's and C's, counted by the profiler hook: a
    measure of its CPU that is the same on any machine and in any load."""
    calls = 0

    def count(_frame: FrameType, event: str, _arg: Any) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(count)
    try:
        work()
    finally:
        sys.setprofile(None)
    return calls
