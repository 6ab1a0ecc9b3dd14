"""Webhook ingest under load (issue 12): the request path only verifies and stores, many events
to a transaction (group commit), and answers once the commit is done; the `webhooks.apply` job
applies each stored event once, and the sweep applies those whose job was lost. On SQLite,
PostgreSQL and MariaDB."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import event as sa_event
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from support import backends
from support.harness import (
    MESSAGE_PLAN,
    ServiceServer,
    drain,
    event_body,
    make_runtime,
    make_settings,
    signed_headers,
    wait_for,
)
from support.statements import recorded, verbs
from whop_autocancel.clock import FrozenClock
from whop_autocancel.db.locks import Lock, lock_keys
from whop_autocancel.orders.models import Order
from whop_autocancel.orders.service import purchase_keys
from whop_autocancel.runtime import Runtime
from whop_autocancel.webhooks.inbox import (
    APPLY_PER_TRANSACTION,
    APPLY_TASK,
    Arrival,
    per_apply_transaction,
    store_arrivals,
)
from whop_autocancel.webhooks.models import WebhookEvent


@pytest.fixture
def runtime(tmp_path: Path, clock: FrozenClock, database_url: str) -> Iterator[Runtime]:
    runtime = make_runtime(
        make_settings(tmp_path, DATABASE_URL=database_url, STUCK_GRACE=30, SWEEP_INTERVAL=60),
        clock,
    )
    yield runtime
    runtime.close()


def payment(number: int, plan: str = MESSAGE_PLAN) -> bytes:
    return event_body(
        "payment.succeeded.legacy.json",
        id=f"pay_Group{number}",
        plan={"id": plan, "metadata": {}},
        membership={"id": f"mem_Group{number}"},
        metadata={},
        checkout_configuration_id=None,
    )


def event_rows(runtime: Runtime) -> dict[str, tuple[str, int]]:
    """Every stored event: its status and attempts, by id."""
    with runtime.database.transaction() as session:
        return {
            event.id: (event.status, event.attempts)
            for event in session.scalars(select(WebhookEvent))
        }


def waiting(runtime: Runtime) -> set[str]:
    """The ids of the stored events not applied yet (`received`)."""
    return {
        event_id for event_id, (status, _) in event_rows(runtime).items() if status == "received"
    }


def order_count(runtime: Runtime) -> int:
    with runtime.database.transaction() as session:
        return int(session.scalar(select(func.count()).select_from(Order)) or 0)


def second_worker(runtime: Runtime, tmp_path: Path, clock: FrozenClock) -> Runtime:
    """A second worker process: its own runtime, on the same database and queue."""
    folder = tmp_path / "other"
    folder.mkdir()
    settings = runtime.settings
    return make_runtime(
        make_settings(
            folder,
            DATABASE_URL=settings.DATABASE_URL,
            QUEUE_URL=settings.QUEUE_URL,
            QUEUE_NAME=settings.QUEUE_NAME,
        ),
        clock,
    )


def store_unqueued(runtime: Runtime, bodies: list[bytes]) -> None:
    """Store each event as Whop's delivery would, then drop the apply jobs that queued."""
    for body in bodies:
        assert runtime.inbox.ingest(body, signed_headers(body)).body == {"status": "received"}
    runtime.jobs.huey.flush()


def commits_of_one_apply_run(runtime: Runtime) -> int:
    """Run the apply job here; how many transactions it committed (its reads' too)."""
    commits = []
    listener = lambda _connection: commits.append(1)  # noqa: E731
    sa_event.listen(runtime.database.engine, "commit", listener)
    try:
        runtime.jobs.run_here(APPLY_TASK)
    finally:
        sa_event.remove(runtime.database.engine, "commit", listener)
    return len(commits)


def apply_while_held(
    holder: Session, processes: Sequence[Runtime], until: Callable[[], bool], what: str
) -> None:
    """Run the apply job in each of `processes` while `holder`'s open transaction holds a
    purchase. Once `until()` is true a run must still be waiting on that purchase; then the
    holder rolls back, and every run must end."""
    pool = ThreadPoolExecutor(len(processes))
    try:
        runs = [pool.submit(process.jobs.run_here, APPLY_TASK) for process in processes]
        wait_for(until, 30, what)
        assert not all(run.done() for run in runs)  # one waits on the held purchase
        holder.rollback()
        for run in runs:
            run.result(timeout=60)
    finally:
        holder.close()
        pool.shutdown()


def queued(runtime: Runtime) -> list[str]:
    return [task.name for task in runtime.jobs.huey.pending()]


