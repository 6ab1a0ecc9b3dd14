"""Two events of one purchase applied at the same moment in two transactions (two web or
worker processes) make one order, on PostgreSQL and MariaDB: the second waits for the first's
lock on the purchase's keys (`lock_keys`), then finds the order it made.

Deterministic, no sleeps: the first transaction applies its event and stays open; the second
starts and the test waits until the database shows it waiting on a lock
(`backends.lock_waiters`: PostgreSQL's pg_stat_activity, MariaDB's process list), and only
then lets the first commit. Without the lock the second would not wait:
it would make an order of its own for the same membership, and the test would fail.

SQLite is not run: its write transactions already go one at a time (BEGIN IMMEDIATE), so the
keys take no lock there."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from support import backends
from support.facts import membership_facts, payment_facts
from support.harness import MESSAGE_PLAN, make_runtime, make_settings, wait_for
from support.statements import recorded
from whop_autocancel.clock import FrozenClock
from whop_autocancel.db.locks import KeysBusy, Lock, lock_keys, trying_locks
from whop_autocancel.orders.models import Order, OrderStatus
from whop_autocancel.orders.service import new_order_id
from whop_autocancel.runtime import Runtime
from whop_autocancel.whop.payloads import ClaimFacts

Apply = Callable[[Runtime, Session, datetime], object]


@pytest.fixture
def runtime(tmp_path: Path, clock: FrozenClock, database_url: str) -> Iterator[Runtime]:
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite runs one write transaction at a time: lock_keys takes no lock")
    runtime = make_runtime(make_settings(tmp_path, DATABASE_URL=database_url), clock)
    yield runtime
    runtime.close()


def _connection_id(session: Session) -> int:
    query = "SELECT pg_backend_pid()" if _postgresql(session) else "SELECT CONNECTION_ID()"
    return int(session.execute(text(query)).scalar_one())


def _postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _apply_at_once(runtime: Runtime, first: Apply, second: Apply) -> None:
    """`first` applied and held open until `second`'s transaction waits on a lock; then both
    commit. Fails if `second` never waits."""
    applied, release = threading.Event(), threading.Event()
    second_connection: list[int] = []
    errors: list[BaseException] = []
    database = runtime.database

    def run_first() -> None:
        try:
            with database.transaction() as session:
                first(runtime, session, runtime.clock.now())
                applied.set()
                if not release.wait(timeout=60):
                    raise TimeoutError("never released")
        except BaseException as error:
            errors.append(error)
            applied.set()

    def run_second() -> None:
        try:
            with database.transaction() as session:
                second_connection.append(_connection_id(session))
                second(runtime, session, runtime.clock.now())
        except BaseException as error:
            errors.append(error)
            second_connection.append(-1)

    one = threading.Thread(target=run_first)
    one.start()
    try:
        assert applied.wait(timeout=60)
        assert errors == []
        two = threading.Thread(target=run_second)
        two.start()
        wait_for(lambda: bool(second_connection), 30, "the second transaction's connection")
        try:
            wait_for(
                lambda: backends.lock_waiters(database.url, second_connection[0]) > 0,
                30,
                "the second event to wait for the first's lock on the purchase",
            )
        finally:
            release.set()
            two.join(timeout=60)
    finally:
        release.set()
        one.join(timeout=60)
    assert not one.is_alive()
    assert not two.is_alive()
    assert errors == []


def _payment(membership_id: str, **changes: Any) -> Apply:
    facts = payment_facts(None, membership_id=membership_id, **changes)
    return lambda runtime, session, now: runtime.orders.apply_payment(session, facts, now)


def _activated(membership_id: str, **changes: Any) -> Apply:
    facts = membership_facts(membership_id=membership_id, **changes)
    return lambda runtime, session, now: runtime.orders.apply_membership_live(session, facts, now)


def _orders_of(runtime: Runtime, membership_id: str) -> list[Order]:
    with runtime.database.transaction() as session:
        return list(session.scalars(select(Order).where(Order.whop_membership_id == membership_id)))


@pytest.mark.parametrize("rows_exist", [False, True], ids=["new-keys", "keys-locked-before"])
@pytest.mark.parametrize("payment_first", [True, False], ids=["payment-first", "activated-first"])
def test_a_payment_and_its_membership_applied_at_once_make_one_order(
    runtime: Runtime, payment_first: bool, rows_exist: bool
) -> None:
    """`rows_exist`: an earlier transaction locked these keys and committed (the first lock
    of a key makes its row, later ones lock the row that is there)."""
    membership_id = f"mem_{uuid.uuid4().hex[:12]}"
    payment_id = f"pay_{uuid.uuid4().hex[:12]}"
    if rows_exist:
        with runtime.database.transaction() as session:
            lock_keys(session, [f"payment:{payment_id}", f"membership:{membership_id}"])
    pay = _payment(membership_id, payment_id=payment_id)
    activate = _activated(membership_id)
    first, second = (pay, activate) if payment_first else (activate, pay)

    _apply_at_once(runtime, first, second)

    orders = _orders_of(runtime, membership_id)
    assert len(orders) == 1, [(o.id, o.status, o.whop_payment_id) for o in orders]
    assert orders[0].status == OrderStatus.PAID.value
    assert orders[0].whop_payment_id is not None


def test_two_payments_of_one_checkout_link_at_once_each_keep_their_own_order(
    runtime: Runtime,
) -> None:
    """A reused checkout link: two buyers pay through the same checkout at the same moment
    (two memberships, two payments). The checkout's order is bound to the first payment; the
    second waits on the checkout's key, then finds that order paid and gets one of its own.
    Without the lock it would find the order still unpaid and bind it to its payment as well,
    and the first payment would lose its order."""
    checkout = f"ch_{uuid.uuid4().hex[:12]}"
    order_id = new_order_id()
    with runtime.database.transaction() as session:
        session.add(
            Order(
                id=order_id,
                status=OrderStatus.PENDING.value,
                created_at=runtime.clock.now(),
                plan_id=MESSAGE_PLAN,
                checkout_configuration_id=checkout,
                email="buyer@example.com",
                order_metadata={},
            )
        )
    first_membership, second_membership = (f"mem_{uuid.uuid4().hex[:12]}" for _ in range(2))
    first_payment, second_payment = (f"pay_{uuid.uuid4().hex[:12]}" for _ in range(2))

    _apply_at_once(
        runtime,
        _payment(first_membership, payment_id=first_payment, checkout_configuration_id=checkout),
        _payment(second_membership, payment_id=second_payment, checkout_configuration_id=checkout),
    )

    with runtime.database.transaction() as session:
        by_payment = {
            order.whop_payment_id: order
            for order in session.scalars(
                select(Order).where(Order.whop_payment_id.in_([first_payment, second_payment]))
            )
        }
    assert set(by_payment) == {first_payment, second_payment}
    assert by_payment[first_payment].id == order_id
    assert by_payment[first_payment].whop_membership_id == first_membership
    assert by_payment[second_payment].id != order_id
    assert by_payment[second_payment].whop_membership_id == second_membership


def test_locking_the_same_keys_again_in_one_transaction_is_harmless(runtime: Runtime) -> None:
    """An apply chunk locks a purchase's keys once per event: the second time in the same
    transaction neither waits nor fails, and keys repeated or empty in one call are fine."""
    keys = [f"payment:{uuid.uuid4().hex}", f"membership:{uuid.uuid4().hex}"]
    with runtime.database.transaction() as session:
        lock_keys(session, [*keys, None, keys[0]])
        lock_keys(session, keys)
        lock_keys(session, [])


def test_a_lock_held_the_previous_versions_way_makes_lock_keys_wait(runtime: Runtime) -> None:
    """During a rolling upgrade a process of the previous version locks a key's row with
    `SELECT … FOR UPDATE` (after inserting it if absent): lock_keys must wait for it, or the
    two versions would not exclude each other."""
    key = f"membership:mem_{uuid.uuid4().hex[:12]}"
    with runtime.database.transaction() as session:
        lock_keys(session, [key])  # the row exists, as the previous version left it

    def previous_version(runtime: Runtime, session: Session, now: datetime) -> None:
        session.execute(select(Lock.key).where(Lock.key == key).with_for_update()).one()

    _apply_at_once(
        runtime, previous_version, lambda runtime, session, now: lock_keys(session, [key])
    )


def test_trying_keys_another_transaction_holds_raises_at_once(runtime: Runtime) -> None:
    """PostgreSQL: an apply transaction of several events only tries each purchase's keys
    (`trying_locks`): one that another transaction holds raises `KeysBusy` without waiting
    (a wait would run into the lock timeout here instead), so the transaction holds none of
    the other purchases it applied while it waits; keys nobody holds are taken, and an
    ordinary `lock_keys` waits for them."""
    with runtime.database.transaction() as session:
        if not _postgresql(session):
            pytest.skip("PostgreSQL only: MariaDB applies one event a transaction and waits")
    held, free = (f"{kind}:{uuid.uuid4().hex[:12]}" for kind in ("payment", "membership"))
    holder = runtime.database.sessions()
    holder.begin()
    lock_keys(holder, [held])
    try:
        with runtime.database.transaction() as session:
            session.execute(text("SET LOCAL lock_timeout = '20s'"))
            with trying_locks(session), pytest.raises(KeysBusy):
                lock_keys(session, [free, held])
    finally:
        holder.rollback()
        holder.close()

    def tried(runtime: Runtime, session: Session, now: datetime) -> None:
        with trying_locks(session):
            lock_keys(session, [free, held])

    _apply_at_once(runtime, tried, lambda runtime, session, now: lock_keys(session, [held]))


@pytest.mark.parametrize("event", ["payment", "activated", "refund"])
def test_an_apply_that_finds_its_purchase_busy_has_written_nothing(
    runtime: Runtime, event: str
) -> None:
    """PostgreSQL: an apply chunk goes on to its next event after `KeysBusy`, without rolling
    back, so each purchase's apply takes its keys before anything else: when they are busy,
    the lock statement is all it sent."""
    with runtime.database.transaction() as session:
        if not _postgresql(session):
            pytest.skip("PostgreSQL only: MariaDB applies one event a transaction and waits")
    payment_id, membership_id = f"pay_{uuid.uuid4().hex[:12]}", f"mem_{uuid.uuid4().hex[:12]}"
    applies: dict[str, Apply] = {
        "payment": _payment(membership_id, payment_id=payment_id),
        "activated": _activated(membership_id),
        "refund": lambda runtime, session, now: runtime.orders.apply_claim(
            session, ClaimFacts("refund", "rf_Busy", payment_id, "succeeded", "25.00", None), now
        ),
    }
    holder = runtime.database.sessions()
    holder.begin()
    lock_keys(holder, [f"payment:{payment_id}", f"membership:{membership_id}"])
    try:
        with (
            runtime.database.transaction() as session,
            trying_locks(session),
            recorded(runtime.database.engine) as sent,
            pytest.raises(KeysBusy),
        ):
            applies[event](runtime, session, runtime.clock.now())
    finally:
        holder.rollback()
        holder.close()
    assert [statement.split("(")[0].split() for statement, _ in sent] == [["WITH", "got", "AS"]]
