"""The concurrency proof (issue: scale-out): two web processes and three workers share one
database and queue; every purchase's webhooks arrive concurrently at both web processes (each
duplicated to the other), with `membership.activated` racing the payment. Used by the e2e test
(small) and by bench/concurrency.py (large)."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

from support.harness import (
    API_KEY,
    FIXTURES,
    MESSAGE_PLAN,
    SECRET,
    free_port,
    service_environment,
    signed_headers,
)
from whop_autocancel.cancellation.models import Cancellation
from whop_autocancel.db.engine import Database
from whop_autocancel.mail.models import Email
from whop_autocancel.mail.sink import SmtpSink
from whop_autocancel.orders.models import Order
from whop_autocancel.simulator import SimulatorServer


@dataclass
class Result:
    purchases: int
    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    orders: int = 0
    orders_with_payment: int = 0
    distinct_payments: int = 0
    delivery_emails: int = 0
    buyers_with_one_delivery: int = 0
    canceled: int = 0
    memberships_cancelled_once: int = 0
    successful_cancel_calls: int = 0
    conflicts_retried: int = 0
    redeliveries: int = 0
    seconds: float = 0.0
    send_seconds: float = 0.0

    def table(self) -> str:
        rows = [
            ("purchases", self.purchases),
            ("webhook requests sent", self.requests),
            ("answers", dict(sorted(self.statuses.items()))),
            ("orders", self.orders),
            (
                "orders with a payment / distinct payments",
                (self.orders_with_payment, self.distinct_payments),
            ),
            (
                "delivery emails / buyers with exactly one",
                (self.delivery_emails, self.buyers_with_one_delivery),
            ),
            ("cancellations canceled", self.canceled),
            ("successful cancel calls", self.successful_cancel_calls),
            ("memberships cancelled exactly once", self.memberships_cancelled_once),
            ("deadlocks/conflicts retried", self.conflicts_retried),
            ("redeliveries after a broken connection", self.redeliveries),
            ("webhooks sent in (s)", round(self.send_seconds, 1)),
            ("all settled in (s)", round(self.seconds, 1)),
        ]
        return "\n".join(f"{name:45} {value}" for name, value in rows)


def _event(template: str, **data: Any) -> bytes:
    document = json.loads((FIXTURES / template).read_bytes())
    document["id"] = f"msg_{uuid.uuid4().hex}"
    document["data"].update(data)
    return json.dumps(document).encode()


def _bodies(purchase: dict[str, Any], email: str) -> tuple[bytes, bytes]:
    now = datetime.now(UTC)
    user = {"id": purchase["user_id"], "username": "buyer", "name": "Buyer", "email": email}
    payment = _event(
        "payment.succeeded.legacy.json",
        id=purchase["payment_id"],
        membership={"id": purchase["membership_id"], "status": "completed"},
        plan={"id": MESSAGE_PLAN, "metadata": {}},
        user=user,
        metadata={},
        checkout_configuration_id=None,
        created_at=(now - timedelta(seconds=5)).isoformat().replace("+00:00", "Z"),
        paid_at=now.isoformat().replace("+00:00", "Z"),
    )
    activation = _event(
        "membership.activated.legacy.json",
        id=purchase["membership_id"],
        plan={"id": MESSAGE_PLAN, "metadata": {}},
        user=user,
        metadata={},
        checkout_configuration_id=None,
    )
    return payment, activation


def run(
    tmp_path: Path, backend: dict[str, str], purchases: int, *, settle_seconds: float = 300
) -> Result:
    """Start 2 web + 3 worker processes, send every webhook concurrently, wait, count."""
    result = Result(purchases=purchases)
    with (
        SmtpSink() as sink,
        SimulatorServer(
            api_key=API_KEY, webhook_secret=SECRET, webhook_url=None, time_scale=0.01
        ) as simulator,
    ):
        simulator.state.create_plan(MESSAGE_PLAN)
        env = service_environment(
            tmp_path,
            **{
                **backend,
                "WHOP_API_URL": simulator.api_url,
                "SMTP_URL": sink.url,
                "CANCEL_DELAY": "0.5",
                "SWEEP_INTERVAL": "2",
                "STUCK_GRACE": "10",
                "RETRY_SCHEDULE": "0.5,1,2",
                "WORKER_THREADS": "4",
                "LOG_LEVEL": "INFO",
                "CHECKOUT_RATE_LIMIT": "off",
            },
        )
        ports = [free_port(), free_port()]
        processes: list[subprocess.Popen[bytes]] = []
        logs: list[Path] = []

        def start(*args: str) -> None:
            log = tmp_path / f"{args[0]}-{len(processes)}.log"
            logs.append(log)
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "whop_autocancel", *args],
                    env=env,
                    cwd=tmp_path,
                    stdout=log.open("wb"),
                    stderr=subprocess.STDOUT,
                )
            )

        database = Database(backend["DATABASE_URL"])
        try:
            for port in ports:
                start("serve", "--no-worker", "--port", str(port))
            for _ in range(3):
                start("worker")
            urls = [f"http://127.0.0.1:{port}/webhooks/whop" for port in ports]
            _wait_healthy(ports)

            made = [
                simulator.state.create_purchase(
                    MESSAGE_PLAN, email=f"buyer{n}@example.com", send_webhooks=False
                )
                for n in range(purchases)
            ]
            sends: list[tuple[str, bytes]] = []
            early: list[tuple[str, bytes]] = []
            rng = random.Random(7)
            for number, purchase in enumerate(made):
                payment, activation = _bodies(purchase, f"buyer{number}@example.com")
                first, other = rng.sample(urls, 2)
                sends += [(first, payment), (other, payment)]  # the duplicate to the other
                (early if number % 3 == 0 else sends).append((rng.choice(urls), activation))
            rng.shuffle(sends)
            started = time.monotonic()
            lock = threading.Lock()
            with (
                httpx.Client(timeout=30, limits=httpx.Limits(max_connections=64)) as http,
                ThreadPoolExecutor(max_workers=32) as pool,
            ):

                def post(item: tuple[str, bytes]) -> int:
                    """Send like Whop: a connection that breaks is delivered again."""
                    url, body = item
                    for attempt in range(3):
                        try:
                            return http.post(
                                url, content=body, headers=signed_headers(body)
                            ).status_code
                        except httpx.TransportError:
                            if attempt == 2:
                                raise
                            with lock:
                                result.redeliveries += 1
                    raise AssertionError("unreachable")

                # A third of the activations go first; the rest race their payments.
                statuses = list(pool.map(post, early)) + list(pool.map(post, sends))
            result.send_seconds = time.monotonic() - started
            result.requests = len(statuses)
            result.statuses = Counter(statuses)

            def settled() -> bool:
                with database.transaction() as session:
                    done = session.scalar(
                        select(func.count())
                        .select_from(Cancellation)
                        .where(
                            Cancellation.status.in_(
                                ["canceled", "already_inactive", "failed", "skipped"]
                            )
                        )
                    )
                    unsent = session.scalar(
                        select(func.count()).select_from(Email).where(Email.sent_at.is_(None))
                    )
                return done == purchases and unsent == 0

            deadline = time.monotonic() + settle_seconds
            while not settled():
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            result.seconds = time.monotonic() - started
            with database.transaction() as session:
                result.orders = session.scalar(select(func.count()).select_from(Order)) or 0
                result.orders_with_payment = (
                    session.scalar(
                        select(func.count())
                        .select_from(Order)
                        .where(Order.whop_payment_id.is_not(None))
                    )
                    or 0
                )
                result.distinct_payments = (
                    session.scalar(select(func.count(func.distinct(Order.whop_payment_id)))) or 0
                )
                result.delivery_emails = (
                    session.scalar(
                        select(func.count()).select_from(Email).where(Email.kind == "delivery")
                    )
                    or 0
                )
                result.canceled = (
                    session.scalar(
                        select(func.count())
                        .select_from(Cancellation)
                        .where(Cancellation.status == "canceled")
                    )
                    or 0
                )
            per_buyer = Counter(rcpt for m in sink.messages for rcpt in m.recipients)
            result.buyers_with_one_delivery = sum(
                1 for n in range(purchases) if per_buyer[f"buyer{n}@example.com"] == 1
            )
            calls = Counter(
                c["membership_id"]
                for c in simulator.state.calls()
                if c["method"] == "POST" and c["status"] == 200 and not c["replayed"]
            )
            result.successful_cancel_calls = sum(calls.values())
            result.memberships_cancelled_once = sum(
                1 for p in made if calls[p["membership_id"]] == 1
            )
        finally:
            for process in processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for process in processes:
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
            database.dispose()
        result.conflicts_retried = sum(
            len(re.findall(r'"event": "db_conflict_retried"', log.read_text())) for log in logs
        )
    return result


def _wait_healthy(ports: list[int]) -> None:
    deadline = time.monotonic() + 60
    for port in ports:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("web processes did not start")
            time.sleep(0.1)