async def post_all(url: str, posts: list[bytes], connections: int) -> list[tuple[str, int, str]]:
    """Post every body at once over `connections` connections: (event id, status, answer)."""
    limits = httpx.Limits(max_connections=connections)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def post(body: bytes) -> tuple[str, int, str]:
            response = await client.post(
                "/webhooks/whop", content=body, headers=signed_headers(body)
            )
            answer = response.json().get("status", "") if response.status_code == 200 else ""
            return json.loads(body)["id"], response.status_code, answer

        return list(await asyncio.gather(*(post(body) for body in posts)))


def test_concurrent_deliveries_store_each_event_once_and_answer_after_the_commit(
    runtime: Runtime,
) -> None:
    bodies = [payment(number) for number in range(60)]
    # Each event three times, its copies side by side: they are in flight at the same moment.
    posts = [body for body in bodies for _ in range(3)]
    with ServiceServer(runtime).running() as server:
        answers = asyncio.run(post_all(server.url, posts, connections=32))
    assert Counter(status for _, status, _ in answers) == Counter({200: 180})
    by_event: dict[str, Counter[str]] = {}
    for event_id, _, answer in answers:
        by_event.setdefault(event_id, Counter())[answer] += 1
    assert len(by_event) == 60
    assert all(answers == Counter({"received": 1, "duplicate": 2}) for answers in by_event.values())
    rows = event_rows(runtime)
    assert set(rows) == set(by_event)  # one row per event id, each answered 200
    assert set(rows.values()) == {("received", 0)}  # stored only: nothing applied on the way
    assert order_count(runtime) == 0
    # One apply job per commit (not per request): fewer than the 60 events stored.
    assert set(queued(runtime)) == {APPLY_TASK}
    assert len(queued(runtime)) < 60


def test_one_batch_holding_an_event_twice_and_a_stored_one_stores_one_new_row(
    runtime: Runtime, clock: FrozenClock
) -> None:
    def arrival(event_id: str) -> Arrival:
        # (an event about no object stores None beside the others' ids, in one statement)
        object_id = None if event_id == "msg_c" else event_id.replace("msg_", "pay_")
        return Arrival(event_id, "payment.succeeded", "{}", clock.now(), object_id)

    with runtime.database.transaction() as session:
        assert store_arrivals(session, [arrival("msg_b")]) == ["received"]
    with runtime.database.transaction() as session:
        statuses = store_arrivals(
            session, [arrival("msg_c"), arrival("msg_a"), arrival("msg_b"), arrival("msg_a")]
        )
    assert statuses == ["received", "received", "duplicate", "duplicate"]
    assert event_rows(runtime) == {
        "msg_a": ("received", 0),
        "msg_b": ("received", 0),
        "msg_c": ("received", 0),
    }
    with runtime.database.transaction() as session:
        stored = session.execute(select(WebhookEvent.id, WebhookEvent.object_id)).all()
    assert dict(stored) == {"msg_a": "pay_a", "msg_b": "pay_b", "msg_c": None}


def test_two_processes_storing_the_same_events_at_once_keep_one_row_each(
    runtime: Runtime, tmp_path: Path, clock: FrozenClock
) -> None:
    other_path = tmp_path / "other"
    other_path.mkdir()
    other = make_runtime(
        make_settings(other_path, DATABASE_URL=runtime.settings.DATABASE_URL), clock
    )
    bodies = [payment(number) for number in range(40)]
    start = threading.Barrier(8)

    def deliver(inbox_of: Runtime, share: list[bytes]) -> list[tuple[str, int, str]]:
        start.wait()
        results = []
        for body in share:
            result = inbox_of.inbox.ingest(body, signed_headers(body))
            results.append((json.loads(body)["id"], result.http_status, result.body["status"]))
        return results

    try:
        # Four threads per "process", each delivering every event: the same id reaches both
        # processes' writers at once, over and over.
        with ThreadPoolExecutor(8) as pool:
            futures = [
                pool.submit(deliver, runtime if index % 2 else other, bodies) for index in range(8)
            ]
            answers = [answer for future in futures for answer in future.result()]
    finally:
        other.close()
    assert Counter(status for _, status, _ in answers) == Counter({200: 320})
    received = Counter(event_id for event_id, _, answer in answers if answer == "received")
    assert received == Counter({json.loads(body)["id"]: 1 for body in bodies})
    assert len(event_rows(runtime)) == 40


