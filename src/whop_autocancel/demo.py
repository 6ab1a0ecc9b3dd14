"""`whop-autocancel demo`: the whole after-purchase job, for real, in under a minute.

It starts the Whop simulator and an SMTP sink in this process, runs `whop-autocancel serve` as
a real child process on a temporary SQLite database, makes a dozen purchases (both webhook
shapes, a duplicate, a renewal, an unlisted plan, a delivery-only plan, a membership Whop
refuses to cancel, and a Whop outage in the middle), waits until everything has settled and
prints what happened to each. It exits 0 only if every outcome is the expected one.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.engine import make_url

from whop_autocancel.alerts.models import Alert
from whop_autocancel.cancellation.models import FINAL_STATUSES, Cancellation
from whop_autocancel.db.engine import Database
from whop_autocancel.mail.models import Email
from whop_autocancel.mail.sink import SmtpSink, free_port
from whop_autocancel.orders.models import Order
from whop_autocancel.settings import load_settings
from whop_autocancel.simulator import SimulatorServer

API_KEY = "sim_demo_key"
SECRET = "ws_demo_0f3a9c27e4b14d8fa6c2b5e81d907a3c"  # noqa: S105 (the demo's own simulator)
ADMIN = "admin@demo-shop.test"
PACK, SETUP, KEEP, MONTHLY, LIFETIME = (
    "plan_DemoPack",
    "plan_DemoSetup",
    "plan_DemoKeep",
    "plan_DemoMonthly",
    "plan_DemoLifetime",
)
SETTLE_SECONDS = 40.0
OUTAGE_LIMIT = 30.0

CATALOG = f"""
[plans.{PACK}]
name = "Demo Download Pack"
delivery = "message"
subject = "Your download: {{{{ plan_name }}}}"
message = "Thanks for buying! Your order is {{{{ order_id }}}}."
link = "https://example.com/download/pack"

[plans.{SETUP}]
name = "Demo Setup Call"
delivery = "none"

[plans.{KEEP}]
name = "Demo Lifetime Role"
delivery = "message"
message = "Welcome! Your role stays active."
cancel = false

# Listed by mistake: it is a subscription. The safety rule keeps it untouched.
[plans.{MONTHLY}]
name = "Demo Monthly"
delivery = "none"
"""


@dataclass
class Purchase:
    number: int
    scenario: str
    plan_id: str
    expect_cancel: str  # "canceled", "failed" or "untouched"
    options: dict[str, Any] = field(default_factory=dict)
    payment_id: str = ""
    membership_id: str = ""
    email: str = ""


@dataclass
class Outcome:
    order_status: str
    deliveries: int
    cancellation: str
    membership: str
    cancel_calls: str
    ok: bool


def _purchases() -> list[Purchase]:
    return [
        Purchase(1, "legacy webhook, email", PACK, "canceled"),
        Purchase(2, "pinned webhook, email", PACK, "canceled", {"shape": "pinned"}),
        Purchase(3, "delivery = none", SETUP, "canceled"),
        Purchase(4, "webhook sent twice", PACK, "canceled", {"duplicate_payment_webhook": True}),
        Purchase(
            5,
            "activation first",
            PACK,
            "canceled",
            {"activation_first": True, "shape": "pinned"},
        ),
        Purchase(
            6,
            "subscription renewal",
            MONTHLY,
            "untouched",
            {"billing_reason": "subscription_cycle"},
        ),
        Purchase(7, "plan not in catalog", LIFETIME, "untouched"),
        Purchase(8, "cancel = false plan", KEEP, "untouched"),
        Purchase(9, "Whop refuses cancel", PACK, "failed"),
        Purchase(10, "during Whop outage", PACK, "canceled"),
        Purchase(11, "during Whop outage", SETUP, "canceled", {"shape": "pinned"}),
        Purchase(12, "during Whop outage", PACK, "canceled"),
    ]


def _storage(folder: Path) -> dict[str, str]:
    """The caller's DATABASE_URL and QUEUE_URL when set (PostgreSQL, MariaDB, Redis), else
    temporary SQLite files; always a queue name of the demo's own."""
    return {
        "DATABASE_URL": os.environ.get("DATABASE_URL") or f"sqlite:///{folder / 'demo.db'}",
        "QUEUE_URL": os.environ.get("QUEUE_URL") or f"sqlite:///{folder / 'demo-queue.db'}",
        "QUEUE_NAME": f"whop-autocancel-demo-{folder.name[-8:]}",
    }


