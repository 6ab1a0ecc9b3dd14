"""`serve --workers N`: worker processes started, watched and stopped with `serve`.

One Python process runs one core's worth of Python (the GIL); a `serve` with worker processes
uses the machine's other cores on the same database and queue, SQLite included (the processes
take turns at its writes, as separate `worker`s do). Each child is `whop-autocancel worker`
with serve's environment: a child that dies is started again (1 s, doubling to 30 s); a
stopping `serve` stops its children gracefully (SIGTERM, as for any worker) and waits for them;
a `serve` killed outright takes its children with it: each holds the read end of a pipe whose
write end only `serve` holds, and stops gracefully when it reads the end of it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import structlog

from whop_autocancel import affinity

log = structlog.get_logger(__name__)

PARENT_PIPE = "WHOP_AUTOCANCEL_PARENT_PIPE"  # the child's end of the pipe, a file descriptor
# The CPUs serve could use before it pinned itself: a child inherits serve's one CPU, and
# starts from these instead (then pins itself to its own, or not, by its CPU_AFFINITY).
SPAWN_CPUS = "WHOP_AUTOCANCEL_SPAWN_CPUS"
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 30.0
HEALTHY_RUN = 60.0  # a child that ran this long starts again after FIRST_BACKOFF


class WorkerProcesses:
    """`count` worker processes kept running until `stop`."""

    def __init__(
        self,
        count: int,
        stop_timeout: float,
        cpus: affinity.Plan | None = None,
        spawn_from: tuple[int, ...] = (),
    ) -> None:
        """`cpus`: where each child runs (its CPU_AFFINITY); `spawn_from`: the CPUs serve
        could use before it pinned itself, which the children start from."""
        self.count = count
        self.stop_timeout = stop_timeout
        self._cpus = cpus
        self._spawn_from = spawn_from
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._processes: dict[int, subprocess.Popen[bytes]] = {}
        self._threads: list[threading.Thread] = []
        # serve keeps the write end, unused; none when there are no children to tell
        self._pipe = os.pipe() if count else None

    def start(self) -> None:
        for slot in range(1, self.count + 1):
            thread = threading.Thread(
                target=self._keep, args=(slot,), name=f"serve-worker-{slot}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _keep(self, slot: int) -> None:
        backoff = FIRST_BACKOFF
        while True:
            started = time.monotonic()
            process = self._spawn(slot)
            if process is None:
                return
            code = process.wait()
            if self._stopping.is_set():
                return
            if time.monotonic() - started >= HEALTHY_RUN:
                backoff = FIRST_BACKOFF
            log.warning(
                "serve_worker_exited",
                slot=slot,
                pid=process.pid,
                exit_code=code,
                restart_in=backoff,
            )
            if self._stopping.wait(backoff):
                return
            backoff = min(backoff * 2, MAX_BACKOFF)

    def _spawn(self, slot: int) -> subprocess.Popen[bytes] | None:
        with self._lock:  # `stop` sees every child started, or none starts after it
            if self._stopping.is_set():
                return None
            assert self._pipe is not None  # a slot exists only when count > 0
            read_end = self._pipe[0]
            env = {**os.environ, PARENT_PIPE: str(read_end)}
            if self._cpus is not None:
                env["CPU_AFFINITY"] = self._cpus.child_setting(slot)
            if self._spawn_from:
                env[SPAWN_CPUS] = ",".join(map(str, self._spawn_from))
            process = subprocess.Popen(
                [sys.executable, "-m", "whop_autocancel", "worker"],
                env=env,
                pass_fds=(read_end,),
            )
            self._processes[slot] = process
        log.info("serve_worker_started", slot=slot, pid=process.pid)
        return process

    def stop(self) -> None:
        """SIGTERM to every child (running jobs finish, as `worker` does), then wait for them,
        killing any still running after `stop_timeout`. Once; later calls return at once."""
        with self._lock:
            if self._stopping.is_set():
                return
            self._stopping.set()
            processes = list(self._processes.values())
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for process in processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("serve_worker_killed", pid=process.pid, after=self.stop_timeout)
                process.kill()
                process.wait()
        for thread in self._threads:
            thread.join()
        if self._pipe is not None:
            for end in self._pipe:
                os.close(end)


def take_back_cpus() -> None:
    """In a worker started by `serve --workers`: run on the CPUs serve started from, not on
    the one serve pinned itself to (which the worker inherited)."""
    listed = os.environ.get(SPAWN_CPUS)
    if listed:
        affinity.run_on({int(cpu) for cpu in listed.split(",")})


def stop_with_parent() -> None:
    """In a worker started by `serve --workers`: stop gracefully (as on SIGTERM) once `serve`
    is gone, however it went (its pipe's write end closes with it)."""
    descriptor = os.environ.get(PARENT_PIPE)
    if descriptor is None:
        return

    def watch() -> None:
        try:
            while os.read(int(descriptor), 1):
                pass
        except OSError:
            pass
        log.warning("serve_gone_worker_stopping")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