def test_a_batch_that_cannot_be_committed_is_answered_503_and_stores_nothing(
    runtime: Runtime, tmp_path: Path
) -> None:
    backend = runtime.database.backend
    if backend not in ("sqlite", "postgresql"):
        pytest.skip("makes the database unavailable on SQLite (its file) and PostgreSQL only")
    bodies = [payment(number) for number in range(20)]
    with ServiceServer(runtime).running() as server:
        if backend == "sqlite":
            path = tmp_path / "service.db"
            path.rename(tmp_path / "moved.db")
            path.mkdir()  # the database path is now a folder: nothing can be stored
        else:
            backends.allow_connections(runtime.settings.DATABASE_URL, False)
        runtime.database.engine.dispose()
        try:
            answers = asyncio.run(post_all(server.url, bodies, connections=20))
        finally:
            if backend == "sqlite":
                path.rmdir()
                (tmp_path / "moved.db").rename(path)
            else:
                backends.allow_connections(runtime.settings.DATABASE_URL, True)
            runtime.database.engine.dispose()
        assert Counter(status for _, status, _ in answers) == Counter({503: 20})
        assert event_rows(runtime) == {}
        assert queued(runtime) == []
        # Whop's redelivery is stored.
        again = asyncio.run(post_all(server.url, bodies, connections=20))
    assert Counter(answer for _, _, answer in again) == Counter({"received": 20})
    assert len(event_rows(runtime)) == 20


def test_the_apply_job_applies_each_event_once_with_workers_racing(
    runtime: Runtime, tmp_path: Path, clock: FrozenClock
) -> None:
    other = second_worker(runtime, tmp_path, clock)
    store_unqueued(runtime, [payment(number) for number in range(30)])  # (the racing runs apply)
    start = threading.Barrier(4)

    def worker(process: Runtime) -> None:
        start.wait()
        process.jobs.run_here(APPLY_TASK)

    try:
        # Two threads in each process: the second one in a process leaves the events to the
        # first (one run per process); the two processes race for every event.
        with ThreadPoolExecutor(4) as pool:
            runs = [pool.submit(worker, process) for process in (runtime, other) * 2]
            for future in runs:
                future.result()
    finally:
        other.close()
    assert set(event_rows(runtime).values()) == {("handled", 1)}  # each applied exactly once
    assert order_count(runtime) == 30
    # Each order's delivery enqueued once, by the transaction that applied its payment (both
    # processes share the queue).
    deliveries = [task for task in runtime.jobs.huey.pending() if task.name == "delivery.deliver"]
    assert len(deliveries) == len({tuple(task.args) for task in deliveries}) == 30


def test_a_purchase_held_elsewhere_holds_up_no_other_purchase(
    runtime: Runtime, tmp_path: Path, clock: FrozenClock
) -> None:
    """PostgreSQL, MariaDB: an apply transaction holds the locks of the purchases it applies
    until it commits, so one that waited on a purchase while it held others (the events it
    applied before) would hold them all, and every run after it that needs them, for as long.
    While one purchase's locks are held elsewhere (here: an open transaction that takes them
    as an apply does), two racing worker processes apply every other event (PostgreSQL: a
    chunk leaves the held purchase's event and goes on; MariaDB: one event a transaction);
    the held one waits, and is applied by the same run once the locks go."""
    if not runtime.database.skip_locked:
        pytest.skip("SQLite applies one transaction at a time: nothing to hold up")
    other = second_worker(runtime, tmp_path, clock)
    bodies = [payment(number) for number in range(24)]
    store_unqueued(runtime, bodies)  # (only the runs below apply)
    held = json.loads(bodies[3])["id"]  # payment 3's event
    holder = runtime.database.sessions()
    holder.begin()
    lock_keys(holder, purchase_keys("pay_Group3", "mem_Group3", None, None))
    try:
        apply_while_held(
            holder,
            (runtime, other),
            lambda: waiting(runtime) == {held},
            "every event but the held purchase's to be applied",
        )
    finally:
        other.close()
    assert set(event_rows(runtime).values()) == {("handled", 1)}
    assert order_count(runtime) == len(bodies)


