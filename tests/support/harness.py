"""Real parts for tests: a migrated SQLite file, the runtime, a uvicorn server on loopback,
and a helper that runs what the queue holds (huey's own execute, no mock)."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from whop_autocancel.app import create_app
from whop_autocancel.clock import Clock
from whop_autocancel.db.engine import Database
from whop_autocancel.runtime import Runtime, build_runtime
from whop_autocancel.schema.migrate import upgrade
from whop_autocancel.settings import Settings, load_settings
from whop_autocancel.webhooks.inbox import APPLY_TASK
from whop_autocancel.webhooks.verify import sign

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "whop"
SOURCE = Path(__file__).resolve().parents[2] / "src"  # this checkout's code
SECRET = "ws_test_50dae1dbeb27407677a6ea1040bf04e124226ffda08"
API_KEY = "sim_test_key_do_not_log_7781"
ADMIN = "admin@shop.test"
MESSAGE_PLAN = "plan_Message1"
NONE_PLAN = "plan_NoneDelivery1"
KEEP_PLAN = "plan_KeepMembership1"
UNLISTED_PLAN = "plan_Unlisted1"
STOCK_PLAN = "plan_Stock1"
STOCK_POOL = "keys"
# A fixed Fernet key for tests (never a production key).
STOCK_KEY = "TyjXqm3540C7ZKIhDUizLMzTcmCByiRbCwTGU4w4hfY="

CATALOG = f"""
[plans.{MESSAGE_PLAN}]
name = "Test Pack"
delivery = "message"
message = "Here is your pack, order {{{{ order_id }}}}."
link = "https://example.com/pack"

[plans.{NONE_PLAN}]
name = "Setup call"
delivery = "none"

[plans.{KEEP_PLAN}]
name = "Lifetime access"
delivery = "message"
message = "Welcome."
cancel = false
"""

# The test catalog plus a stock plan (write it to tmp_path/catalog.toml before make_settings or
# service_environment to use it).
STOCK_CATALOG = (
    CATALOG
    + f"""
[plans.{STOCK_PLAN}]
name = "Game account"
delivery = "stock:{STOCK_POOL}"
message = "Log in at https://game.example and change the password."
on_refund = "void"

[pools.{STOCK_POOL}]
low_stock = 2
"""
)


def wait_for(
    check: Callable[[], bool],
    seconds: float = 10.0,
    what: str = "the condition",
    every: float = 0.02,
) -> None:
    """Poll `check` until it holds (a state wait, never a fixed sleep); fail naming `what`
    after `seconds`."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        time.sleep(every)


def child_processes(pid: int) -> list[int]:
    """The live child processes of `pid` (from /proc: a zombie is not alive)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, parent = stat.rsplit(")", 1)[1].split()[:2]
        if int(parent) == pid and state != "Z":
            found.append(int(entry.name))
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    catalog = tmp_path / "catalog.toml"
    if not catalog.exists():
        catalog.write_text(CATALOG)
    values: dict[str, Any] = {
        "WHOP_API_KEY": API_KEY,
        "WHOP_WEBHOOK_SECRET": SECRET,
        "WHOP_API_URL": "http://127.0.0.1:9/api/v1",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'service.db'}",
        "QUEUE_URL": f"sqlite:///{tmp_path / 'queue.db'}",
        "ADMIN_EMAILS": ADMIN,
        "MAIL_FROM": "shop@shop.test",
        "SMTP_URL": "smtp://127.0.0.1:9",
        "CATALOG_PATH": str(catalog),
        "STOCK_ENCRYPTION_KEY": STOCK_KEY,
        "CANCEL_DELAY": 5,
        "WHOP_TIMEOUT": 5,
        "WHOP_RATE_LIMIT": 1000,  # pacing has its own tests; here it must never be the wait
        "WHOP_RATE_BURST": 100,
        "LOG_FORMAT": "console",
    }
    values.update(overrides)
    return load_settings(_env_file=None, **values)  # a developer's .env must not leak in


def make_runtime(settings: Settings, clock: Clock | None = None) -> Runtime:
    database = Database(settings.DATABASE_URL)
    upgrade(database)
    database.dispose()
    return build_runtime(settings, clock=clock)


def drain(
    runtime: Runtime,
    *,
    include_scheduled: bool = False,
    rounds: int = 50,
    execute: Callable[[Any, datetime | None], None] | None = None,
) -> int:
    """Run what the queue holds now, like a consumer would (huey's own `execute`, or
    `execute(task, timestamp)` when given: bench/purchase_cpu.py times each job). Scheduled
    (delayed) tasks run too when asked: the services check due times with the test's clock."""
    huey = runtime.jobs.huey
    executed = 0
    for _ in range(rounds):
        tasks = []
        while (task := huey.dequeue()) is not None:
            tasks.append((task, None))  # a task due later (real time) goes to the schedule
        if include_scheduled:
            # As of its own eta: huey would put it back on the schedule; the services check
            # due times with the test's clock instead.
            tasks.extend((task, task.eta) for task in huey.read_schedule(datetime(9999, 1, 1)))
        if not tasks:
            return executed
        for task, timestamp in tasks:
            if execute is None:
                huey.execute(task, timestamp=timestamp)
            else:
                execute(task, timestamp)
            executed += 1
    raise AssertionError("queue did not drain")


