"""`whop-autocancel demo`: the whole after-purchase job, for real, in under a minute.

It starts the Whop simulator and an SMTP sink in this process, runs `whop-autocancel serve` as
a real child process on a temporary SQLite database, makes fifteen purchases (both webhook
shapes, a duplicate, a renewal, an unlisted plan, a delivery-only plan, a membership Whop
refuses to cancel, license keys sold from stock until the pool runs dry and is refilled with
`whop-autocancel stock import`, and a Whop outage in the middle), waits until everything has
settled and prints what happened to each. It exits 0 only if every outcome is the expected one.
"""

from __future__ import annotations

import os
import secrets
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
from rich.text import Text
from sqlalchemy import func, inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from whop_autocancel.alerts.models import Alert
from whop_autocancel.cancellation.models import FINAL_STATUSES, Cancellation
from whop_autocancel.db.engine import Database, sqlite_path
from whop_autocancel.mail.models import Email
from whop_autocancel.mail.sink import SmtpSink, free_port
from whop_autocancel.orders.models import Order, OrderStatus
from whop_autocancel.sealing import generate_key
from whop_autocancel.settings import load_settings
from whop_autocancel.simulator import SimulatorServer

API_KEY = "sim_demo_key"
SECRET = "ws_demo_be0723b001afeb9faec8ce7480f1eb422b4522d4ea3"  # noqa: S105 (the demo's own simulator)
ADMIN = "admin@demo-shop.test"
PACK, SETUP, KEEP, MONTHLY, LIFETIME, KEYS = (
    "plan_DemoPack",
    "plan_DemoSetup",
    "plan_DemoKeep",
    "plan_DemoMonthly",
    "plan_DemoLifetime",
    "plan_DemoKeys",
)
POOL = "demo-keys"
LOW_STOCK = 1  # the pool's alert threshold: raised when the first of the two keys is sold
WIDTH = 148  # the purchases table fits without truncation
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

# Sold from stock: each buyer gets one license key of the pool, imported with
# `whop-autocancel stock import {POOL} FILE`.
[plans.{KEYS}]
name = "Demo License Key"
delivery = "stock:{POOL}"
subject = "Your license key: {{{{ plan_name }}}}"
message = "Thanks for buying! Enter this key in the app to activate it."

[pools.{POOL}]
low_stock = {LOW_STOCK}
"""


@dataclass
class Purchase:
    number: int
    scenario: str
    plan_id: str
    expect_cancel: str  # "canceled", "failed" or "untouched"
    options: dict[str, Any] = field(default_factory=dict)
    phase: str = "first"  # "first" batch, "restock" (when the pool is empty) or "outage"
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
        Purchase(10, "license key from stock", KEYS, "canceled"),
        Purchase(11, "license key from stock", KEYS, "canceled", {"shape": "pinned"}),
        Purchase(12, "pool empty → served after import", KEYS, "canceled", phase="restock"),
        Purchase(13, "during Whop outage", PACK, "canceled", phase="outage"),
        Purchase(14, "during Whop outage", SETUP, "canceled", {"shape": "pinned"}, "outage"),
        Purchase(15, "during Whop outage", PACK, "canceled", phase="outage"),
    ]


@dataclass
class Waiting:
    """Purchase 12 as it was while the pool was empty, before the import that served it."""

    order_id: str
    order_status: str
    cancellation: bool  # a cancellation row existed
    membership: str
    cancel_calls: int
    alert_subject: str
    calls_before_import: int = 0  # the simulator's API call count when the import started


def _storage(folder: Path) -> dict[str, str]:
    """The caller's DATABASE_URL and QUEUE_URL when set (PostgreSQL, MariaDB, Redis), else
    temporary SQLite files; always a queue name of the demo's own."""
    database = os.environ.get("DATABASE_URL")
    queue = os.environ.get("QUEUE_URL")
    return {
        "DATABASE_URL": _absolute(database) if database else f"sqlite:///{folder / 'demo.db'}",
        "QUEUE_URL": _absolute(queue) if queue else f"sqlite:///{folder / 'demo-queue.db'}",
        "QUEUE_NAME": f"whop-autocancel-demo-{folder.name[-8:]}",
    }