def test_a_chunk_applied_again_for_a_failing_event_still_leaves_a_held_purchase(
    runtime: Runtime,
) -> None:
    """PostgreSQL: a chunk with an event that fails is applied again, each event in a
    savepoint; that second way too leaves an event whose purchase another transaction holds
    (its savepoint rolled back, nothing of it written) and applies it after, alone."""
    if runtime.database.backend != "postgresql":
        pytest.skip("PostgreSQL only: the chunks that try each purchase")
    bodies = [payment(number) for number in range(APPLY_PER_TRANSACTION - 1)]
    broken = json.dumps(
        {"id": "msg_broken", "type": "payment.succeeded", "data": {"plan": {"id": MESSAGE_PLAN}}}
    ).encode()
    store_unqueued(runtime, [*bodies[:2], broken, *bodies[2:]])  # (one chunk)
    held = json.loads(bodies[3])["id"]
    holder = runtime.database.sessions()
    holder.begin()
    lock_keys(holder, purchase_keys("pay_Group3", "mem_Group3", None, None))
    apply_while_held(
        holder,
        [runtime],
        lambda: waiting(runtime) == {held},
        "every event but the held purchase's to be applied or failed",
    )
    rows = event_rows(runtime)
    assert rows.pop("msg_broken") == ("failed", 1)
    assert set(rows.values()) == {("handled", 1)}
    assert order_count(runtime) == len(bodies)


def test_a_purchase_held_the_previous_versions_way_is_waited_for(runtime: Runtime) -> None:
    """PostgreSQL, MariaDB: during a rolling upgrade a process of the previous version holds a
    purchase by the row locks of its keys alone (on PostgreSQL this version also takes an
    advisory lock on each key first, which the previous one does not). The apply that takes
    that purchase's event waits for them, then applies it once."""
    if not runtime.database.skip_locked:
        pytest.skip("SQLite applies one transaction at a time: nothing to hold up")
    bodies = [payment(number) for number in range(12)]
    store_unqueued(runtime, bodies)
    held = json.loads(bodies[3])["id"]
    holder = runtime.database.sessions()
    holder.begin()
    keys = [key for key in purchase_keys("pay_Group3", "mem_Group3", None, None) if key]
    holder.add_all([Lock(key=key) for key in keys])  # its rows, inserted and not committed
    holder.flush()
    url = runtime.settings.DATABASE_URL
    apply_while_held(
        holder,
        [runtime],
        lambda: backends.lock_waiters(url) > 0 and event_rows(runtime)[held] == ("received", 0),
        "the apply to wait for the lock, the held purchase's event not applied",
    )
    assert set(event_rows(runtime).values()) == {("handled", 1)}
    assert order_count(runtime) == len(bodies)


