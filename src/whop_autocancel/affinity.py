"""CPU pinning (`CPU_AFFINITY`): each process of the service on a core of its own.

A Python process runs one thread of Python at a time (the GIL), and the service's threads hand
it to each other thousands of times a second: around every database statement, every socket
read, every job. When the threads of one process run on different cores, each handoff wakes
a thread on another core, whose caches then fetch every object the last one touched. Measured
side by side on a 2-core machine (bench/e2e.py's `serve` at 50 purchases a second, alternated
runs): pinned, `serve` spent 10-20 % less CPU a purchase, and its p99 fell by seconds
(docs/performance.md). Pinning costs a process nothing it could use: it never runs more than
one core's worth of Python anyway.

`auto` (the default) pins only the processes of a deployment that knows it owns its cores:
`serve` running the jobs itself and the workers it starts (`serve --workers N`) get one allowed
CPU each, in order; when there are more of them than CPUs, the rest are not pinned. A `worker`
or a `serve --no-worker` started on its own is not pinned by `auto`: several may share a
machine, and nothing tells one which cores the others took (give each its own with an explicit
`CPU_AFFINITY`, or systemd's `CPUAffinity=`). `off` pins nothing. A list of CPU numbers pins the
process to the first, and the workers `serve --workers` starts to the next ones, in turn.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

AUTO = "auto"
OFF = "off"


def parse(value: str) -> str | tuple[int, ...]:
    """`auto`, `off`, or a comma-separated list of CPU numbers (ValueError otherwise)."""
    text = value.strip().lower()
    if text in (AUTO, OFF):
        return text
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isascii() and part.isdigit() for part in parts):
        raise ValueError(f"must be auto, off or CPU numbers like 0,1 (got {value!r})")
    cpus = tuple(int(part) for part in parts)
    if len(set(cpus)) != len(cpus):
        raise ValueError(f"names a CPU twice ({value!r})")
    return cpus


def allowed_cpus() -> tuple[int, ...]:
    """The CPUs this process may run on (its cgroup's and any `taskset`'s), in order; empty
    where the system cannot pin (not Linux)."""
    if not hasattr(os, "sched_getaffinity"):
        return ()
    return tuple(sorted(os.sched_getaffinity(0)))


@dataclass(frozen=True)
class Plan:
    own: int | None  # this process's CPU (None: not pinned)
    children: tuple[int | None, ...]  # each worker `serve --workers` starts, in slot order

    def child_setting(self, slot: int) -> str:
        """The CPU_AFFINITY a started worker gets (slot 1 is the first)."""
        cpu = self.children[slot - 1]
        return OFF if cpu is None else str(cpu)


def plan(
    setting: str | tuple[int, ...],
    allowed: tuple[int, ...],
    *,
    owns_cores: bool,
    children: int = 0,
) -> Plan:
    """Where this process and the `children` workers it starts run. `owns_cores`: this
    process runs jobs itself or starts workers (what `auto` pins). Raises ValueError for a
    listed CPU this process may not use."""
    if setting == OFF or not allowed:
        return Plan(None, (None,) * children)
    if isinstance(setting, tuple):
        refused = [cpu for cpu in setting if cpu not in allowed]
        if refused:
            raise ValueError(
                f"names CPU {', '.join(map(str, refused))}, which this process may "
                f"not use (allowed: {', '.join(map(str, allowed))})"
            )
        cycle = setting
        return Plan(cycle[0], tuple(cycle[slot % len(cycle)] for slot in range(1, children + 1)))
    if not owns_cores or len(allowed) < 2:
        return Plan(None, (None,) * children)
    return Plan(
        allowed[0],
        tuple(allowed[slot] if slot < len(allowed) else None for slot in range(1, children + 1)),
    )


def pin(cpu: int) -> None:
    """Run every thread of this process, and every thread it starts later, on `cpu` only."""
    run_on({cpu})


def run_on(cpus: set[int]) -> None:
    """Let every thread of this process (and every thread it starts later) run on `cpus`. On
    one CPU, each also runs as a batch thread (`SCHED_BATCH`): one that another of its
    threads wakes does not preempt the one that woke it. That one holds the GIL, so a woken
    thread could only stop it and wait; it runs as soon as the GIL is let go, and the holder
    is not cut off while others wait for it (the write turn of `db/write_turn.py` is handed
    over at each commit). Measured on one CPU, four threads taking the write turn in turn:
    30-31 µs a turn instead of 37-38. A thread's priority against other processes is the
    same. On more than one CPU, a process started by a pinned one (which inherits its policy
    with its CPU) is given the usual policy back."""
    tasks = Path("/proc/self/task")
    threads = [int(name) for name in os.listdir(tasks)] if tasks.is_dir() else [0]
    batch = len(cpus) == 1
    for thread in threads:
        try:
            os.sched_setaffinity(thread, cpus)
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
        try:  # (a hint: where a sandbox refuses it, the process runs as before)
            if batch:
                os.sched_setscheduler(thread, os.SCHED_BATCH, os.sched_param(0))
            elif os.sched_getscheduler(thread) == os.SCHED_BATCH:
                os.sched_setscheduler(thread, os.SCHED_OTHER, os.sched_param(0))
        except OSError:
            continue
