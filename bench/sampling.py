"""Sampling profiles of a running process with py-spy (the bench extra), and a plain summary
of them: where the samples are, by function (self and total) and by our package's top-level
module.

py-spy's raw format is one collapsed stack per line, outermost frame first, then the number of
samples: `frame;frame;frame 12`, each frame `function (path/file.py:line)`. Idle samples are
left out (py-spy's default), so shares are of the time some thread was running.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "whop_autocancel"
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str:
    """The py-spy next to this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    if beside.exists():
        return str(beside)
    found = shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy is not installed (it comes with the bench extra)")
    return found


_THREAD = re.compile(r'^Thread (?P<tid>\d+) \([^)]*\): "(?P<name>.*)"$')
_NUMBERED = re.compile(r"[-_]?\d+$")


def thread_names(pid: int) -> dict[int, str]:
    """The Python name of each thread of a running process, by its native id (py-spy's dump,
    which does not stop it), with the number a pool gives its threads dropped (`Worker-3`:
    `Worker`, `cancel-db_0`: `cancel-db`). Empty when py-spy is missing or may not read the
    process (it needs root, or ptrace rights over it)."""
    try:
        done = subprocess.run(
            [py_spy(), "dump", "--nonblocking", "--pid", str(pid)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (RuntimeError, OSError, subprocess.TimeoutExpired):
        return {}
    names: dict[int, str] = {}
    for line in done.stdout.splitlines():
        found = _THREAD.match(line.strip())
        if found:
            names[int(found["tid"])] = _NUMBERED.sub("", found["name"]) or found["name"]
    return names


def record(pid: int, output: Path, seconds: float, rate: int = 200) -> subprocess.Popen[bytes]:
    """Start recording `pid` for `seconds` into `output` (raw format); wait() on the result.
    Needs root (or ptrace rights over the process)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            py_spy(),
            "record",
            "--format",
            "raw",
            "--rate",
            str(rate),
            "-o",
            str(output),
            "--pid",
            str(pid),
            "--duration",
            str(max(1, round(seconds))),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def parse(text: str) -> Counter[tuple[str, ...]]:
    """Stacks (outermost first) and their sample counts."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in text.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def function_of(frame: str) -> str:
    """`function (file)`, without the line number: the unit the shares are counted in."""
    match = _FRAME.match(frame)
    if match is None:
        return frame
    return f"{match['function']} ({match['file']})"


def module_of(frame: str, package: str = PACKAGE) -> str | None:
    """`package.X` for a frame in package/X(.py|/…), else None."""
    match = _FRAME.match(frame)
    parts = Path(match["file"] if match else "").parts
    if package not in parts:
        return None
    rest = parts[parts.index(package) + 1 :]
    if not rest:
        return package
    return f"{package}.{rest[0].removesuffix('.py')}"


def _is_ours(function: str, package: str) -> bool:
    return f"({package}/" in function or f"/{package}/" in function


def library_of(frame: str) -> str:
    """The top-level package (or stdlib module) a frame's file belongs to."""
    match = _FRAME.match(frame)
    parts = Path(match["file"] if match else frame).parts
    return parts[0].removesuffix(".py") if parts else "?"


def _file_of(frame: str) -> str:
    match = _FRAME.match(frame)
    return match["file"] if match else ""


def _waiting(frame: str) -> bool:
    """A frame of the wait plumbing (locks, conditions, queues)."""
    return _file_of(frame).endswith(("threading.py", "queue.py"))


def _waiter(stack: tuple[str, ...]) -> str | None:
    """For a stack that ends waiting in threading/queue code, the frame that waits."""
    if not _waiting(stack[-1]):
        return None
    return next((frame for frame in reversed(stack) if not _waiting(frame)), None)


# Pool threads with no work wait here; py-spy does not always see them as idle (a woken thread
# waiting for the CPU or the GIL is running, to the kernel).
_IDLE_LOOPS = ("WorkerThread.run (anyio/", "_worker (concurrent/futures/thread.py")


def _idle(stack: tuple[str, ...]) -> bool:
    waiter = _waiter(stack)
    return waiter is not None and waiter.startswith(_IDLE_LOOPS)


@dataclass
class Summary:
    samples: int
    idle_left_out: int = 0  # samples of pool threads waiting for work, not counted
    self_share: list[tuple[str, float]] = field(default_factory=list)
    total_share: list[tuple[str, float]] = field(default_factory=list)  # our functions only
    module_share: list[tuple[str, float]] = field(default_factory=list)
    package_share: float = 0.0  # samples with any frame of ours on the stack

    def lines(self, top: int = 8) -> list[str]:
        def join(items: list[tuple[str, float]]) -> str:
            return ", ".join(f"{name} {share:.0%}" for name, share in items[:top])

        return [
            f"{self.samples} samples (+{self.idle_left_out} of idle pool threads, left out); "
            f"{self.package_share:.0%} with {PACKAGE} on the stack",
            f"by self: {join(self.self_share)}",
            f"by total ({PACKAGE} functions): {join(self.total_share)}",
            f"by module (innermost {PACKAGE} frame; else the library running): "
            f"{join(self.module_share)}",
        ]


def summarize(stacks: Counter[tuple[str, ...]], package: str = PACKAGE) -> Summary:
    """Shares of the samples, idle pool threads left out. A sample that waits on a lock,
    condition or queue is named, by self, after the frame that waits (`wait ← Caller`)."""
    idle = sum(count for stack, count in stacks.items() if _idle(stack))
    stacks = Counter({stack: count for stack, count in stacks.items() if not _idle(stack)})
    samples = sum(stacks.values())
    if not samples:
        return Summary(samples=0, idle_left_out=idle)
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    modules: Counter[str] = Counter()
    ours = 0
    for stack, count in stacks.items():
        waiter = _waiter(stack)
        leaf = function_of(stack[-1]).partition(" (")[0]
        self_counts[f"{leaf} ← {function_of(waiter)}" if waiter else function_of(stack[-1])] += (
            count
        )
        for function in {function_of(frame) for frame in stack}:
            total_counts[function] += count
        owner = next((m for f in reversed(stack) if (m := module_of(f, package))), None)
        if owner is not None:
            ours += count
        modules[owner or f"(not ours) {library_of(stack[-1])}"] += count

    def shares(counts: Counter[str]) -> list[tuple[str, float]]:
        return [(name, count / samples) for name, count in counts.most_common()]

    # Total share only for our own functions: the library ones at the top would be the thread
    # and event-loop plumbing every sample passes through.
    ours_total = Counter(
        {name: count for name, count in total_counts.items() if _is_ours(name, package)}
    )
    return Summary(
        samples=samples,
        idle_left_out=idle,
        self_share=shares(self_counts),
        total_share=shares(ours_total),
        module_share=shares(modules),
        package_share=ours / samples,
    )


def summarize_file(path: Path, package: str = PACKAGE) -> Summary:
    return summarize(parse(path.read_text()), package)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(f"== {name}")
        print("\n".join(summarize_file(Path(name)).lines(top=12)))
