"""The parties of a benchmark run, each in its own process: the Whop simulator (driven through
its `/_sim` control API), an SMTP sink, the service; and the readings every section shares
(the simulator's ISO times, the steady-state rate, a process's peak memory).

Every number a section reports comes from the simulator's records (its call log, webhook
deliveries, memberships' `canceled_at`) or the service's database, never from the driver's
clock, except where a section says so.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from support.harness import (
    API_KEY,
    MESSAGE_PLAN,
    SECRET,
    child_processes,
    child_pythonpath,
    free_port,
)

SINK = [sys.executable, "-m", "aiosmtpd", "-n", "-c", "aiosmtpd.handlers.Sink"]
SERVICE = [sys.executable, "-m", "whop_autocancel"]
CANCEL_PATH_END = "/cancel"


def seconds(iso: str) -> float:
    """Unix seconds of one of the simulator's ISO timestamps (UTC, milliseconds, `Z`)."""
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def is_cancel(call: dict[str, Any]) -> bool:
    return bool(call["method"] == "POST" and call["path"].endswith(CANCEL_PATH_END))


def steady_rate(times: list[float]) -> float | None:
    """Completions per second in steady state: between the completion at the 10th percentile
    (index round(0.1 (n-1)) of the sorted times) and the one at the 90th, the completions after
    the first up to and including the last, divided by the time between them. None with fewer
    than 3 completions or no time between them."""
    if len(times) < 3:
        return None
    ordered = sorted(times)
    low, high = round(0.1 * (len(ordered) - 1)), round(0.9 * (len(ordered) - 1))
    span = ordered[high] - ordered[low]
    return (high - low) / span if span > 0 else None


def percentile(values: list[float], share: float) -> float | None:
    """The nearest-rank percentile (share 0.99: p99): the smallest value with at least that
    share of the values at or below it. None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * share // 1))  # ceil(n x share), at least 1
    return ordered[int(rank) - 1]


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident set size so far (VmHWM), in MB; None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return None


def _stat_cpu(stat: str) -> float | None:
    """User + system CPU seconds in a `/proc/…/stat` file (a process's or a thread's); None
    once it is gone."""
    try:
        fields = Path(stat).read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (all its threads) so far; None once it is gone."""
    return _stat_cpu(f"/proc/{pid}/stat")


