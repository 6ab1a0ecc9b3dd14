"""Every statement a purchase makes finds its rows by their key on SQLite, however its indexes
happen to be ordered.

Without statistics (nobody runs ANALYZE) SQLite's planner cannot tell a key from a status:
for `WHERE order_id = ? AND kind = 'delivery'` an index on `order_id` and one on `kind` look
equally good, and the tie goes to the index created last. Which one that is differs between
installs (a batch migration re-creates a table's indexes in the order of a Python set), and
where it is the status (or kind) index, the statement walks every row of that status: every
delivery email, every scheduled cancellation, every waiting webhook (eight lookups by id lose
to it too). A flash sale then costs each purchase more than the one before it.

So this test puts the worst order in place (each low-cardinality index dropped and created
again, last), runs purchases of a message and of a stock item from payment to the webhook of
the cancelled membership, and asks SQLite for the plan of every statement that was sent: none
that names a key of a table may walk that table's status or kind index instead.

The planner has a second blind spot: it takes `column IS NULL` on a unique index for a lookup
of one row, where it is every row without a value (every order not paid: each checkout nobody
ever paid, for ever). No statement may search a unique index for its NULLs; the second test
runs each step of the payment matching rule with such orders in the table.

PostgreSQL has a blind spot of its own until autovacuum gives a table statistics (a fresh
install's first sale; never where autovacuum is off): the last test plans a purchase there,
behind a backlog of done purchases that has none.

Real parts: SQLite and PostgreSQL (the planners under test), the Whop simulator over HTTP, an
aiosmtpd sink."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    Engine,
    Index,
    Integer,
    String,
    Table,
    Text,
    cast,
    create_engine,
    func,
    insert,
    literal,
    select,
    text,
    true,
)

from support import backends
from support.facts import membership_facts, payment_facts
from support.harness import (
    MESSAGE_PLAN,
    STOCK_CATALOG,
    STOCK_PLAN,
    STOCK_POOL,
    drain,
    make_runtime,
    make_settings,
    wait_for,
)
from support.shop import Shop, open_shop
from support.statements import create_last, recorded, sqlite_plan
from whop_autocancel.admin.stock import import_stock
from whop_autocancel.cancellation.models import Cancellation, CancellationStatus
from whop_autocancel.clock import FrozenClock
from whop_autocancel.db.base import Base
from whop_autocancel.db.engine import Database
from whop_autocancel.delivery.stock import items_for
from whop_autocancel.orders.models import Order
from whop_autocancel.orders.service import close_unpaid_orders, new_order_id
from whop_autocancel.schema.migrate import upgrade
from whop_autocancel.simulator import SimulatorServer
from whop_autocancel.webhooks.inbox import Arrival, oldest_received_events, store_arrivals

# Columns that hold one of a handful of values (a status, a kind, a plan, a stock pool): an
# index on them finds a backlog, not a row.
LOW_CARDINALITY = frozenset({"status", "kind", "plan_id", "pool", "waiting_for_stock"})
# A message and a stock item each, their webhooks stored before any is applied: one apply
# chunk of eight events.
PLANS = (MESSAGE_PLAN, STOCK_PLAN, MESSAGE_PLAN, STOCK_PLAN)
# `table.column = ?` or `table.column IN (` in a statement's text (SQLAlchemy qualifies
# every column of a one-table statement with its table's name), but not the second half of
# `(table.column IS NULL OR table.column = ?)`, which no index answers.
TERM = re.compile(r"(?<!IS NULL OR )\b(\w+)\.(\w+) (?:= \?|IN \()")


@pytest.fixture
def shop(tmp_path: Path, clock: FrozenClock, simulator: SimulatorServer) -> Iterator[Shop]:
    yield from open_shop(tmp_path, clock, simulator, STOCK_CATALOG)  # (SQLite: the default)


def low_cardinality_indexes() -> dict[str, Index]:
    """Every index whose first column is a status or a kind, by name."""
    return {
        str(index.name): index
        for table in Base.metadata.tables.values()
        for index in table.indexes
        if index.columns.values()[0].name in LOW_CARDINALITY
    }


def key_columns(table: Table) -> set[str]:
    """The columns of `table` that find one row or a few: its primary key, a unique column,
    or the first column of an index that does not lead with a status."""
    keys = {column.name for column in table.primary_key.columns}
    keys |= {column.name for column in table.columns if column.unique}
    keys |= {index.columns.values()[0].name for index in table.indexes}
    return keys - LOW_CARDINALITY


def walks_a_backlog(statement: str, plan: list[str]) -> str | None:
    """Why this statement's plan (its steps) is wrong (None: it is not): it names a key of a
    table and still searches that table by a status or kind index."""
    named = TERM.findall(statement)
    indexes = low_cardinality_indexes()
    for step in plan:
        for name, index in indexes.items():
            if f"INDEX {name} " not in f"{step} ":
                continue
            table = index.table
            assert isinstance(table, Table)
            keys = sorted({c for t, c in named if t == table.name} & key_columns(table))
            if keys:
                return f"{step}: though it names {table.name}.{', '.join(keys)}"
    return None


def cancellation_ids(shop: Shop) -> list[int]:
    """The cancellations waiting for their call."""
    with shop.runtime.database.transaction() as session:
        return list(
            session.scalars(
                select(Cancellation.id).where(
                    Cancellation.status == CancellationStatus.SCHEDULED.value
                )
            )
        )


def test_no_statement_of_a_purchase_walks_a_status_index_past_its_key(shop: Shop) -> None:
    engine = shop.runtime.database.engine
    indexes = low_cardinality_indexes()
    assert {
        "ix_emails_kind",
        "ix_cancellations_status",
        "ix_webhook_events_status_received_at",
    } <= set(indexes)
    create_last(engine, indexes)
    import_stock(shop.runtime, STOCK_POOL, items_for([f"user{n}:pass{n}" for n in range(3)]))
    shop.smtp_up()
    with recorded(engine) as sent:
        buy_and_cancel(shop)
    assert len(reads_and_writes(sent)) > 20  # the whole purchase was recorded
    wrong = wrong_plans(engine, sent)
    assert wrong == [], "\n".join(wrong)


def buy_and_cancel(shop: Shop, first: int = 0) -> None:
    """`PLANS`' purchases (buyers numbered from `first`) from payment to the webhook of the
    cancelled membership."""
    whop = shop.simulator.state
    purchases = [
        whop.create_purchase(plan, email=f"buyer{first + n}@example.com")
        for n, plan in enumerate(PLANS)
    ]
    wait_for(lambda: whop.pending_webhooks() == 0)
    drain(shop.runtime)  # apply, deliver, the emails
    shop.clock.advance(6.0)  # past CANCEL_DELAY
    for cancellation_id in cancellation_ids(shop):
        shop.runtime.cancellations.run(cancellation_id)  # Whop's answer, the stop's checks
    shop.time_passes(2.0)  # the sweeps
    wait_for(lambda: whop.pending_webhooks() == 0)
    drain(shop.runtime)  # the webhooks of the cancelled memberships
    assert [shop.membership_status(purchase) for purchase in purchases] == ["canceled"] * len(PLANS)


def reads_and_writes(sent: list[tuple[str, Any]]) -> dict[str, Any]:
    """The SELECTs, UPDATEs and DELETEs among the statements sent, each once."""
    return {
        statement: parameters
        for statement, parameters in sent
        if statement.lstrip().split()[0].upper() in ("SELECT", "UPDATE", "DELETE")
    }


def wrong_plans(engine: Engine, sent: list[tuple[str, Any]]) -> list[str]:
    """What is wrong with the plan of each of them (`walks_a_backlog`, `looks_up_nulls`),
    with the statement from its FROM on. Each plan is asked of SQLite once."""
    unique = {table: unique_indexes(engine, table) for table in Base.metadata.tables}
    wrong = []
    for statement, parameters in reads_and_writes(sent).items():
        plan = sqlite_plan(engine, statement, parameters)
        reason = walks_a_backlog(statement, plan) or looks_up_nulls(statement, plan, unique)
        if reason is not None:
            wrong.append(f"{reason}\n    …{_from_on(statement)[:300]}")
    return wrong


def _from_on(statement: str) -> str:
    """The statement from its FROM on (its columns say nothing of its plan)."""
    flat = " ".join(statement.split())
    return flat[flat.find(" FROM ") :] if " FROM " in flat else flat


# `SEARCH table USING [COVERING] INDEX name (a=? AND b>?)`: the table, the index, its terms.
SEARCH = re.compile(r"SEARCH (\w+) USING (?:COVERING )?INDEX (\w+) \(([^)]*)\)")


def unique_indexes(engine: Engine, table: str) -> set[str]:
    """The names of `table`'s unique indexes (its primary key and unique columns')."""
    with engine.connect() as connection:
        rows = connection.exec_driver_sql(f"PRAGMA index_list({table})")
        return {str(row[1]) for row in rows if row[2]}


def looks_up_nulls(statement: str, plan: list[str], unique: dict[str, set[str]]) -> str | None:
    """Why this statement's plan is wrong (None: it is not): it searches a unique index for
    the rows where its column is NULL, which the statement asks only `IS NULL` of. SQLite
    plans `col IS NULL` as a lookup of one value (`col=?`), on a unique index of one row; but
    every row without a value has it: every order not paid, for ever. (On an index that is not
    unique the lookup is no worse than any other: the outbox finds its unsent emails so.)
    `unique`: each table's unique indexes (`unique_indexes`)."""
    for step in plan:
        found = SEARCH.search(step)
        if found is None:
            continue
        table, index, terms = found.groups()
        if index not in unique.get(table, set()):
            continue
        for term in terms.split(" AND "):
            column = term.split("=")[0].strip()
            asked = f"{table}.{column}"
            if f"{asked} IS NULL" in statement and not re.search(
                rf"\b{re.escape(asked)} (?:= \?|IN \()", statement
            ):
                return f"{step}: every row where {asked} IS NULL, taken for one"
    return None


