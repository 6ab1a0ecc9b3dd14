"""Install time (DESIGN §5): the first start records when the service started watching Whop.
The Whop sweep never delivers a purchase made before it, nor one with any refunded amount;
older purchases are recovered only by `whop-autocancel recover`, dry run first. On SQLite,
PostgreSQL and MariaDB, with the simulator over HTTP and a real SMTP sink."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from support.harness import (
    ADMIN,
    MESSAGE_PLAN,
    UNLISTED_PLAN,
    make_runtime,
    make_settings,
    run_cli,
    service_environment,
    wait_for,
)
from support.stock import StockWorld, drain_due, stock_world
from whop_autocancel.cancellation.models import Cancellation
from whop_autocancel.clock import FrozenClock
from whop_autocancel.db.install import start_watching, watching_since
from whop_autocancel.mail.sink import SmtpSink
from whop_autocancel.orders.models import Order
from whop_autocancel.reconcile.recover import RecoverRefused, Recovery
from whop_autocancel.runtime import Runtime
from whop_autocancel.simulator import SimulatorServer

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


@pytest.fixture
def shop(
    tmp_path: Path,
    clock: FrozenClock,
    simulator: SimulatorServer,
    smtp_sink: SmtpSink,
    database_url: str,
) -> Iterator[StockWorld]:
    """A running shop on an empty database that has not started watching yet."""
    with stock_world(
        tmp_path, clock, simulator, smtp_sink, database_url, WHOP_COMPANY_ID="biz_SimStore"
    ) as world:
        yield world


def sale(
    simulator: SimulatorServer, at: datetime, email: str, plan: str = MESSAGE_PLAN, **options: Any
) -> dict[str, Any]:
    """A purchase paid at `at` whose webhooks never reached the service."""
    made: dict[str, Any] = simulator.state.create_purchase(
        plan, email=email, at=at, send_webhooks=False, **options
    )
    return made


def orders_by_payment(runtime: Runtime) -> dict[str, Order]:
    with runtime.database.transaction() as session:
        return {o.whop_payment_id or o.id: o for o in session.scalars(select(Order))}


def listing_floors(simulator: SimulatorServer, path: str) -> list[datetime]:
    return [
        datetime.fromisoformat(call["query"]["created_after"][0].replace("Z", "+00:00"))
        for call in simulator.state.calls()
        if call["path"].endswith(path)
    ]


def posts(simulator: SimulatorServer) -> list[dict[str, Any]]:
    return [call for call in simulator.state.calls() if call["method"] == "POST"]


def cancel_due(runtime: Runtime) -> None:
    with runtime.database.transaction() as session:
        ids = list(session.scalars(select(Cancellation.id)))
    for cancellation_id in ids:
        runtime.cancellations.run(cancellation_id)


def three_days_of_sales(simulator: SimulatorServer, installed: datetime) -> list[dict[str, Any]]:
    """Paid one-time purchases of a listed plan over the three days before the install (the
    last one a minute before it, inside the sweep's overlap), and one of an unlisted plan."""
    ages = [3 * DAY - HOUR, 2 * DAY, DAY, HOUR, timedelta(minutes=1)]
    made = [sale(simulator, installed - age, f"old{n}@example.com") for n, age in enumerate(ages)]
    return [*made, sale(simulator, installed - DAY, "unlisted@example.com", UNLISTED_PLAN)]


# The Whop sweep ---------------------------------------------------------------------------------


def test_the_first_start_delivers_none_of_the_purchases_made_before_it(
    shop: StockWorld, simulator: SimulatorServer, clock: FrozenClock
) -> None:
    runtime = shop.runtime
    installed = clock.now() - HOUR  # the service started an hour ago
    old = three_days_of_sales(simulator, installed)
    assert start_watching(runtime.database, installed) == installed
    assert start_watching(runtime.database, clock.now()) == installed  # recorded once

    new = sale(simulator, clock.now() - timedelta(minutes=5), "new@example.com")
    refunded = sale(simulator, clock.now() - timedelta(minutes=4), "refunded@example.com")
    partly = sale(simulator, clock.now() - timedelta(minutes=3), "partly@example.com")
    simulator.state.refund_payment(refunded["payment_id"])
    simulator.state.refund_payment(partly["payment_id"], "5")

    preview = runtime.whop_sweep.run(dry_run=True)
    assert preview.recovered_payments == [new["payment_id"]]
    assert orders_by_payment(runtime) == {}

    report = runtime.whop_sweep.run()  # the first sweep, as a worker's ticker runs it
    assert report.ran
    assert report.stopped is None
    assert report.recovered_payments == [new["payment_id"]]
    skipped = {s.payment_id: s.reason for s in report.skipped_payments}
    assert "refunded" in skipped[refunded["payment_id"]]
    assert "refunded" in skipped[partly["payment_id"]]
    assert "before the service started watching" in skipped[old[-2]["payment_id"]]
    # It never listed further back than the install time (less the overlap) ...
    floor = installed - timedelta(seconds=runtime.settings.WHOP_SWEEP_OVERLAP)
    assert min(listing_floors(simulator, "/payments")) >= floor
    assert min(listing_floors(simulator, "/memberships")) >= floor

    drain_due(runtime)
    shop.settle()
    cancel_due(runtime)
    # ... and only the purchase made since then was delivered and its membership cancelled.
    assert set(orders_by_payment(runtime)) == {new["payment_id"]}
    assert orders_by_payment(runtime)[new["payment_id"]].status == "delivered"
    assert len(shop.mail_to("new@example.com")) == 1
    assert simulator.state.membership(new["membership_id"])["status"] == "canceled"
    for purchase in [*old, refunded, partly]:
        assert simulator.state.membership(purchase["membership_id"])["status"] == "completed"
    written = {address for message in shop.sink.messages for address in message.recipients}
    assert written == {"new@example.com", ADMIN}  # no buyer of before the install heard a thing


def test_an_upgraded_database_starts_watching_at_its_first_sweep(
    shop: StockWorld, simulator: SimulatorServer, clock: FrozenClock
) -> None:
    """A database that predates the install time has none recorded: the first sweep records
    it as now (a dry run records nothing) and re-delivers nothing from before."""
    runtime = shop.runtime
    three_days_of_sales(simulator, clock.now())
    assert runtime.whop_sweep.run(dry_run=True).recovered_payments == []
    with runtime.database.transaction() as session:
        assert watching_since(session) is None
    report = runtime.whop_sweep.run()
    assert report.recovered_payments == []
    with runtime.database.transaction() as session:
        assert watching_since(session) == clock.now()
    assert orders_by_payment(runtime) == {}
    assert posts(simulator) == []


def test_a_worker_records_the_install_time_at_its_first_start(
    tmp_path: Path, simulator: SimulatorServer, database_url: str
) -> None:
    env = service_environment(tmp_path, WHOP_API_URL=simulator.api_url, DATABASE_URL=database_url)
    runtime = make_runtime(make_settings(tmp_path, DATABASE_URL=database_url))

    def recorded() -> datetime | None:
        with runtime.database.transaction() as session:
            return watching_since(session)

    try:
        assert recorded() is None
        before = datetime.now(UTC)
        worker = subprocess.Popen(
            [sys.executable, "-m", "whop_autocancel", "worker"],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(lambda: recorded() is not None, 60, "the worker to record its start")
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
        first = recorded()
        assert first is not None
        assert before - timedelta(seconds=1) <= first <= datetime.now(UTC)
        again = run_cli(tmp_path, "migrate", env=env)
        assert again.returncode == 0, again.stderr
        assert recorded() == first  # never moved
        assert f"Watching Whop since {first:%Y-%m-%dT%H:%M:%SZ}" in again.stdout
        checked = run_cli(tmp_path, "check", env=env)
        [line] = [line for line in checked.stdout.splitlines() if " database: " in line]
        assert f"watching Whop since {first:%Y-%m-%dT%H:%M:%SZ}" in line
    finally:
        runtime.close()


# recover ----------------------------------------------------------------------------------------


def recovery(runtime: Runtime) -> Recovery:
    return runtime.recovery()


def test_recover_lists_older_purchases_then_delivers_them_when_asked(
    shop: StockWorld, simulator: SimulatorServer, clock: FrozenClock
) -> None:
    runtime = shop.runtime
    installed = clock.now() - HOUR
    start_watching(runtime.database, installed)
    since = installed - 2 * DAY - HOUR
    too_old = sale(simulator, since - HOUR, "tooold@example.com")
    wanted = sale(simulator, installed - 2 * DAY, "wanted@example.com")
    served = sale(simulator, installed - DAY, "served@example.com")
    refunded = sale(simulator, installed - DAY, "refunded@example.com")
    simulator.state.refund_payment(refunded["payment_id"], "0.01")
    unlisted = sale(simulator, installed - DAY, "unlisted@example.com", UNLISTED_PLAN)
    renewal = sale(
        simulator, installed - DAY, "renewal@example.com", billing_reason="subscription_create"
    )
    after = sale(simulator, installed + timedelta(minutes=10), "after@example.com")
    runtime.whop_sweep.run(force=True)  # the sweep's own: created after the install
    drain_due(runtime)
    # A purchase served by the service already (its webhook came when it was made).
    with runtime.database.transaction() as session:
        session.add(
            Order(
                id="ord_Served1",
                status="delivered",
                created_at=installed - DAY,
                whop_payment_id=served["payment_id"],
                whop_membership_id=served["membership_id"],
                plan_id=MESSAGE_PLAN,
                email="served@example.com",
                billing_reason="one_time",
                order_metadata={},
            )
        )
    known = set(orders_by_payment(runtime))
    assert after["payment_id"] in known
    calls = len(simulator.state.calls())

    job = recovery(runtime)
    survey = job.survey(since)
    assert survey.until == installed
    assert [p.facts.payment_id for p in survey.recoverable] == [wanted["payment_id"]]
    [found] = survey.recoverable
    assert found.facts.email == "wanted@example.com"
    assert found.delivery == "message"
    reasons = {s.payment_id: s.reason for s in survey.skipped}
    assert "refunded" in reasons[refunded["payment_id"]]
    assert "not listed" in reasons[unlisted["payment_id"]]
    assert "not a one-time" in reasons[renewal["payment_id"]]
    assert "ord_Served1" in reasons[served["payment_id"]]
    assert too_old["payment_id"] not in reasons
    assert after["payment_id"] not in reasons
    # The dry run changed nothing: no order, no job, no call but the listing.
    assert set(orders_by_payment(runtime)) == known
    assert drain_due(runtime) == 0
    assert {c["method"] for c in simulator.state.calls()[calls:]} == {"GET"}

    assert job.apply(survey) == [wanted["payment_id"]]
    drain_due(runtime)
    shop.settle()
    cancel_due(runtime)
    order = orders_by_payment(runtime)[wanted["payment_id"]]
    assert order.status == "delivered"
    assert len(shop.mail_to("wanted@example.com")) == 1
    assert simulator.state.membership(wanted["membership_id"])["status"] == "canceled"
    for purchase in (refunded, unlisted, renewal, too_old, served):
        assert simulator.state.membership(purchase["membership_id"])["status"] != "canceled"
    for address in ("refunded", "unlisted", "renewal", "tooold", "served"):
        assert shop.mail_to(f"{address}@example.com") == []

    again = job.survey(since)
    assert again.recoverable == []
    assert job.apply(again) == []

    with pytest.raises(RecoverRefused, match="not before the service started watching"):
        job.survey(installed + timedelta(minutes=1))


def test_the_recover_command_is_a_dry_run_unless_told_to_apply(
    tmp_path: Path, simulator: SimulatorServer
) -> None:
    env = service_environment(tmp_path, WHOP_API_URL=simulator.api_url)
    migrated = run_cli(tmp_path, "migrate", env=env)
    assert migrated.returncode == 0, migrated.stderr
    runtime = make_runtime(make_settings(tmp_path))
    with runtime.database.transaction() as session:
        installed = watching_since(session)
    runtime.close()
    assert installed is not None
    old = sale(simulator, installed - DAY, "old@example.com")
    gone = sale(simulator, installed - DAY, "gone@example.com")
    simulator.state.refund_payment(gone["payment_id"])
    since = (installed - 2 * DAY).strftime("%Y-%m-%d")

    dry = run_cli(tmp_path, "recover", "--since", since, env=env)
    assert dry.returncode == 0, dry.stderr
    assert "1 purchase(s) would be delivered" in dry.stdout
    assert old["payment_id"] in dry.stdout
    assert "old@example.com" in dry.stdout
    assert gone["payment_id"] in dry.stdout
    assert "refunded" in dry.stdout
    assert "Dry run: nothing changed" in dry.stdout
    assert not posts(simulator)

    applied = run_cli(tmp_path, "recover", "--since", since, "--apply", env=env)
    assert applied.returncode == 0, applied.stderr
    assert "Recovered 1 purchase(s)" in applied.stdout
    runtime = make_runtime(make_settings(tmp_path))
    try:
        assert set(orders_by_payment(runtime)) == {old["payment_id"]}
    finally:
        runtime.close()

    later = (installed + DAY).strftime("%Y-%m-%d")
    refused = run_cli(tmp_path, "recover", "--since", later, env=env)
    assert refused.returncode == 1
    assert "not before the service started watching" in refused.stderr
    bad = run_cli(tmp_path, "recover", "--since", "yesterday", env=env)
    assert bad.returncode == 2
    assert "YYYY-MM-DD" in bad.stderr