def thread_cpu(pid: int) -> dict[int, float]:
    """User + system CPU time of each thread of a process so far, by its native id; empty once
    the process is gone (a thread gone meanwhile is left out)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    used = {int(task): _stat_cpu(f"/proc/{pid}/task/{task}/stat") for task in tasks}
    return {task: seconds for task, seconds in used.items() if seconds is not None}


def environment() -> dict[str, str]:
    """This process's environment without the simulator's own settings, and with this
    checkout's code first on the child's path (`child_pythonpath`)."""
    kept = {key: value for key, value in os.environ.items() if not key.startswith("SIM_")}
    return {**kept, "PYTHONPATH": child_pythonpath()}


class Child:
    """A subprocess with its output in a log file, stopped (SIGTERM, then kill) on exit."""

    def __init__(self, args: list[str], log: Path, *, env: dict[str, str], cwd: Path) -> None:
        self.log = log
        with log.open("wb") as output:
            self.process = subprocess.Popen(
                args, env=env, cwd=cwd, stdout=output, stderr=subprocess.STDOUT
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def check(self, what: str) -> None:
        if not self.alive():
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{what} exited ({self.process.returncode}):\n{tail}")

    def stop(self) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def running(child: Child) -> Iterator[Child]:
    try:
        yield child
    finally:
        child.stop()


def wait_until(check: Callable[[], bool], seconds: float, what: str, child: Child) -> None:
    """Poll `check` until it holds; fail if `child` exits or `seconds` pass (a setup wait)."""
    deadline = time.monotonic() + seconds
    while not check():
        child.check(what)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start within {seconds:.0f} s (log: {child.log})")
        time.sleep(0.1)


def serve_workers(serve: Child, count: int) -> dict[str, int]:
    """The `count` worker processes `serve --workers` started, once all are up, by name
    (`serve-worker-N`) and pid: read like the other processes (CPU, peak RSS)."""
    wait_until(lambda: len(child_processes(serve.pid)) >= count, 60, "serve's workers", serve)
    found = sorted(child_processes(serve.pid)) if count else []
    return {f"serve-worker-{number}": pid for number, pid in enumerate(found, 1)}


def accepts(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def smtp_sink(stack: ExitStack, folder: Path) -> str:
    """An aiosmtpd sink (it accepts and discards every message) in its own process; its URL."""
    port = free_port()
    sink = stack.enter_context(
        running(
            Child(
                [*SINK, "-l", f"127.0.0.1:{port}"],
                folder / "smtp.log",
                env=environment(),
                cwd=folder,
            )
        )
    )
    wait_until(lambda: accepts(port), 30, "the SMTP sink", sink)
    return f"smtp://127.0.0.1:{port}"


def service(
    stack: ExitStack, folder: Path, name: str, args: list[str], env: dict[str, str]
) -> Child:
    """`whop-autocancel ARGS` in its own process (log: folder/NAME.log), stopped on exit."""
    return stack.enter_context(
        running(Child([*SERVICE, *args], folder / f"{name}.log", env=env, cwd=folder))
    )


def serve(stack: ExitStack, folder: Path, env: dict[str, str], *, name: str = "service") -> str:
    """`whop-autocancel serve` (web and its in-process worker) until /healthz answers; its URL."""
    port = free_port()
    child = service(stack, folder, name, ["serve", "--port", str(port)], env)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: healthy(url), 60, "the service", child)
    return url


class Simulator:
    """`whop-autocancel simulator` in its own process, driven through its `/_sim` control API."""

    def __init__(self, stack: ExitStack, folder: Path, name: str) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.api_url = f"{self.url}/api/v1"
        args = [*SERVICE, "simulator", "--port", str(port)]
        args += ["--api-key", API_KEY, "--webhook-secret", SECRET, "--plan", MESSAGE_PLAN]
        self.child = stack.enter_context(
            running(Child(args, folder / f"{name}.log", env=environment(), cwd=folder))
        )
        self.http = stack.enter_context(httpx.Client(base_url=self.url, timeout=60))
        wait_until(self._ready, 60, f"the simulator ({name})", self.child)

    def _ready(self) -> bool:
        try:
            return self.http.get("/_sim/faults").status_code == 200
        except httpx.HTTPError:
            return False

    def control(self, path: str, body: dict[str, Any]) -> Any:
        response = self.http.post(f"/_sim/{path}", json=body)
        response.raise_for_status()
        return response.json()

    def purchases(self, count: int, *, send_webhooks: bool) -> list[str]:
        """Buyers pay for the message plan, one after the other; the membership ids, in
        purchase order."""
        return [
            self.control(
                "purchases",
                {
                    "plan_id": MESSAGE_PLAN,
                    "email": f"buyer{number}@example.com",
                    "send_webhooks": send_webhooks,
                },
            )["membership_id"]
            for number in range(count)
        ]

    def calls(self) -> list[dict[str, Any]]:
        response = self.http.get("/_sim/calls")
        response.raise_for_status()
        calls: list[dict[str, Any]] = response.json()["calls"]
        return calls

    def webhooks(self) -> dict[str, Any]:
        """`{"deliveries": [...], "pending": n}`: every delivery attempt, and what is queued."""
        response = self.http.get("/_sim/webhooks")
        response.raise_for_status()
        answer: dict[str, Any] = response.json()
        return answer

    def membership(self, membership_id: str) -> dict[str, Any]:
        response = self.http.get(f"/_sim/memberships/{membership_id}")
        response.raise_for_status()
        view: dict[str, Any] = response.json()["membership"]
        return view

    def canceled(self) -> set[str]:
        """The memberships a cancel call succeeded for (status 200), per the call log."""
        return {
            call["membership_id"]
            for call in self.calls()
            if is_cancel(call) and call["status"] == 200
        }


def after_start_up_sweep(sim: Simulator, latency: float) -> int:
    """The `seq` of the last call of the service's start-up Whop sweep (its first tick), so
    that a benchmark counts none of them: once a call is recorded, wait until none came for
    two latencies and a second (a setup wait, not a measurement; 30 s at most)."""
    quiet = 2 * latency + 1.0
    deadline = time.monotonic() + 30
    count, since = len(sim.calls()), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = len(sim.calls())
        if now != count:
            count, since = now, time.monotonic()
        elif count and time.monotonic() - since >= quiet:
            break
    return count


@dataclass
class Purchase:
    """One purchase the driver made: its membership, its payment webhook, when it was asked
    for and when the simulator answered (the driver's clock, time.time())."""

    number: int
    membership_id: str
    payment_webhook_id: str
    asked_at: float
    answered_at: float


def purchase_at_rate(
    sim_url: str, count: int, rate: float, *, connections: int = 8, first: int = 0
) -> list[Purchase]:
    """`count` purchases of the message plan at the simulator, `rate` a second, each with its
    webhooks: an open loop (purchase n is asked for at start + n / rate, whatever became of
    the earlier ones) over `connections` keep-alive connections. Buyers are numbered from
    `first`. Returns them in purchase order."""
    local = threading.local()
    clients: list[httpx.Client] = []
    lock = threading.Lock()

    def client() -> httpx.Client:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=sim_url, timeout=60)
            with lock:
                clients.append(local.client)
        http: httpx.Client = local.client
        return http

    def buy(number: int) -> Purchase:
        asked = time.time()
        response = client().post(
            "/_sim/purchases",
            json={"plan_id": MESSAGE_PLAN, "email": f"buyer{number}@example.com"},
        )
        response.raise_for_status()
        made = response.json()
        return Purchase(number, made["membership_id"], made["webhook_ids"][0], asked, time.time())

    try:
        with ThreadPoolExecutor(connections, thread_name_prefix="buyer") as pool:
            start = time.monotonic()
            futures = []
            for index in range(count):
                delay = start + index / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                futures.append(pool.submit(buy, first + index))
            return [future.result() for future in futures]
    finally:
        for http in clients:
            http.close()