def test_no_statement_that_matches_a_purchase_walks_the_unpaid_orders(
    tmp_path: Path, clock: FrozenClock
) -> None:
    """Every checkout nobody paid stays an order without a payment (pending, then abandoned),
    for ever: a shop gathers thousands. Matching a payment or a membership to its order, and the
    sweep that closes unpaid orders, must find their rows by what the event names, never walk
    the orders without a payment (nor a status or plan index past a key)."""
    runtime = make_runtime(make_settings(tmp_path), clock)
    try:
        engine = runtime.database.engine
        create_last(engine, low_cardinality_indexes())
        now = clock.now()
        checkout = "ch_reused"
        named = new_order_id()
        with runtime.database.transaction() as session:
            for n, (status, checkout_id) in enumerate(
                [
                    ("pending", checkout),
                    ("pending", "ch_other"),
                    ("pending", None),
                    ("abandoned", "ch_old"),
                ]
            ):
                session.add(
                    Order(
                        id=named if n == 2 else new_order_id(),
                        status=status,
                        created_at=now - timedelta(seconds=60),
                        plan_id=MESSAGE_PLAN,
                        checkout_configuration_id=checkout_id,
                        email="buyer@example.com",
                        order_metadata={},
                    )
                )
        orders = runtime.orders
        activated_first = membership_facts(checkout_configuration_id="ch_other")
        with recorded(engine) as sent, runtime.database.transaction() as session:
            # Each step of the matching rule once: the checkout, the membership (its
            # membership.activated came first), the order the metadata names, and none at all
            # (the window finds nobody: a new order).
            by_checkout = payment_facts(now, checkout_configuration_id=checkout)
            matched = [orders.apply_payment(session, by_checkout, now)]
            orders.apply_membership_live(session, activated_first, now)
            matched.append(
                orders.apply_payment(
                    session, payment_facts(now, membership_id=activated_first.membership_id), now
                )
            )
            matched.append(
                orders.apply_payment(session, payment_facts(now, metadata={"order_id": named}), now)
            )
            matched.append(
                orders.apply_payment(session, payment_facts(now, email="someone@example.com"), now)
            )
            orders.apply_membership_live(session, membership_facts(), now)
            close_unpaid_orders(session, now, limit=100)
        assert [order.matched_by for order in matched] == [
            "checkout_configuration_id",
            "membership_id",
            "metadata.order_id",
            "no matching order: new order",
        ]
        wrong = wrong_plans(engine, sent)
        assert wrong == [], "\n".join(wrong)
    finally:
        runtime.close()


