"""A small deployment for chaos tests: the Whop simulator, an SMTP sink, web processes
(`serve --no-worker`) and worker processes over one SQLite database and one SQLite queue
(files in the test's tmp_path), with the production schedule made fast. Helpers buy, wait on
database state, count, kill -9 and restart workers, and print a table of counts."""

from __future__ import annotations

import functools
import re
import signal
import subprocess
import sys
from collections import Counter
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from sqlalchemy import func, select

from support.harness import (
    ADMIN,
    API_KEY,
    MESSAGE_PLAN,
    SECRET,
    free_port,
    service_environment,
    wait_for,
)
from support.reporting import show
from whop_autocancel.alerts.models import Alert
from whop_autocancel.cancellation.models import FINAL_STATUSES, Cancellation
from whop_autocancel.db.engine import Database
from whop_autocancel.mail.models import Email
from whop_autocancel.mail.outbox import SEND_BATCH
from whop_autocancel.mail.sink import SmtpSink
from whop_autocancel.orders.models import Order
from whop_autocancel.simulator import SimulatorServer

#: The production schedule, made fast (seconds).
FAST = {
    "CANCEL_DELAY": "0.2",
    "RETRY_SCHEDULE": "0.3,0.6,1",
    "SWEEP_INTERVAL": "0.5",
    "STUCK_GRACE": "1",
    "CANCEL_LEASE": "3",
    "WHOP_TIMEOUT": "1",
    "ALERT_THROTTLE": "600",
    "WORKER_THREADS": "4",
    "LOG_LEVEL": "INFO",
    "CHECKOUT_RATE_LIMIT": "off",
    "SMTP_TIMEOUT": "2",  # an email held by a killed worker is free again after 3x + 5 s
}
#: Emails a kill -9 can make go twice (SMTP is at least once): a worker killed after the server
#: took a batch's messages but before their `sent_at` was written sends those rows again once
#: their lease runs out: at most the batches in flight, one per job thread.
RESENDS_PER_KILL = int(FAST["WORKER_THREADS"]) * SEND_BATCH
FINAL = sorted(status.value for status in FINAL_STATUSES)
# Polls database files shared with the processes under test: every 0.1 s is often enough.
wait = functools.partial(wait_for, every=0.1)


def parse_at(value: str) -> datetime:
    """A simulator call's recorded `at` (ISO 8601, `Z` or offset)."""
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def report(name: str, counts: dict[str, Any]) -> None:
    """Print the counts of a scenario as a small table, past pytest's capture so that every
    run (CI included) shows them."""
    width = max(len(key) for key in counts) + 2
    lines = [
        f"\n== chaos: {name} ==",
        *(f"  {key:{width}} {value}" for key, value in counts.items()),
    ]
    show("\n".join(lines))


