"""`whop-autocancel backfill`: the live memberships of a listed one-time plan sold before the
service ran, cancelled and recorded like any other."""

from __future__ import annotations

from pathlib import Path

import httpx
from sqlalchemy import select

from support.harness import (
    MESSAGE_PLAN,
    UNLISTED_PLAN,
    make_runtime,
    make_settings,
    run_cli,
    service_environment,
)
from whop_autocancel.cancellation.models import Cancellation
from whop_autocancel.orders.models import Order
from whop_autocancel.simulator import SimulatorServer


def old_sales(simulator: SimulatorServer) -> list[str]:
    """Three live memberships of the listed plan, one already cancelled, one of another plan."""
    live = [
        simulator.state.create_purchase(
            MESSAGE_PLAN, email=f"old{n}@example.com", send_webhooks=False
        )["membership_id"]
        for n in range(3)
    ]
    gone = simulator.state.create_purchase(MESSAGE_PLAN, send_webhooks=False)["membership_id"]
    httpx.post(
        f"{simulator.api_url}/memberships/{gone}/cancel",
        json={"cancellation_mode": "immediate"},
        headers={"Authorization": f"Bearer {simulator.state.api_key}"},
    ).raise_for_status()
    simulator.state.create_purchase(UNLISTED_PLAN, send_webhooks=False)
    return live


def test_backfill_lists_then_cancels_the_live_memberships(
    tmp_path: Path, simulator: SimulatorServer
) -> None:
    live = old_sales(simulator)
    env = service_environment(tmp_path, WHOP_API_URL=simulator.api_url)
    assert run_cli(tmp_path, "migrate", env=env).returncode == 0

    dry = run_cli(tmp_path, "backfill", "--plan", MESSAGE_PLAN, "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert f"3 live membership(s) of {MESSAGE_PLAN}" in dry.stdout
    assert all(membership in dry.stdout for membership in live)
    assert "Dry run: nothing cancelled." in dry.stdout
    assert all(simulator.state.membership(m)["status"] == "completed" for m in live)

    done = run_cli(tmp_path, "backfill", "--plan", MESSAGE_PLAN, "--yes", env=env)
    assert done.returncode == 0, done.stderr
    assert "Done: 3 canceled." in done.stdout
    assert all(simulator.state.membership(m)["status"] == "canceled" for m in live)

    runtime = make_runtime(make_settings(tmp_path, DATABASE_URL=env["DATABASE_URL"]))
    with runtime.database.transaction() as session:
        orders = list(session.scalars(select(Order)))
        rows = list(session.scalars(select(Cancellation)))
    runtime.close()
    assert sorted(o.whop_membership_id or "" for o in orders) == sorted(live)
    assert all(o.order_metadata.get("backfill") for o in orders)
    assert [r.status for r in rows] == ["canceled"] * 3

    again = run_cli(tmp_path, "backfill", "--plan", MESSAGE_PLAN, "--yes", env=env)
    assert "0 live membership(s)" in again.stdout
    assert "Nothing to cancel." in again.stdout


def test_backfill_refuses_what_the_safety_rule_forbids(
    tmp_path: Path, simulator: SimulatorServer
) -> None:
    simulator.state.create_plan("plan_Monthly1", "renewal")
    env = service_environment(tmp_path, WHOP_API_URL=simulator.api_url)
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(catalog.read_text() + '\n[plans.plan_Monthly1]\ndelivery = "none"\n')
    assert run_cli(tmp_path, "migrate", env=env).returncode == 0
    unlisted = run_cli(tmp_path, "backfill", "--plan", UNLISTED_PLAN, "--yes", env=env)
    assert unlisted.returncode == 1
    assert "is not listed in the catalog" in unlisted.stderr
    renewal = run_cli(tmp_path, "backfill", "--plan", "plan_Monthly1", "--yes", env=env)
    assert renewal.returncode == 1
    assert "'renewal', not one_time" in renewal.stderr
    keep = run_cli(tmp_path, "backfill", "--plan", "plan_KeepMembership1", "--yes", env=env)
    assert keep.returncode == 1
    assert "delivery-only" in keep.stderr
    assert not [c for c in simulator.state.calls() if c["method"] == "POST"]