# PostgreSQL without statistics.
#
# PostgreSQL plans from statistics that autovacuum gathers: at most once a minute, after 50
# rows and a tenth of a table changed, and never where autovacuum is off. A fresh install's
# first sale comes before them; without them the planner guesses fixed selectivities (a third of
# the rows for a range, one in two hundred for `=` or `IS NULL`), and a statement whose good
# plan depends on knowing how few rows are waiting (the outbox's due emails, one order's
# delivery emails) reads a table that grows with every purchase ever made.

# The tables that hold a row for every purchase ever made (the backlog `clone_backlog` writes),
# and the size from which a scan of one is wrong.
BACKLOG_COPIES = 1_000
BIG_TABLE = 1_000
# Tables that hold a few rows whatever the sales (a scan is their best plan).
SMALL_TABLES = frozenset({"leases", "locks", "service_markers", "rate_buckets"})


@pytest.fixture
def postgresql_url() -> Iterator[str]:
    """A database of this test's own, autovacuum off on every table: no statistics, ever."""
    url = backends.create_database("postgresql", "_plans")
    engine = create_engine(url)
    with engine.begin() as connection:
        for table in Base.metadata.tables:
            connection.execute(text(f"ALTER TABLE {table} SET (autovacuum_enabled = false)"))
    engine.dispose()
    try:
        yield url
    finally:
        backends.drop_database("postgresql", url)