def test_a_run_spends_no_transaction_on_each_event_another_run_holds(
    runtime: Runtime,
) -> None:
    """PostgreSQL, MariaDB: runs in several workers walk the same oldest events; a run takes
    one of the next few that no other run holds in each transaction, so the events another
    run holds cost it one transaction for all of them, not one each."""
    if not runtime.database.skip_locked:
        pytest.skip("SQLite applies one transaction at a time: no other run holds an event")
    bodies = [payment(number) for number in range(3 * APPLY_PER_TRANSACTION)]
    store_unqueued(runtime, bodies)
    held = [json.loads(body)["id"] for body in bodies[:APPLY_PER_TRANSACTION]]
    holder = runtime.database.sessions()
    holder.begin()
    assert len(
        holder.scalars(
            select(WebhookEvent).where(WebhookEvent.id.in_(held)).with_for_update()
        ).all()
    ) == len(held)
    try:
        commits = commits_of_one_apply_run(runtime)
    finally:
        holder.rollback()
        holder.close()
    rows = event_rows(runtime)
    assert {event_id for event_id, row in rows.items() if row == ("received", 0)} == set(held)
    applied = len(bodies) - len(held)
    assert sum(1 for row in rows.values() if row == ("handled", 1)) == applied
    # One transaction for each chunk applied (MariaDB: each event); beyond that its reads of
    # the waiting events and a few that found nothing to take: not one for each held event.
    applying = -(-applied // per_apply_transaction(runtime.database))
    assert applying < commits <= applying + 5
    runtime.jobs.run_here(APPLY_TASK)  # once they are free
    assert set(event_rows(runtime).values()) == {("handled", 1)}


def test_a_failing_apply_is_stored_failed_by_the_job_not_by_the_request(runtime: Runtime) -> None:
    body = json.dumps(
        {"id": "msg_noid", "type": "payment.succeeded", "data": {"plan": {"id": MESSAGE_PLAN}}}
    ).encode()
    assert runtime.inbox.ingest(body, signed_headers(body)).body == {"status": "received"}
    assert event_rows(runtime) == {"msg_noid": ("received", 0)}
    drain(runtime)
    with runtime.database.transaction() as session:
        event = session.get(WebhookEvent, "msg_noid")
        assert event is not None
        assert (event.status, event.attempts, event.next_attempt_at) == ("failed", 1, None)
        assert "payment has no id" in (event.last_error or "")


def test_the_sweep_applies_events_whose_apply_job_was_lost(
    runtime: Runtime, clock: FrozenClock
) -> None:
    body = payment(1)
    assert runtime.inbox.ingest(body, signed_headers(body)).body == {"status": "received"}
    runtime.jobs.huey.flush()  # the apply job is lost
    assert runtime.stuck_sweep.run(force=True).events == 0  # within the grace: not yet
    clock.advance(31)
    assert runtime.stuck_sweep.run(force=True).events == 1
    assert queued(runtime) == [APPLY_TASK]
    drain(runtime)
    assert set(event_rows(runtime).values()) == {("handled", 1)}
    assert order_count(runtime) == 1


def test_serve_applies_every_event_it_stores_without_the_sweep(
    tmp_path: Path, clock: FrozenClock, database_url: str
) -> None:
    """Web and in-process worker in one process (`serve`): events stored while apply runs are
    going are applied by them (a run that finds another going hands its events over), none
    waits for the sweep (an hour away here)."""
    runtime = make_runtime(
        make_settings(
            tmp_path,
            DATABASE_URL=database_url,
            STUCK_GRACE=3600,
            SWEEP_INTERVAL=3600,
            WORKER_HEARTBEAT_MAX_AGE=7200,
        ),
        clock,
    )
    try:
        with ServiceServer(runtime, with_worker=True).running() as server:
            for wave in range(4):  # bursts, and single events between them
                bodies = [payment(wave * 100 + number) for number in range(15)]
                answers = asyncio.run(post_all(server.url, bodies, connections=8))
                assert {answer for _, _, answer in answers} == {"received"}
                single = payment(wave * 100 + 99)
                assert asyncio.run(post_all(server.url, [single], connections=1))[0][2] == (
                    "received"
                )
            wait_for(
                lambda: set(event_rows(runtime).values()) == {("handled", 1)},
                30,
                "every stored event to be applied once",
            )
        assert len(event_rows(runtime)) == 64
        assert order_count(runtime) == 64
    finally:
        runtime.close()


def test_the_apply_job_applies_several_events_per_transaction_and_one_failure_stays_alone(
    runtime: Runtime,
) -> None:
    """Applying is batched too: a few events to a transaction (each in its own savepoint), so
    a burst costs a fraction of the commits (on SQLite, of its one writer's); one event to a
    transaction on MariaDB (see the tests above). An event that cannot apply fails alone."""
    per_transaction = per_apply_transaction(runtime.database)
    chunks = runtime.database.backend in ("sqlite", "postgresql")
    assert per_transaction == (APPLY_PER_TRANSACTION if chunks else 1)
    bodies = [payment(number) for number in range(2 * APPLY_PER_TRANSACTION)]
    broken = json.dumps(
        {"id": "msg_broken", "type": "payment.succeeded", "data": {"plan": {"id": MESSAGE_PLAN}}}
    ).encode()
    bodies.insert(3, broken)
    for body in bodies:
        assert runtime.inbox.ingest(body, signed_headers(body)).body == {"status": "received"}
    commits = commits_of_one_apply_run(runtime)
    rows = event_rows(runtime)
    assert rows.pop("msg_broken") == ("failed", 1)
    assert set(rows.values()) == {("handled", 1)}
    assert order_count(runtime) == len(bodies) - 1
    # The events' transactions plus one read of the ids waiting: fewer than asked for came
    # back, so the run ends without looking again.
    applying = -(-len(bodies) // per_transaction)
    assert commits == applying + 1


def test_a_chunk_of_events_is_marked_applied_in_one_statement(
    runtime: Runtime, clock: FrozenClock
) -> None:
    """The events of a transaction are recorded applied together, in one statement sent
    with a row for each, not each by the ORM's unit of work, which flushed one UPDATE for each
    event before the next event's first read (three events a purchase)."""
    bodies = [payment(number) for number in range(APPLY_PER_TRANSACTION)]
    for body in bodies:
        assert runtime.inbox.ingest(body, signed_headers(body)).body == {"status": "received"}
    with recorded(runtime.database.engine) as sent:
        runtime.jobs.run_here(APPLY_TASK)
    transactions = len(bodies) // per_apply_transaction(runtime.database)
    assert verbs(sent, 2).count("UPDATE WEBHOOK_EVENTS") == transactions
    with runtime.database.transaction() as session:
        events = session.scalars(select(WebhookEvent)).all()
        orders = {o.whop_payment_id: o.id for o in session.scalars(select(Order))}
    assert len(events) == len(bodies)
    for event in events:
        assert (event.status, event.attempts, event.handled_at) == ("handled", 1, clock.now())
        assert (event.last_error, event.next_attempt_at) == (None, None)
        assert event.order_id == orders[event.object_id]
