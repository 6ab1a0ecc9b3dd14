"""Real processes: `serve --no-worker`, `worker`, the simulator and an SMTP sink; kill -9 and
SIGTERM in the middle of a cancellation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from sqlalchemy import select

from support.harness import (
    API_KEY,
    MESSAGE_PLAN,
    SECRET,
    STOCK_KEY,
    child_processes,
    free_port,
    service_environment,
    wait_for,
)
from whop_autocancel.cancellation.models import Cancellation
from whop_autocancel.db.engine import Database
from whop_autocancel.mail.models import Email
from whop_autocancel.mail.sink import SmtpSink
from whop_autocancel.orders.models import Order
from whop_autocancel.simulator import SimulatorServer

T = TypeVar("T")

pytestmark = pytest.mark.e2e


class Deployment:
    """A web process and worker processes sharing one SQLite database and queue."""

    def __init__(
        self, tmp_path: Path, simulator: SimulatorServer, sink: SmtpSink, **settings: str
    ) -> None:
        self.tmp_path = tmp_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        values = {
            "WHOP_API_URL": simulator.api_url,
            "SMTP_URL": sink.url,
            "CANCEL_DELAY": "0.2",
            "SWEEP_INTERVAL": "0.5",
            "STUCK_GRACE": "0.5",
            "RETRY_SCHEDULE": "0.5,1",
            "LOG_LEVEL": "DEBUG",
        }
        self.env = service_environment(tmp_path, **{**values, **settings})
        self.processes: list[subprocess.Popen[bytes]] = []
        self.database = Database(self.env["DATABASE_URL"])
        simulator.state.set_webhook_url(f"{self.url}/webhooks/whop")

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        log = (self.tmp_path / f"{args[0]}-{len(self.processes)}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "whop_autocancel", *args],
            env=self.env,
            cwd=self.tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.processes.append(process)
        return process

    def start_web(self, *options: str) -> subprocess.Popen[bytes]:
        process = self.start("serve", "--no-worker", "--port", str(self.port), *options)

        def healthy() -> bool:
            try:
                return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 30, "the web process")
        return process

    def cancellation(self, payment_id: str) -> Cancellation | None:
        with self.database.transaction() as session:
            order = session.scalars(
                select(Order).where(Order.whop_payment_id == payment_id)
            ).first()
            if order is None:
                return None
            return session.scalars(
                select(Cancellation).where(Cancellation.order_id == order.id)
            ).first()

    def status(self, payment_id: str) -> str | None:
        row = self.cancellation(payment_id)
        return row.status if row else None

    def outbox_empty(self) -> bool:
        with self.database.transaction() as session:
            return session.scalars(select(Email.id).where(Email.sent_at.is_(None))).first() is None

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()
        self.database.dispose()


SMTP_PASSWORD = "smtp-pa55-do-not-log"
CHECKOUT_TOKEN = "checkout-token-do-not-log"


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    with SmtpSink(credentials=("shop", SMTP_PASSWORD)) as sink:
        yield sink


@pytest.fixture
def deployment(
    tmp_path: Path, smtp_sink: SmtpSink, backend_pair: dict[str, str]
) -> Iterator[tuple[Deployment, Any]]:
    with SimulatorServer(
        api_key=API_KEY, webhook_secret=SECRET, webhook_url=None, time_scale=0.01
    ) as simulator:
        deployment = Deployment(
            tmp_path,
            simulator,
            smtp_sink,
            **backend_pair,
            CANCEL_LEASE="3",
            WHOP_TIMEOUT="1.2",
            CHECKOUT_TOKEN=CHECKOUT_TOKEN,
            SMTP_URL=f"smtp://shop:{SMTP_PASSWORD}@127.0.0.1:{smtp_sink.port}",
        )
        deployment.start_web()
        try:
            yield deployment, simulator
        finally:
            deployment.stop()


def test_a_worker_killed_mid_cancellation_is_finished_by_the_sweep(
    deployment: tuple[Deployment, Any], smtp_sink: SmtpSink
) -> None:
    service, simulator = deployment
    simulator.state.set_latency(0.8)
    purchase = simulator.state.create_purchase(MESSAGE_PLAN, email="killed@example.com")
    worker = service.start("worker")
    wait_for(
        lambda: service.status(purchase["payment_id"]) == "running", 30, "the cancellation to start"
    )
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    simulator.state.set_latency(0)
    assert service.status(purchase["payment_id"]) == "running"  # stranded by the kill

    service.start("worker")
    wait_for(
        lambda: service.status(purchase["payment_id"]) == "canceled",
        30,
        "the new worker's sweep to finish the cancellation",
    )
    row = service.cancellation(purchase["payment_id"])
    assert row is not None
    assert row.generation == 1
    assert simulator.state.membership(purchase["membership_id"])["status"] == "canceled"
    posts = [c for c in simulator.state.calls(purchase["membership_id"]) if c["method"] == "POST"]
    assert {c["idempotency_key"] for c in posts} == {f"cancel-{row.idempotency_token}-1"}
    assert [c["status"] for c in posts][-1] == 200
    wait_for(service.outbox_empty, 15, "every email to be sent")
    assert len(smtp_sink.to("killed@example.com")) == 1  # delivered exactly once
    # One structured line per step, with its ids, and nothing secret in any process's log.
    logs = "".join(log.read_text() for log in service.tmp_path.glob("*.log"))
    for event in (
        "webhook_received",
        "payment_matched",
        "delivered",
        "cancel_attempt",
        "cancelled",
        "email_sent",
    ):
        assert f'"event": "{event}"' in logs
    assert purchase["membership_id"] in logs
    for secret in (API_KEY, SECRET, SMTP_PASSWORD, CHECKOUT_TOKEN, STOCK_KEY):
        assert secret not in logs


def test_sigterm_lets_the_running_cancellation_finish(
    deployment: tuple[Deployment, Any],
) -> None:
    service, simulator = deployment
    simulator.state.set_latency(1.0)
    purchase = simulator.state.create_purchase(MESSAGE_PLAN, email="graceful@example.com")
    worker = service.start("worker")
    wait_for(
        lambda: service.status(purchase["payment_id"]) == "running", 30, "the cancellation to start"
    )
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0
    assert service.status(purchase["payment_id"]) == "canceled"
    log = (service.tmp_path / "worker-1.log").read_text()
    assert '"worker_stopped"' in log


def test_the_demo_passes(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "whop_autocancel", "demo"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**service_environment(tmp_path), "COLUMNS": "160"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("PASS") == 9
    assert "FAIL" not in result.stdout
    assert "1 failed cancellation(s)" in result.stdout
    assert "pool empty → served after import" in result.stdout
    assert "Stock levels" in result.stdout  # the `stock levels` listing


def test_sigterm_on_web_finishes_the_request_in_flight(
    deployment: tuple[Deployment, Any],
) -> None:
    import threading

    service, simulator = deployment
    simulator.state.set_latency(1.5)  # the checkout's Whop call is slow
    web = service.processes[0]
    answers: list[int] = []

    def checkout() -> None:
        response = httpx.post(
            f"{service.url}/api/checkouts",
            json={"plan_id": MESSAGE_PLAN},
            headers={"Authorization": f"Bearer {CHECKOUT_TOKEN}"},
            timeout=30,
        )
        answers.append(response.status_code)

    simulator.state.create_plan(MESSAGE_PLAN)
    request = threading.Thread(target=checkout)
    request.start()

    def order_created() -> bool:  # the order is stored just before the slow Whop call
        with service.database.transaction() as session:
            return session.scalars(select(Order.id)).first() is not None

    wait_for(order_created, 10, "the checkout to reach its Whop call")
    web.send_signal(signal.SIGTERM)
    request.join(timeout=30)
    assert answers == [201]
    web.wait(timeout=30)
    assert web.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once done


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _cancelled(service: Deployment, simulator: SimulatorServer, email: str) -> None:
    purchase = simulator.state.create_purchase(MESSAGE_PLAN, email=email)
    wait_for(lambda: service.status(purchase["payment_id"]) == "canceled", 30, f"{email}'s cancel")


@pytest.fixture
def sqlite_service(tmp_path: Path, smtp_sink: SmtpSink) -> Iterator[tuple[Deployment, Any]]:
    with _sqlite_deployment(tmp_path, smtp_sink) as started:
        yield started


@contextmanager
def _sqlite_deployment(
    tmp_path: Path, smtp_sink: SmtpSink, **settings: str
) -> Iterator[tuple[Deployment, Any]]:
    """A simulator and a SQLite deployment with `settings`; every process it started, and
    every worker those started, gone afterwards."""
    with SimulatorServer(
        api_key=API_KEY, webhook_secret=SECRET, webhook_url=None, time_scale=0.01
    ) as simulator:
        service = Deployment(tmp_path, simulator, smtp_sink, **settings)
        try:
            yield service, simulator
        finally:
            for process in service.processes:
                for child in child_processes(process.pid):
                    os.kill(child, signal.SIGKILL)
            service.stop()


def test_serve_keeps_its_worker_processes_running_and_stops_them_with_it(
    sqlite_service: tuple[Deployment, Any],
) -> None:
    """`serve --workers 1` on SQLite: the child does the work (this serve runs no worker of
    its own), is started again when it dies, and stops gracefully with serve."""
    service, simulator = sqlite_service
    serve = service.start_web("--workers", "1")
    _cancelled(service, simulator, "first@example.com")
    [child] = child_processes(serve.pid)
    os.kill(child, signal.SIGKILL)
    wait_for(lambda: child_processes(serve.pid) not in ([], [child]), 30, "a new worker process")
    [again] = child_processes(serve.pid)
    _cancelled(service, simulator, "second@example.com")

    serve.send_signal(signal.SIGTERM)
    assert serve.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
    assert not _alive(again)  # stopped and waited for by serve
    log = (service.tmp_path / "serve-0.log").read_text()
    assert '"serve_worker_exited"' in log
    assert log.count('"serve_worker_started"') == 2
    assert log.count('"worker_stopped"') == 1  # the second child, gracefully


def _per_thread(pid: int, read: Callable[[int], T]) -> set[T]:
    """`read` of each thread of process `pid` (one value when all agree); a thread that ended
    between the listing and its read is left out (the process starts and ends threads as it
    works: an executor's, a request's)."""
    found: set[T] = set()
    for thread in Path(f"/proc/{pid}/task").iterdir():
        try:
            found.add(read(int(thread.name)))
        except ProcessLookupError:
            continue
    return found


def _cpus(pid: int) -> set[frozenset[int]]:
    """The CPUs each thread of process `pid` may run on (one set when all agree)."""
    return _per_thread(pid, lambda thread: frozenset(os.sched_getaffinity(thread)))


def _policies(pid: int) -> set[int]:
    """The scheduling policy of each thread of process `pid` (one when all agree)."""
    return _per_thread(pid, os.sched_getscheduler)


def _worker_slot(pid: int) -> str:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next(v.decode() for v in environ if v.startswith(b"CPU_AFFINITY=")).split("=")[1]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to pin to")
def test_serve_pins_itself_and_its_workers_each_to_a_cpu_of_its_own(
    sqlite_service: tuple[Deployment, Any],
) -> None:
    """CPU_AFFINITY=auto: `serve --workers 2` takes the first CPU this process may use, its
    first worker the next; with only two CPUs the second worker is left to the kernel (on
    every CPU, not on serve's, whose thread started it). Every thread, the ones started after
    the pinning included."""
    service, simulator = sqlite_service
    allowed = sorted(os.sched_getaffinity(0))
    serve = service.start_web("--workers", "2")
    log_file = service.tmp_path / "serve-0.log"
    wait_for(lambda: log_file.read_text().count('"worker_started"') == 2, 30, "two workers")
    _cancelled(service, simulator, "pinned@example.com")  # the threads a purchase needs
    assert _cpus(serve.pid) == {frozenset({allowed[0]})}
    children = {_worker_slot(pid): pid for pid in child_processes(serve.pid)}
    assert _cpus(children[str(allowed[1])]) == {frozenset({allowed[1]})}
    second = allowed[2] if len(allowed) > 2 else None
    expected = frozenset({second}) if second is not None else frozenset(allowed)
    assert _cpus(children[str(second) if second is not None else "off"]) == {expected}
    assert '"cpu": ' + str(allowed[0]) in log_file.read_text()  # serve_starting says so
    # On one CPU, a thread woken by another of its process does not preempt it (affinity.py);
    # a process left to the kernel keeps the usual policy.
    assert _policies(serve.pid) == {os.SCHED_BATCH}
    assert _policies(children[str(allowed[1])]) == {os.SCHED_BATCH}
    if second is None:
        assert _policies(children["off"]) == {os.SCHED_OTHER}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: nothing to pin apart")
def test_cpu_affinity_off_pins_nothing(tmp_path: Path, smtp_sink: SmtpSink) -> None:
    with _sqlite_deployment(tmp_path, smtp_sink, CPU_AFFINITY="off") as (service, _):
        serve = service.start_web("--workers", "1")  # (auto would pin both)
        wait_for(lambda: len(child_processes(serve.pid)) == 1, 30, "the worker")
        [child] = child_processes(serve.pid)
        everywhere = {frozenset(os.sched_getaffinity(0))}
        assert _cpus(serve.pid) == everywhere
        wait_for(lambda: _cpus(child) == everywhere, 30, "the worker's threads")
        assert _policies(serve.pid) == _policies(child) == {os.SCHED_OTHER}


def test_a_killed_serve_takes_its_worker_processes_with_it(
    sqlite_service: tuple[Deployment, Any],
) -> None:
    service, _ = sqlite_service
    serve = service.start_web("--workers", "2")
    log_file = service.tmp_path / "serve-0.log"
    wait_for(lambda: log_file.read_text().count('"worker_started"') == 2, 30, "two workers")
    children = child_processes(serve.pid)
    assert len(children) == 2
    serve.send_signal(signal.SIGKILL)
    serve.wait()
    wait_for(lambda: not any(_alive(child) for child in children), 30, "the workers to stop")
    log = log_file.read_text()
    assert log.count('"serve_gone_worker_stopping"') == 2
    assert log.count('"worker_stopped"') == 2  # gracefully, not killed