@pytest.fixture
def postgresql_shop(
    tmp_path: Path, clock: FrozenClock, simulator: SimulatorServer, postgresql_url: str
) -> Iterator[Shop]:
    yield from open_shop(tmp_path, clock, simulator, STOCK_CATALOG, DATABASE_URL=postgresql_url)


def clone_backlog(engine: Engine, copies: int) -> dict[str, int]:
    """Every row of the purchases made so far, `copies` times over (each a purchase of its own:
    its keys suffixed, its references to the copied rows with them): the done purchases of a
    shop that has sold for a while. Returns each table's rows."""
    sizes = {}
    series = func.generate_series(1, copies).table_valued("copy").render_derived(name="copies")
    suffix = literal("_").concat(func.lpad(cast(series.c.copy, Text), 6, "0"))
    with engine.begin() as connection:
        for table in Base.metadata.sorted_tables:
            if table.name in SMALL_TABLES:
                continue
            keys = key_columns(table)
            columns, values = [], []
            for column in table.columns:
                if column.primary_key and isinstance(column.type, Integer):
                    continue  # a new id of its own
                columns.append(column)
                referenced = {key.column.table.name for key in column.foreign_keys}
                if isinstance(column.type, String) and (
                    column.name in keys or referenced - SMALL_TABLES
                ):
                    room = column.type.length
                    kept = func.left(column, room - len("_000000")) if room else column
                    values.append(kept.concat(suffix))
                else:
                    values.append(column)
            rows = select(*values).select_from(table.join(series, true()))
            connection.execute(insert(table).from_select(columns, rows))
            sizes[table.name] = connection.execute(
                select(func.count()).select_from(table)
            ).scalar_one()
    return sizes


def postgresql_plans(engine: Engine, statement: str, parameters: Any) -> list[dict[str, Any]]:
    """PostgreSQL's plans of `statement`: the one made for these parameters (a statement's
    first executions) and the generic one (psycopg prepares a statement from its fifth, and
    PostgreSQL then keeps a plan made without the values), each as its tree of nodes."""
    names: list[str] = []
    for name in re.findall(r"%\((\w+)\)s", statement):
        if name not in names:
            names.append(name)
    numbered = re.sub(r"%\((\w+)\)s", lambda found: f"${names.index(found[1]) + 1}", statement)
    if isinstance(parameters, list | tuple):  # sent once for each (`executemany`)
        parameters = parameters[0]
    with engine.connect() as connection:
        custom = connection.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {statement}", parameters)
        plans = [custom.scalar_one()[0]["Plan"]]
        connection.exec_driver_sql(f"PREPARE planned AS {numbered}")
        connection.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
        nulls = ", ".join("NULL" for _ in names)
        generic = connection.exec_driver_sql(
            f"EXPLAIN (FORMAT JSON) EXECUTE planned{f'({nulls})' if names else ''}"
        )
        plans.append(generic.scalar_one()[0]["Plan"])
        connection.exec_driver_sql("DEALLOCATE planned")
        connection.rollback()  # (and the SET with it)
    return plans


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


# `table.column = %(name)s`, `table.column IN (` (PostgreSQL's parameters) or `table.column =
# other.column` (a row of another table the statement found first).
PG_TERM = re.compile(r"(?<!IS NULL OR )\b(\w+)\.(\w+) (?:= %\(\w+\)s|IN \(|= \w+\.\w+)")


def reads_the_backlog(
    statement: str, plan: dict[str, Any], sizes: dict[str, int], unique: set[str]
) -> str | None:
    """Why this plan is wrong (None: it is not): it scans a table of the backlog, searches a
    status or kind index of a table whose key the statement names, or looks up the NULLs of a
    unique index (every row without a value)."""
    named = PG_TERM.findall(statement)
    indexes = low_cardinality_indexes()
    for node in nodes(plan):
        table = node.get("Relation Name")
        if node["Node Type"] == "Seq Scan" and sizes.get(str(table), 0) >= BIG_TABLE:
            return f"Seq Scan on {table} ({sizes[str(table)]} rows)"
        index_name = node.get("Index Name")
        if index_name is None:
            continue
        if index_name in indexes:
            owner = indexes[index_name].table
            assert isinstance(owner, Table)
            keys = sorted({c for t, c in named if t == owner.name} & key_columns(owner))
            if keys:
                return f"{node['Node Type']} on {index_name}: though it names {owner.name}.{keys}"
        if index_name in unique and "IS NULL" in str(node.get("Index Cond", "")):
            return f"{node['Node Type']} on {index_name} ({node['Index Cond']}): every NULL"
    return None