class Cluster:
    """`with Cluster(tmp_path, workers=2) as cluster:` — everything real, on loopback."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        web: int = 1,
        workers: int = 1,
        time_scale: float = 0.01,
        **settings: str,
    ) -> None:
        self.tmp_path = tmp_path
        self.sink = SmtpSink()
        self.simulator = SimulatorServer(
            api_key=API_KEY, webhook_secret=SECRET, webhook_url=None, time_scale=time_scale
        )
        self._web_count = web
        self._worker_count = workers
        self._settings = settings
        self.web: list[subprocess.Popen[bytes]] = []
        self.workers: list[subprocess.Popen[bytes]] = []
        self._dead: list[subprocess.Popen[bytes]] = []
        self.ports = [free_port() for _ in range(web)]
        self.purchases: list[dict[str, Any]] = []
        self.kills = 0
        self._logs = 0
        self.env: dict[str, str] = {}
        self.database: Database | None = None

    # ----- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        self.sink.start()
        try:
            self.simulator.start()
            self.state.create_plan(MESSAGE_PLAN)
            self.env = service_environment(
                self.tmp_path,
                **{
                    **FAST,
                    "WHOP_API_URL": self.simulator.api_url,
                    "SMTP_URL": self.sink.url,
                    **self._settings,
                },
            )
            self.database = Database(self.env["DATABASE_URL"])
            for port in self.ports:
                self.web.append(self._spawn("serve", "--no-worker", "--port", str(port)))
            for port in self.ports:
                wait(functools.partial(_healthy, port), 60, f"the web process on {port}")
            self.state.set_webhook_url(self.webhook_urls[0])
            for _ in range(self._worker_count):
                self.start_worker()
            # The first tick of a worker sweeps Whop: let it finish before the scenario starts,
            # so that its calls are not mixed with the scenario's faults.
            wait(lambda: '"event": "whop_sweep"' in self.logs(), 60, "the first Whop sweep")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for process in [*self.web, *self.workers]:
            if process.poll() is None:
                process.kill()
        for process in [*self.web, *self.workers, *self._dead]:
            process.wait()
        if self.database is not None:
            self.database.dispose()
        self.simulator.stop()
        self.sink.stop()

    def _spawn(self, *args: str) -> subprocess.Popen[bytes]:
        self._logs += 1
        log = (self.tmp_path / f"{args[0]}-{self._logs}.log").open("wb")
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "whop_autocancel", *args],
                env=self.env,
                cwd=self.tmp_path,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            log.close()

    @property
    def state(self) -> Any:
        return self.simulator.state

    @property
    def webhook_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}/webhooks/whop" for port in self.ports]

    def start_worker(self) -> subprocess.Popen[bytes]:
        process = self._spawn("worker")
        self.workers.append(process)
        return process

    def kill_worker(self, index: int) -> int:
        """SIGKILL worker `index` (no chance to clean up); returns its pid."""
        process = self.workers.pop(index)
        process.send_signal(signal.SIGKILL)
        process.wait()
        self._dead.append(process)
        self.kills += 1
        return process.pid

    def logs(self) -> str:
        return "".join(path.read_text() for path in sorted(self.tmp_path.glob("*.log")))

    # ----- purchases -------------------------------------------------------------------------

    def buy(
        self, n: int, *, send_webhooks: bool = True, plan: str = MESSAGE_PLAN
    ) -> list[dict[str, Any]]:
        """`n` purchases of `plan` (the message plan unless told), buyer<k>@example.com each
        (k counts on)."""
        made = []
        for _ in range(n):
            email = f"buyer{len(self.purchases)}@example.com"
            purchase = self.state.create_purchase(plan, email=email, send_webhooks=send_webhooks)
            purchase["email"] = email
            self.purchases.append(purchase)
            made.append(purchase)
        return made

    # ----- database ----------------------------------------------------------------------------

    def _db(self) -> Database:
        assert self.database is not None
        return self.database

    def count(self, model: Any, *where: Any) -> int:
        with self._db().transaction() as session:
            return int(session.scalar(select(func.count()).select_from(model).where(*where)) or 0)

    def cancellation_statuses(self) -> Counter[str]:
        with self._db().transaction() as session:
            rows = session.execute(
                select(Cancellation.status, func.count()).group_by(Cancellation.status)
            ).all()
        return Counter({status: int(n) for status, n in rows})

    def status_by_membership(self) -> dict[str | None, str]:
        """Each cancellation row's status, by the membership it names."""
        with self._db().transaction() as session:
            rows = session.execute(select(Cancellation.membership_id, Cancellation.status)).all()
        return {membership_id: status for membership_id, status in rows}

    def cancellations(self) -> list[Cancellation]:
        with self._db().transaction() as session:
            rows = list(session.scalars(select(Cancellation)))
            session.expunge_all()
        return rows

    def alerts(self, kind: str | None = None) -> list[Alert]:
        with self._db().transaction() as session:
            query = select(Alert).order_by(Alert.id)
            if kind is not None:
                query = query.where(Alert.kind == kind)
            rows = list(session.scalars(query))
            session.expunge_all()
        return rows

    def emails(self) -> list[Email]:
        with self._db().transaction() as session:
            rows = list(session.scalars(select(Email).order_by(Email.id)))
            session.expunge_all()
        return rows

    def orders(self) -> int:
        return self.count(Order)

    def unsent(self) -> int:
        return self.count(Email, Email.sent_at.is_(None))

    def count_status(self, status: str) -> int:
        return self.count(Cancellation, Cancellation.status == status)

    def final(self) -> int:
        return self.count(Cancellation, Cancellation.status.in_(FINAL))

    def settled(self, purchases: int | None = None) -> bool:
        """Every purchase has a final cancellation and the outbox is empty."""
        expected = len(self.purchases) if purchases is None else purchases
        return self.final() == expected and self.unsent() == 0

    def running_owners(self) -> set[int]:
        """Pids of the workers holding a `running` cancellation now."""
        with self._db().transaction() as session:
            owners = session.scalars(
                select(Cancellation.lease_owner).where(Cancellation.status == "running")
            ).all()
        return {int(owner.split(":")[1]) for owner in owners if owner}

    # ----- the simulator's view ----------------------------------------------------------------

    def cancel_calls(self) -> list[dict[str, Any]]:
        return [
            c
            for c in self.state.calls()
            if c["method"] == "POST" and str(c["path"]).endswith("/cancel")
        ]

    def fresh_cancels(self) -> Counter[str]:
        """Cancel calls per membership that Whop carried out (not a replay of a stored answer):
        a 200, or a simulated timeout (carried out, then answered 504 late)."""
        return Counter(
            c["membership_id"]
            for c in self.cancel_calls()
            if not c["replayed"] and (c["status"] == 200 or c["timed_out"])
        )

    def canceled_at_whop(self) -> int:
        return sum(
            1
            for p in self.purchases
            if self.state.membership(p["membership_id"])["status"] == "canceled"
        )

    def delivery_counts(self) -> Counter[int]:
        """How many buyers got 0, 1, 2… emails in the sink."""
        per = Counter(r for m in self.sink.messages for r in m.recipients)
        return Counter(per[p["email"]] for p in self.purchases)

    def outbox_ids(self) -> dict[str, set[str]]:
        """Per buyer, the outbox rows (in each Message-ID) of what the sink received."""
        per: dict[str, set[str]] = {}
        for message in self.sink.messages:
            found = re.search(r"<whop-autocancel\.(\d+)\.", str(message.message["Message-ID"]))
            for rcpt in message.recipients:
                per.setdefault(rcpt, set()).add(found.group(1) if found else "?")
        return per

    def duplicates(self) -> dict[str, list[str]]:
        """Buyers who received more than one message: their Message-IDs."""
        per: dict[str, list[str]] = {}
        for message in self.sink.messages:
            for rcpt in message.recipients:
                per.setdefault(rcpt, []).append(str(message.message["Message-ID"]))
        return {rcpt: ids for rcpt, ids in per.items() if len(ids) > 1 and rcpt != ADMIN}

    def admin_messages(self) -> int:
        return len(self.sink.to(ADMIN))


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