def _service_environment(
    folder: Path, simulator: SimulatorServer, sink: SmtpSink
) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("WHOP_", "SMTP_"))}
    environment.update(_storage(folder))
    environment.update(
        {
            "WHOP_API_KEY": API_KEY,
            "WHOP_API_URL": simulator.api_url,
            "WHOP_WEBHOOK_SECRET": SECRET,
            "WHOP_TIMEOUT": "2",
            "WHOP_COMPANY_ID": "biz_SimStore",
            "CATALOG_PATH": str(folder / "catalog.toml"),
            "ADMIN_EMAILS": ADMIN,
            "MAIL_FROM": "shop@demo-shop.test",
            "SMTP_URL": sink.url,
            # The production schedule, sped up so the demo takes seconds.
            "CANCEL_DELAY": "1",
            "RETRY_SCHEDULE": "0.5,1,1",
            "CANCEL_LEASE": "10",
            "SWEEP_INTERVAL": "2",
            "STUCK_GRACE": "3",
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "INFO",
        }
    )
    environment.pop("CANCEL_GIVE_UP_AFTER", None)
    return environment


def _wait_until(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def run_demo(console: Console, *, keep: bool = False) -> bool:
    console = Console(width=max(console.width, 132), highlight=False)
    folder = Path(tempfile.mkdtemp(prefix="whop-autocancel-demo-"))
    (folder / "catalog.toml").write_text(CATALOG)
    started = time.monotonic()
    since = datetime.now(UTC)
    database_url = load_settings(_env_file=None, **_storage(folder)).DATABASE_URL
    where = (
        f"a temporary SQLite database in {folder}"
        if database_url.startswith("sqlite")
        else make_url(database_url).render_as_string(hide_password=True)
    )
    console.print(f"[bold]whop-autocancel demo[/bold]: simulator, SMTP sink and `serve` on {where}")
    service: subprocess.Popen[bytes] | None = None
    log_file = (folder / "service.log").open("wb")
    try:
        with (
            SmtpSink() as sink,
            SimulatorServer(
                api_key=API_KEY, webhook_secret=SECRET, webhook_url=None, time_scale=0.05
            ) as simulator,
        ):
            environment = _service_environment(folder, simulator, sink)
            if not database_url.startswith("sqlite"):  # SQLite migrates itself on start
                migrated = subprocess.run(
                    [sys.executable, "-m", "whop_autocancel", "migrate"],
                    env=environment,
                    cwd=folder,
                    capture_output=True,
                    text=True,
                    check=False,
                    timeout=120,
                )
                if migrated.returncode != 0:
                    console.print(f"[red]migrate failed:[/red] {migrated.stderr.strip()}")
                    return False
            port = free_port()
            service_url = f"http://127.0.0.1:{port}"
            simulator.state.set_webhook_url(f"{service_url}/webhooks/whop")
            service = subprocess.Popen(
                [sys.executable, "-m", "whop_autocancel", "serve", "--port", str(port)],
                env=environment,
                cwd=folder,  # no .env of the caller's is read
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
            _wait_until(
                lambda: _healthy(service_url) or service.poll() is not None,
                30,
                "the service to start",
            )
            if service.poll() is not None:
                console.print("[red]The service did not start:[/red]")
                console.print((folder / "service.log").read_text()[-3000:])
                return False
            purchases = _purchases()
            normal = [p for p in purchases if "outage" not in p.scenario]
            during_outage = [p for p in purchases if "outage" in p.scenario]
            database = Database(database_url)
            try:
                console.print(f"service up at {service_url}; {len(normal)} purchases…")
                _buy(simulator, normal)
                _wait_until(
                    lambda: _settled(database, simulator, normal),
                    SETTLE_SECONDS,
                    "the purchases to settle",
                )
                console.print(
                    "Whop goes down (every API call answers 503) until the retry schedule is "
                    f"used up, while {len(during_outage)} more purchases come in…"
                )
                outage_started = time.monotonic()
                simulator.state.set_outage(True)
                _buy(simulator, during_outage)
                # The cancellations hit the outage and back off until the service says Whop is
                # unreachable (one alert); a fixed pause would depend on the machine's speed.
                _wait_until(
                    lambda: _alerted(database, "whop_unreachable", since),
                    OUTAGE_LIMIT,
                    "the 'Whop unreachable' alert",
                )
                simulator.state.set_outage(False)
                console.print(f"…Whop is back after {time.monotonic() - outage_started:.1f} s.")
                _wait_until(
                    lambda: _settled(database, simulator, purchases),
                    SETTLE_SECONDS,
                    "every purchase to settle",
                )
                outcomes = _outcomes(database, simulator, sink, purchases)
                ok = _report(console, database, sink, purchases, outcomes, since)
            finally:
                database.dispose()
            environment = _service_environment(folder, simulator, sink)
            listing = subprocess.run(
                [sys.executable, "-m", "whop_autocancel", "cancellations", "failed"],
                env={**environment, "COLUMNS": "132"},
                cwd=folder,
                capture_output=True,
                text=True,
                check=False,
                timeout=60,
            )
            console.print("[bold]$ whop-autocancel cancellations failed[/bold]")
            console.print(listing.stdout.rstrip() or listing.stderr.rstrip(), markup=False)
            service.send_signal(signal.SIGTERM)
            service.wait(timeout=30)
            log_file.flush()
            graceful = "worker_stopped" in (folder / "service.log").read_text()
            how = "gracefully" if graceful else "NOT gracefully"
            console.print(
                f"service stopped on SIGTERM ({how}); demo took {time.monotonic() - started:.1f} s"
            )
            return ok and graceful
    except TimeoutError as error:
        console.print(f"[red]demo failed: {error}[/red]; service log: {folder / 'service.log'}")
        keep = True
        return False
    finally:
        if service is not None and service.poll() is None:
            service.kill()
            service.wait()
        log_file.close()
        if keep:
            console.print(f"kept {folder} (database, queue, service.log)")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def _buy(simulator: SimulatorServer, purchases: list[Purchase]) -> None:
    state = simulator.state
    for purchase in purchases:
        purchase.email = f"buyer{purchase.number}@example.com"
        created = state.create_purchase(purchase.plan_id, email=purchase.email, **purchase.options)
        purchase.payment_id = created["payment_id"]
        purchase.membership_id = created["membership_id"]
        if purchase.expect_cancel == "failed":
            state.reject(purchase.membership_id, 422)


def _alerted(database: Database, kind: str, since: datetime) -> bool:
    with database.transaction() as session:
        found = session.scalars(
            select(Alert.id).where(Alert.kind == kind, Alert.created_at >= since)
        ).first()
    return found is not None


def _settled(database: Database, simulator: SimulatorServer, purchases: list[Purchase]) -> bool:
    if simulator.state.pending_webhooks():
        return False
    with database.transaction() as session:
        orders = {o.whop_payment_id: o for o in session.scalars(select(Order))}
        if any(p.payment_id not in orders for p in purchases):
            return False
        cancellations = {c.order_id: c for c in session.scalars(select(Cancellation))}
        for purchase in purchases:
            if purchase.expect_cancel == "untouched":
                continue
            row = cancellations.get(orders[purchase.payment_id].id)
            if row is None or row.status not in FINAL_STATUSES:
                return False
        order_ids = [orders[p.payment_id].id for p in purchases]
        unsent = session.scalars(
            select(Email.id).where(Email.sent_at.is_(None), Email.order_id.in_(order_ids))
        ).first()
    return unsent is None


def _outcomes(
    database: Database, simulator: SimulatorServer, sink: SmtpSink, purchases: list[Purchase]
) -> dict[int, Outcome]:
    results: dict[int, Outcome] = {}
    with database.transaction() as session:
        orders = {o.whop_payment_id: o for o in session.scalars(select(Order))}
        cancellations = {c.order_id: c for c in session.scalars(select(Cancellation))}
        for purchase in purchases:
            order = orders[purchase.payment_id]
            row = cancellations.get(order.id)
            membership = simulator.state.membership(purchase.membership_id)
            posts = [
                c for c in simulator.state.calls(purchase.membership_id) if c["method"] == "POST"
            ]
            calls = [c for c in posts if c["status"] < 500]
            unavailable = len(posts) - len(calls)
            deliveries = len([m for m in sink.to(purchase.email)])
            status = row.status if row else "-"
            expected_deliveries = 0 if purchase.plan_id in (SETUP, MONTHLY, LIFETIME) else 1
            if purchase.expect_cancel == "canceled":
                ok = status == "canceled" and membership["status"] == "canceled"
            elif purchase.expect_cancel == "failed":
                ok = status == "failed" and membership["status"] != "canceled"
            else:
                ok = row is None and membership["status"] != "canceled" and not calls
            ok = ok and deliveries == expected_deliveries
            results[purchase.number] = Outcome(
                order_status=order.status,
                deliveries=deliveries,
                cancellation=status,
                membership=membership["status"],
                cancel_calls=str(len(calls)) + (f" (+{unavailable} x 503)" if unavailable else ""),
                ok=ok,
            )
    return results


def _report(
    console: Console,
    database: Database,
    sink: SmtpSink,
    purchases: list[Purchase],
    outcomes: dict[int, Outcome],
    since: datetime,
) -> bool:
    table = Table(title="What happened to each purchase")
    for column in (
        "#",
        "Purchase",
        "Plan",
        "Order",
        "Buyer emails",
        "Cancellation",
        "In Whop",
        "Cancel calls",
        "Expected",
        "OK",
    ):
        table.add_column(column, no_wrap=True)
    for purchase in purchases:
        outcome = outcomes[purchase.number]
        table.add_row(
            str(purchase.number),
            purchase.scenario,
            purchase.plan_id.removeprefix("plan_"),
            outcome.order_status,
            str(outcome.deliveries),
            outcome.cancellation,
            outcome.membership,
            outcome.cancel_calls,
            purchase.expect_cancel,
            "[green]yes[/green]" if outcome.ok else "[red]NO[/red]",
        )
    console.print(table)

    rejected = next(p for p in purchases if p.expect_cancel == "failed")
    failure_alerts = [
        m for m in sink.to(ADMIN) if rejected.membership_id in m.subject and "by hand" in m.subject
    ]
    with database.transaction() as session:
        alerts = list(
            session.scalars(select(Alert).where(Alert.created_at >= since).order_by(Alert.id))
        )
    kinds = [a.kind for a in alerts]
    console.print(f"Alerts raised: {', '.join(kinds) or 'none'}")
    checks = {
        "every purchase ended as expected": all(o.ok for o in outcomes.values()),
        "exactly one alert email for the refused cancel": len(failure_alerts) == 1,
        "the alert has an HTML and a plain-text part": bool(
            failure_alerts and failure_alerts[0].html and failure_alerts[0].text
        ),
        "one 'Whop unreachable' alert for the outage, resolved when Whop came back": [
            a.resolved_at is not None for a in alerts if a.kind == "whop_unreachable"
        ]
        == [True],
        "the renewal raised its one safety alert": kinds.count("plan_not_one_time") == 1,
    }
    if failure_alerts:
        console.print(
            "[bold]The admin's alert for the refused cancel[/bold] "
            f"(subject: {failure_alerts[0].subject}):"
        )
        console.print(failure_alerts[0].text.strip())
    for name, passed in checks.items():
        console.print(f"{'[green]PASS[/green]' if passed else '[red]FAIL[/red]'} {name}")
    return all(checks.values())