def test_no_statement_of_a_purchase_reads_the_backlog_on_postgresql_without_statistics(
    postgresql_shop: Shop,
) -> None:
    """A shop with a thousand purchases behind it and no statistics: each read and write of
    the next purchase finds its rows by an index, for its values and in the plan PostgreSQL
    keeps once psycopg prepares it."""
    shop = postgresql_shop
    engine = shop.runtime.database.engine
    items = [f"user{n}:pass{n}" for n in range(6)]
    import_stock(shop.runtime, STOCK_POOL, items_for(items))
    shop.smtp_up()
    buy_and_cancel(shop)  # the purchases the backlog is copied from
    sizes = clone_backlog(engine, BACKLOG_COPIES)
    assert sizes["emails"] >= BIG_TABLE, sizes
    assert sizes["orders"] >= BIG_TABLE, sizes
    with engine.connect() as connection:
        unique = {
            str(name)
            for (name,) in connection.exec_driver_sql(
                "SELECT indexname FROM pg_indexes WHERE schemaname = 'public' "
                "AND indexdef LIKE 'CREATE UNIQUE INDEX%%'"
            )
        }
        analyzed = connection.exec_driver_sql(
            "SELECT count(*) FROM pg_stats WHERE schemaname = 'public'"
        ).scalar_one()
    assert analyzed == 0  # the premise: nothing has statistics
    with recorded(engine) as sent:
        buy_and_cancel(shop, first=len(PLANS))
    assert len(reads_and_writes(sent)) > 20
    wrong = []
    for statement, parameters in reads_and_writes(sent).items():
        plans = postgresql_plans(engine, statement, parameters)
        for kind, plan in zip(("custom", "generic"), plans, strict=True):
            reason = reads_the_backlog(statement, plan, sizes, unique)
            if reason is not None:
                wrong.append(f"{kind}: {reason}\n    …{_from_on(statement)[:300]}")
    assert wrong == [], "\n".join(wrong)


WAITING = 3000  # webhooks stored and not applied yet, as a flash sale leaves them
APPLY_READ = 200  # the oldest an apply run reads at once (APPLY_BATCH)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "mariadb"])
def test_an_apply_run_reads_the_oldest_waiting_events_without_sorting_them_all(
    kind: str, tmp_path: Path, clock: FrozenClock
) -> None:
    """While applying catches up with a flash sale thousands of webhooks wait (`received`),
    and each apply run reads the oldest few hundred of them, in order. It must read them in
    an index's order and stop at the last it takes, not sort every waiting event: no
    temporary B-tree (SQLite), no Sort node without statistics or with them (PostgreSQL), no
    filesort (MariaDB)."""
    url = f"sqlite:///{tmp_path / 'oldest.db'}"
    if kind != "sqlite":
        url = backends.create_database(kind, "_oldest")
    database = Database(url)
    try:
        if kind == "sqlite":
            upgrade(database)
        start = clock.now()
        arrivals = [
            Arrival(f"msg_{n:05d}", "payment.succeeded", "{}", start + timedelta(seconds=n), None)
            for n in range(WAITING)
        ]
        database.run(lambda session: store_arrivals(session, arrivals))
        for statistics in (False, True) if kind == "postgresql" else (False,):
            if statistics:
                with database.engine.begin() as connection:
                    connection.exec_driver_sql("ANALYZE webhook_events")
            with recorded(database.engine) as sent:
                oldest = database.read(partial(oldest_received_events, limit=APPLY_READ))
            assert oldest == [arrival.event_id for arrival in arrivals[:APPLY_READ]]
            [(statement, parameters)] = sent
            assert not sorts(database.engine, statement, parameters), statement
    finally:
        database.dispose()
        if kind != "sqlite":
            backends.drop_database(kind, url)


def sorts(engine: Engine, statement: str, parameters: Any) -> list[str]:
    """The steps of `statement`'s plan that sort rows."""
    if engine.dialect.name == "sqlite":
        return [step for step in sqlite_plan(engine, statement, parameters) if "B-TREE" in step]
    if engine.dialect.name == "postgresql":
        return [
            node["Node Type"]
            for plan in postgresql_plans(engine, statement, parameters)
            for node in nodes(plan)
            if "Sort" in node["Node Type"]
        ]
    with engine.connect() as connection:
        rows = connection.exec_driver_sql(f"EXPLAIN {statement}", parameters).mappings().all()
    return [str(row["Extra"]) for row in rows if "filesort" in str(row["Extra"] or "")]