def _absolute(url: str) -> str:
    """A relative SQLite path names a file in the folder the demo was started from, not in
    the temporary folder its `serve` runs in."""
    if not url.startswith("sqlite:///"):
        return url
    path = sqlite_path(url)
    if path is None or path.is_absolute():
        return url
    return make_url(url).set(database=str(Path.cwd() / path)).render_as_string(hide_password=False)


def _service_environment(
    folder: Path, simulator: SimulatorServer, sink: SmtpSink, stock_key: str
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
            "STOCK_ENCRYPTION_KEY": stock_key,  # a new one per run, as `stock keygen` prints
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


def _cli(environment: dict[str, str], folder: Path, *args: str) -> subprocess.Popen[str]:
    """Start `whop-autocancel ARGS…` as the merchant would, on the demo's database."""
    return subprocess.Popen(
        [sys.executable, "-m", "whop_autocancel", *args],
        env={**environment, "COLUMNS": str(WIDTH)},
        cwd=folder,  # no .env of the caller's is read
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    """Wait for a `_cli` process: its exit code and its output (stderr when stdout is empty
    or the command failed)."""
    try:
        stdout, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    code = process.returncode
    shown = stdout.rstrip() if code == 0 and stdout.strip() else (stdout + stderr).rstrip()
    return code, shown


def _import_keys(
    console: Console, environment: dict[str, str], folder: Path, name: str, keys: list[str]
) -> bool:
    """`whop-autocancel stock import demo-keys FILE`, run as a merchant would."""
    (folder / name).write_text("".join(f"{key}\n" for key in keys))
    plural = "s" if len(keys) > 1 else ""
    console.print(
        Text.assemble(
            (f"$ whop-autocancel stock import {POOL} {name}", "bold"),
            f"  ({len(keys)} key{plural})",
        )
    )
    code, output = _finish(_cli(environment, folder, "stock", "import", POOL, name))
    console.print(output)
    return code == 0


def _new_keys(count: int) -> list[str]:
    return [
        "DEMO-" + "-".join(secrets.token_hex(2).upper() for _ in range(3)) for _ in range(count)
    ]


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
    # Text is printed as it is (no markup, no emoji codes: a log or an error may hold either);
    # styles are given with `Text`.
    console = Console(width=max(console.width, WIDTH), highlight=False, markup=False, emoji=False)
    folder = Path(tempfile.mkdtemp(prefix="whop-autocancel-demo-"))
    (folder / "catalog.toml").write_text(CATALOG)
    started = time.monotonic()
    since = datetime.now(UTC)
    database_url = load_settings(_env_file=None, **_storage(folder)).DATABASE_URL
    shown = make_url(database_url).render_as_string(hide_password=True)  # the shop's, if set
    where = shown if os.environ.get("DATABASE_URL") else f"a temporary SQLite database in {folder}"
    console.print(
        Text.assemble(
            ("whop-autocancel demo", "bold"), f": simulator, SMTP sink and `serve` on {where}"
        )
    )
    service: subprocess.Popen[bytes] | None = None
    listings: dict[str, subprocess.Popen[str]] = {}  # `whop-autocancel …` shown at the end
    log_file = (folder / "service.log").open("wb")
    try:
        earlier = _earlier_orders(database_url)
        if earlier:
            # Fake purchases do not belong in a real shop's database; and alerts are raised
            # once and throttled per database, so the checks need a database of their own.
            orders = "1 order" if earlier == 1 else f"{earlier} orders"
            console.print(
                Text.assemble(
                    (f"The demo refuses to run on DATABASE_URL={shown}:", "red"),
                    f" it holds {orders} already, and a shop's database is no place for the "
                    "demo's fake purchases. Point DATABASE_URL at a new, empty database, or "
                    "unset it to run the demo on a temporary SQLite database.",
                ),
                soft_wrap=True,
            )
            return False
        with (
            SmtpSink() as sink,
            SimulatorServer(
                api_key=API_KEY, webhook_secret=SECRET, webhook_url=None, time_scale=0.05
            ) as simulator,
        ):
            environment = _service_environment(folder, simulator, sink, generate_key())
            if not database_url.startswith("sqlite"):  # SQLite migrates itself on start
                code, output = _finish(_cli(environment, folder, "migrate"))
                if code != 0:
                    console.print(Text("migrate failed:", style="red"))
                    console.print("\n".join(output.splitlines()[-3:]))
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
                console.print(Text("The service did not start:", style="red"))
                console.print((folder / "service.log").read_text()[-3000:])
                return False
            database = Database(database_url)
            try:
                ok = _buy_and_check(
                    console, environment, folder, database, simulator, sink, since, listings
                )
            finally:
                database.dispose()
            listings["cancellations failed"] = _cli(environment, folder, "cancellations", "failed")
            for command in ("cancellations failed", "stock levels"):
                if command in listings:
                    code, output = _finish(listings[command])
                    console.print(Text(f"$ whop-autocancel {command}", style="bold"))
                    console.print(output)
                    ok = ok and code == 0
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
        console.print(
            Text.assemble(
                (f"demo failed: {error}", "red"), f"; service log: {folder / 'service.log'}"
            )
        )
        keep = True
        return False
    finally:
        for process in [*listings.values(), service]:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        log_file.close()
        if keep:
            console.print(f"kept {folder} (database, queue, service.log)")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def _earlier_orders(database_url: str) -> int:
    """How many orders the database holds already (0 when it has no schema yet or cannot be
    reached: `migrate` or `serve` then says what is wrong)."""
    database = Database(database_url)
    try:
        if not inspect(database.engine).has_table(Order.__tablename__):
            return 0
        with database.transaction() as session:
            return int(session.scalar(select(func.count()).select_from(Order)) or 0)
    except SQLAlchemyError:
        return 0
    finally:
        database.dispose()


def _buy_and_check(
    console: Console,
    environment: dict[str, str],
    folder: Path,
    database: Database,
    simulator: SimulatorServer,
    sink: SmtpSink,
    since: datetime,
    listings: dict[str, subprocess.Popen[str]],
) -> bool:
    purchases = _purchases()
    first = [p for p in purchases if p.phase == "first"]
    from_stock = [p for p in first if p.plan_id == KEYS]
    late = next(p for p in purchases if p.phase == "restock")
    during_outage = [p for p in purchases if p.phase == "outage"]
    keys = _new_keys(2)
    if not _import_keys(console, environment, folder, f"{POOL}.txt", keys):
        return False
    console.print(f"{len(first)} purchases, {len(from_stock)} of them license keys from stock…")
    _buy(simulator, first)
    _wait_until(
        lambda: _delivered(database, from_stock), SETTLE_SECONDS, "the stock purchases' delivery"
    )
    # The two keys are gone: the next buyer must wait (paid, not delivered, not cancelled).
    _buy(simulator, [late])
    waiting: list[Waiting] = []
    _wait_until(
        lambda: (
            _settled(database, simulator, first)
            and _waiting(database, simulator, sink, late, waiting)
        ),
        SETTLE_SECONDS,
        "the first purchases to settle and the next stock buyer to wait",
    )
    seen = waiting[0]
    console.print(
        f"#{late.number} bought while pool {POOL} is empty: order {seen.order_status}, "
        f"{'a' if seen.cancellation else 'no'} cancellation, membership {seen.membership} "
        f"in Whop; the admin got '{seen.alert_subject}'."
    )
    seen.calls_before_import = len(simulator.state.calls())
    more = _new_keys(1)
    if not _import_keys(console, environment, folder, f"{POOL}-more.txt", more):
        return False
    keys += more
    _wait_until(
        lambda: _settled(database, simulator, [*first, late]),
        SETTLE_SECONDS,
        "the waiting stock purchase to be served",
    )
    console.print(
        "Whop goes down (every API call answers 503) until the retry schedule is "
        f"used up, while {len(during_outage)} more purchases come in…"
    )
    # No stock is sold after #12: the pool's levels are final now. The listing runs while Whop
    # is down (each CLI start takes a second or two) and is shown at the end.
    listings["stock levels"] = _cli(environment, folder, "stock", "levels")
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
    return _report(console, database, simulator, sink, purchases, outcomes, since, keys, seen)


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


def _delivered(database: Database, purchases: list[Purchase]) -> bool:
    payments = [p.payment_id for p in purchases]
    with database.transaction() as session:
        statuses = list(
            session.scalars(select(Order.status).where(Order.whop_payment_id.in_(payments)))
        )
    return len(statuses) == len(payments) and all(
        status == OrderStatus.DELIVERED.value for status in statuses
    )


def _waiting(
    database: Database,
    simulator: SimulatorServer,
    sink: SmtpSink,
    purchase: Purchase,
    seen: list[Waiting],
) -> bool:
    """True once the order waits for stock and the admin has the out-of-stock alert email
    (and the low-stock one, raised earlier); then `seen` holds the state observed."""
    with database.transaction() as session:
        order = session.scalars(
            select(Order).where(Order.whop_payment_id == purchase.payment_id)
        ).first()
        if order is None or order.waiting_for_stock != POOL:
            return False
        cancellation = session.scalars(
            select(Cancellation.id).where(Cancellation.order_id == order.id)
        ).first()
        order_id, status = order.id, order.status
    admin = sink.to(ADMIN)
    alert = next(
        (m for m in admin if m.subject.startswith("Out of stock") and order_id in m.subject), None
    )
    low = any(m.subject.startswith(f"Low stock: pool {POOL} ") for m in admin)
    if alert is None or not low:
        return False
    calls = simulator.state.calls(purchase.membership_id)
    seen.append(
        Waiting(
            order_id=order_id,
            order_status=status,
            cancellation=cancellation is not None,
            membership=simulator.state.membership(purchase.membership_id)["status"],
            cancel_calls=len([c for c in calls if c["method"] == "POST"]),
            alert_subject=alert.subject,
        )
    )
    return True


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


def _key_recipients(sink: SmtpSink, keys: list[str]) -> dict[str, list[str]]:
    """Every recipient of every email that carries each key (in either part)."""
    messages = sink.messages
    return {
        key: [r for m in messages if key in m.text or key in m.html for r in m.recipients]
        for key in keys
    }


def _report(
    console: Console,
    database: Database,
    simulator: SimulatorServer,
    sink: SmtpSink,
    purchases: list[Purchase],
    outcomes: dict[int, Outcome],
    since: datetime,
    keys: list[str],
    seen: Waiting,
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
            Text("yes", style="green") if outcome.ok else Text("NO", style="red"),
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
    recipients = _key_recipients(sink, keys)
    console.print(
        "License keys emailed: "
        + ", ".join(f"{key} → {' + '.join(to) or 'nobody'}" for key, to in recipients.items())
    )
    stock_buyers = {p.email for p in purchases if p.plan_id == KEYS}
    late = next(p for p in purchases if p.phase == "restock")
    late_posts = [c for c in simulator.state.calls(late.membership_id) if c["method"] == "POST"]
    admin = sink.to(ADMIN)
    out_of_stock = [
        m for m in admin if m.subject.startswith("Out of stock") and seen.order_id in m.subject
    ]
    low_stock = [m for m in admin if m.subject.startswith(f"Low stock: pool {POOL} ")]
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
        f"each of the {len(keys)} license keys emailed exactly once, to one buyer each": all(
            len(to) == 1 for to in recipients.values()
        )
        and {to[0] for to in recipients.values() if to} == stock_buyers
        and len(stock_buyers) == len(keys),
        f"#{late.number} waited ({OrderStatus.DELIVERY_FAILED.value}) and was not cancelled "
        "before its delivery": seen.order_status == OrderStatus.DELIVERY_FAILED.value
        and not seen.cancellation
        and seen.membership != "canceled"
        and seen.cancel_calls == 0
        and bool(late_posts)
        and all(c["seq"] > seen.calls_before_import for c in late_posts)
        and outcomes[late.number].ok,
        f"the out-of-stock alert for #{late.number} reached the admin": len(out_of_stock) == 1,
        f"one low-stock alert for pool {POOL}, emailed to the admin": kinds.count("low_stock") == 1
        and len(low_stock) == 1,
    }
    if failure_alerts:
        console.print(
            Text.assemble(
                ("The admin's alert for the refused cancel", "bold"),
                f" (subject: {failure_alerts[0].subject}):",
            )
        )
        console.print(failure_alerts[0].text.strip())
    for name, passed in checks.items():
        console.print(Text.assemble(("PASS", "green") if passed else ("FAIL", "red"), f" {name}"))
    return all(checks.values())