def apply_webhooks(runtime: Runtime) -> int:
    """Run the queued `webhooks.apply` jobs, and only those, like a consumer would (huey's own
    `execute`): the stored webhooks are applied, and every other job (those queued before, and
    the follow-ups the apply enqueues) stays queued, in order. Returns how many ran."""
    huey = runtime.jobs.huey
    kept = []
    ran = 0
    while (task := huey.dequeue()) is not None:
        if task.name == APPLY_TASK:
            huey.execute(task)
            ran += 1
        else:
            kept.append(task)
    for task in kept:
        huey.enqueue(task)
    return ran


class ServiceServer:
    """The web app under uvicorn on a free loopback port, in a thread."""

    def __init__(self, runtime: Runtime, *, with_worker: bool = False) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            create_app(runtime, with_worker=with_worker),
            host="127.0.0.1",
            port=self.port,
            log_config=None,
            access_log=False,
            lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServiceServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("service did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    @contextmanager
    def running(self) -> Iterator[ServiceServer]:
        self.start()
        try:
            yield self
        finally:
            self.stop()


def fixture_body(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def event_body(name: str, **changes: Any) -> bytes:
    """A fixture envelope with a fresh id, and `data` fields replaced by `changes`."""
    document = json.loads(fixture_body(name))
    document["id"] = f"msg_{uuid.uuid4().hex[:20]}"
    document["data"].update(changes)
    return json.dumps(document).encode()


def claim_event(
    kind: str,
    payment_id: str,
    status: str | None = "pending",
    *,
    claim_id: str | None = None,
    event: str | None = None,
) -> bytes:
    """Whop's webhook of a `refund` or `dispute` of a whole payment (WHOP.md): its id (fresh
    unless given), `status` (left out when None), amount, reason and payment. `event`:
    `created` or `updated`; by default `created` while pending, `updated` after."""
    data: dict[str, Any] = {
        "id": claim_id or f"{kind[:2]}_{uuid.uuid4().hex[:10]}",
        "amount": 25.0,
        "reason": "requested",
        "payment": {"id": payment_id},
    }
    if status is not None:
        data["status"] = status
    event = event or ("created" if status == "pending" else "updated")
    body = {"id": f"msg_{uuid.uuid4().hex}", "type": f"{kind}.{event}", "data": data}
    return json.dumps(body).encode()


def signed_headers(
    body: bytes, *, secret: str = SECRET, at: datetime | None = None, webhook_id: str | None = None
) -> dict[str, str]:
    webhook_id = webhook_id or json.loads(body).get("id") or f"msg_{uuid.uuid4().hex}"
    return sign(body, webhook_id, at or datetime.now(UTC), secret.encode())


def post_event(client: httpx.Client, body: bytes, **options: Any) -> httpx.Response:
    return client.post("/webhooks/whop", content=body, headers=signed_headers(body, **options))


def deliver_event(
    runtime: Runtime, client: httpx.Client, body: bytes, **options: Any
) -> httpx.Response:
    """Post a signed webhook as Whop does, then apply it as a worker does (`apply_webhooks`)."""
    response = post_event(client, body, **options)
    apply_webhooks(runtime)
    return response


def child_pythonpath() -> str:
    """`PYTHONPATH` for a child process, which runs in a directory of its own: this checkout's
    `src` first (the code under test or measurement, whatever the virtualenv's install points
    at), then this process's own entries, made absolute."""
    import os

    entries = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    return os.pathsep.join([str(SOURCE), *(str(Path(entry).resolve()) for entry in entries)])


def service_environment(tmp_path: Path, **overrides: str) -> dict[str, str]:
    """Environment for a `whop-autocancel` child process (nothing inherited that configures it)."""
    import os

    catalog = tmp_path / "catalog.toml"
    if not catalog.exists():
        catalog.write_text(CATALOG)
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(
            ("WHOP_", "SMTP_", "DATABASE_", "QUEUE_", "CANCEL_", "ADMIN_", "STOCK_", "EMAIL_")
        )
    }
    environment.update(
        {
            "WHOP_API_KEY": API_KEY,
            "WHOP_WEBHOOK_SECRET": SECRET,
            "WHOP_COMPANY_ID": "biz_SimStore",
            "DATABASE_URL": f"sqlite:///{tmp_path / 'service.db'}",
            "QUEUE_URL": f"sqlite:///{tmp_path / 'queue.db'}",
            "ADMIN_EMAILS": ADMIN,
            "MAIL_FROM": "shop@shop.test",
            "CATALOG_PATH": str(catalog),
            "STOCK_ENCRYPTION_KEY": STOCK_KEY,
            "LOG_FORMAT": "json",
            "PYTHONPATH": child_pythonpath(),
            "COLUMNS": "200",
            "WHOP_RATE_LIMIT": "100",  # pacing has its own tests; here it must never be the wait
            "WHOP_RATE_BURST": "50",
        }
    )
    environment.update(overrides)
    return environment


def run_cli(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> Any:
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "whop_autocancel", *args],
        env=env if env is not None else service_environment(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
