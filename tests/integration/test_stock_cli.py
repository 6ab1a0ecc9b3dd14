"""`whop-autocancel stock …` and `orders resend`, run as real processes: exact counts, honest
exit codes, one clear line per refusal, and stock items that never reach a log (only
`stock show` prints one, on stdout, by design) nor the database in clear."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from support.harness import (
    STOCK_CATALOG,
    STOCK_KEY,
    STOCK_PLAN,
    STOCK_POOL,
    ServiceServer,
    deliver_event,
    drain,
    event_body,
    free_port,
    make_runtime,
    make_settings,
    post_event,
    run_cli,
    service_environment,
    wait_for,
)
from whop_autocancel.db.audit import AdminAction
from whop_autocancel.db.engine import Database
from whop_autocancel.delivery.models import StockItem
from whop_autocancel.mail.models import Email
from whop_autocancel.mail.sink import SmtpSink
from whop_autocancel.orders.models import Order
from whop_autocancel.runtime import Runtime
from whop_autocancel.sealing import Sealer, generate_key
from whop_autocancel.simulator import SimulatorServer

# Distinctive contents, so that finding one anywhere is never a coincidence.
ACCOUNT_A = "player.alpha@game.example:Zq8-ALPHA-do-not-log"
ACCOUNT_B = "player.bravo@game.example:Zq8-BRAVO-do-not-log"
ACCOUNT_C = "player.charlie@game.example:Zq8-CHARLIE-do-not-log"
ACCOUNT_D = "player.delta@game.example:Zq8-DELTA-do-not-log"
ALL_ACCOUNTS = (ACCOUNT_A, ACCOUNT_B, ACCOUNT_C, ACCOUNT_D)


# Helpers ------------------------------------------------------------------------------------


class Shell:
    """Runs `whop-autocancel` commands for one test, keeping every output for the log checks."""

    def __init__(self, tmp_path: Path, **overrides: str) -> None:
        self.tmp_path = tmp_path
        (tmp_path / "catalog.toml").write_text(STOCK_CATALOG)
        self.env = service_environment(
            tmp_path, **{"LOG_LEVEL": "DEBUG", "COLUMNS": "300", **overrides}
        )
        self.runs: list[tuple[tuple[str, ...], Any]] = []

    def __call__(self, *args: str, ok: bool = True, **overrides: str) -> Any:
        env = {**self.env, **overrides}
        result = run_cli(self.tmp_path, *args, env=env)
        self.runs.append((args, result))
        if ok:
            assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result

    @property
    def database_url(self) -> str:
        return self.env["DATABASE_URL"]

    def logs(self) -> str:
        """Every command's stderr: the JSON log lines (LOG_LEVEL=DEBUG) and error lines."""
        return "".join(result.stderr for _, result in self.runs)

    def stdout_except_show(self) -> str:
        return "".join(result.stdout for args, result in self.runs if args[:2] != ("stock", "show"))


def messages(result: Any) -> list[str]:
    """stderr without the JSON log lines: what the admin reads."""
    return [line for line in result.stderr.splitlines() if not line.startswith("{")]


def log_events(result: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]


def write_items(tmp_path: Path, name: str, *lines: str) -> str:
    path = tmp_path / name
    path.write_text("".join(f"{line}\n" for line in lines))
    return str(path)


def stored_items(database_url: str) -> dict[str, StockItem]:
    """Each stored item by its decrypted content (to learn the ids the commands take)."""
    sealer = Sealer(STOCK_KEY)
    database = Database(database_url)
    try:
        with database.transaction() as session:
            rows = list(session.scalars(select(StockItem).order_by(StockItem.id)))
            for row in rows:
                session.expunge(row)
    finally:
        database.dispose()
    return {sealer.open(row.content): row for row in rows}


def levels_row(stdout: str, pool: str) -> list[str]:
    """The cells of `pool`'s row in the `stock levels` table (plain text, cells two spaces or
    more apart)."""
    for line in stdout.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells and cells[0] == pool:
            return cells
    raise AssertionError(f"no row for pool {pool} in:\n{stdout}")


def listing_rows(stdout: str) -> list[list[str]]:
    """The rows of a `stock list` table (after its title and header), as cells."""
    lines = stdout.splitlines()
    assert lines[1].split()[:2] == ["ID", "Status"], stdout
    return [re.split(r"\s{2,}", line.strip()) for line in lines[2:]]


def snapshot(database_url: str) -> tuple[list[tuple[Any, ...]], int]:
    """Every stored item's row (content as stored) and the number of audited admin actions:
    what a dry run must leave exactly as it was."""
    database = Database(database_url)
    try:
        with database.transaction() as session:
            items = [
                tuple(row)
                for row in session.execute(select(StockItem.__table__).order_by(StockItem.id))
            ]
            actions = len(session.scalars(select(AdminAction.id)).all())
    finally:
        database.dispose()
    return items, actions


def summary(pool: str, added: int, blank: int, repeated: int, known: int, available: int) -> str:
    return (
        f"Pool {pool}: {added} item(s) added; skipped {blank + repeated + known} ({blank} blank, "
        f"{repeated} repeated in the file, {known} already in stock). Available now: {available}."
    )


def payment(
    email: str, *, payment_id: str | None = None, membership_id: str | None = None
) -> bytes:
    return event_body(
        "payment.succeeded.legacy.json",
        id=payment_id or f"pay_{uuid.uuid4().hex[:16]}",
        billing_reason="one_time",
        membership={"id": membership_id or f"mem_{uuid.uuid4().hex[:16]}", "status": "completed"},
        plan={"id": STOCK_PLAN, "metadata": {}},
        user={"id": "user_Stock1", "email": email},
        metadata={},
        checkout_configuration_id=None,
    )


def pay(runtime: Runtime, *emails: str) -> list[str]:
    """Signed payment webhooks for the stock plan, over HTTP to the real endpoint, each applied
    as the worker would; returns the orders' ids, in payment order."""
    payment_ids = []
    with (
        ServiceServer(runtime).running() as server,
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        for email in emails:
            body = payment(email)
            response = deliver_event(runtime, client, body)
            assert response.status_code == 200, response.text
            payment_ids.append(json.loads(body)["data"]["id"])
    with runtime.database.transaction() as session:
        return [
            session.scalars(select(Order.id).where(Order.whop_payment_id == paid)).one()
            for paid in payment_ids
        ]


def assert_never_in_clear(shell: Shell, *extra_logs: str) -> None:
    """No item in any log, in any output but `stock show`'s, nor in the files at rest."""
    assert shell.env["LOG_LEVEL"] == "DEBUG"  # the most verbose logs are the ones checked
    logs = shell.logs() + "".join(extra_logs)
    assert '"event": "stock_imported"' in logs
    stdout = shell.stdout_except_show()
    for account in ALL_ACCOUNTS:
        for part in (account, account.split(":")[1]):
            assert part not in logs
            assert part not in stdout
    for path in shell.tmp_path.iterdir():
        if path.name.startswith(("service.db", "queue.db")):
            data = path.read_bytes()
            for account in ALL_ACCOUNTS:
                assert account.encode() not in data, path.name


@pytest.fixture
def shell(tmp_path: Path) -> Shell:
    return Shell(tmp_path)


# keygen --------------------------------------------------------------------------------------


def test_keygen_prints_a_new_valid_key_even_when_the_current_one_is_broken(
    shell: Shell,
) -> None:
    first = shell("stock", "keygen", STOCK_ENCRYPTION_KEY="broken")
    second = shell("stock", "keygen")
    keys = [first.stdout, second.stdout]
    for output in keys:
        assert output.endswith("\n")
        assert output.count("\n") == 1  # one line, nothing else
        key = output.strip()
        assert len(key) == 44
        sealer = Sealer(key)
        assert sealer.open(sealer.seal(ACCOUNT_A)) == ACCOUNT_A
    assert keys[0] != keys[1]
    assert STOCK_KEY not in "".join(keys)
    # The printed key works as the setting.
    assert shell("stock", "levels", STOCK_ENCRYPTION_KEY=keys[0].strip()).returncode == 0


# import, levels, void, show on every database ------------------------------------------------


def test_import_levels_void_and_show(tmp_path: Path, database_url: str) -> None:
    shell = Shell(tmp_path, DATABASE_URL=database_url)
    if not database_url.startswith("sqlite"):
        shell("migrate")  # server databases are migrated by the admin; SQLite by itself
    items = write_items(
        tmp_path,
        "items.txt",
        ACCOUNT_A,
        "",
        f"   {ACCOUNT_B}  ",
        ACCOUNT_A,
        " \t ",
        ACCOUNT_C,
        f"{ACCOUNT_B}\t",
    )

    first = shell("stock", "import", STOCK_POOL, items)
    assert first.stdout.splitlines()[0] == summary(STOCK_POOL, 3, 2, 2, 0, 3)
    assert messages(first) == []
    [imported] = [event for event in log_events(first) if event["event"] == "stock_imported"]
    counts = {key: imported[key] for key in ("pool", "added", "skipped", "available", "waiting")}
    assert counts == {"pool": STOCK_POOL, "added": 3, "skipped": 4, "available": 3, "waiting": 0}

    again = shell("stock", "import", STOCK_POOL, items)
    assert again.stdout.splitlines()[0] == summary(STOCK_POOL, 0, 2, 2, 3, 3)

    more = write_items(tmp_path, "more.txt", ACCOUNT_C, ACCOUNT_D, ACCOUNT_A)
    third = shell("stock", "import", STOCK_POOL, more)
    assert third.stdout.splitlines()[0] == summary(STOCK_POOL, 1, 0, 0, 2, 4)

    stored = stored_items(shell.database_url)
    assert sorted(stored) == sorted(ALL_ACCOUNTS)  # stripped, each once
    assert {row.status for row in stored.values()} == {"available"}
    assert {row.pool for row in stored.values()} == {STOCK_POOL}
    for account, row in stored.items():
        assert account not in row.content  # a Fernet token, not the item
        assert row.fingerprint == Sealer(STOCK_KEY).fingerprint(account)

    levels = shell("stock", "levels")
    assert levels_row(levels.stdout, STOCK_POOL) == [
        "keys",
        "4",
        "0",
        "0",
        "2",
        "0",
        "Game account",
    ]
    assert "Orders are waiting" not in levels.stdout

    item_a, item_b = stored[ACCOUNT_A].id, stored[ACCOUNT_B].id
    voided = shell("stock", "void", str(item_a), "--reason", "password leaked")
    assert voided.stdout.strip() == (
        f"Stock item #{item_a} (pool keys) is void now; it will never be handed out."
    )
    [event] = [event for event in log_events(voided) if event["event"] == "stock_item_voided"]
    assert (event["item_id"], event["was"], event["order_id"]) == (item_a, "available", None)
    twice = shell("stock", "void", str(item_a))
    assert twice.stdout.strip() == (
        f"Stock item #{item_a} (pool keys) is already void; nothing to do."
    )
    assert not [event for event in log_events(twice) if event["event"] == "stock_item_voided"]
    unknown = shell("stock", "void", "999999", ok=False)
    assert unknown.returncode == 1
    assert messages(unknown) == [
        "whop-autocancel: no stock item #999999 (see `whop-autocancel stock list POOL`): "
        "nothing was voided"
    ]
    not_a_number = shell("stock", "void", "first", ok=False)
    assert not_a_number.returncode == 2  # typer's usage error

    levels = shell("stock", "levels")
    assert levels_row(levels.stdout, STOCK_POOL) == [
        "keys",
        "3",
        "0",
        "1",
        "2",
        "0",
        "Game account",
    ]

    shown = shell("stock", "show", str(item_a))
    assert shown.stdout.splitlines() == [
        f"Stock item #{item_a} · pool keys · void · void: password leaked",
        ACCOUNT_A,
    ]
    shown = shell("stock", "show", str(item_b))
    assert shown.stdout.splitlines() == [f"Stock item #{item_b} · pool keys · available", ACCOUNT_B]
    assert ACCOUNT_B not in shown.stderr  # the log line names the item, never its content
    missing = shell("stock", "show", "999999", ok=False)
    assert missing.returncode == 1
    assert messages(missing) == [
        "whop-autocancel: no stock item #999999 (see `whop-autocancel stock list POOL`)"
    ]

    assert_never_in_clear(shell)


def test_a_dry_run_shows_what_the_import_would_do_and_changes_nothing(tmp_path: Path) -> None:
    # The command's output, on SQLite; the preview's rules on all three databases are
    # test_stock.py's (`test_a_dry_run_reports_what_the_import_then_does_past_one_lookup_batch`).
    shell = Shell(tmp_path)
    shell("stock", "import", STOCK_POOL, write_items(tmp_path, "a.txt", ACCOUNT_A, ACCOUNT_B))
    shell("stock", "import", "spare", write_items(tmp_path, "c.txt", ACCOUNT_C), "--any-pool")
    stored = stored_items(shell.database_url)
    item_a, item_b, item_c = (stored[account].id for account in (ACCOUNT_A, ACCOUNT_B, ACCOUNT_C))
    shell("stock", "void", str(item_b))
    keys = [f"LICENSE-{n:04d}-QX" for n in range(1, 7)]
    file = write_items(
        tmp_path,
        "new.txt",
        ACCOUNT_C,  # line 1: in stock, in another pool
        "",  # line 2: blank
        ACCOUNT_D,  # line 3: new
        f"  {ACCOUNT_A} ",  # line 4: in stock (available), once trimmed
        ACCOUNT_D,  # line 5: repeats line 3
        ACCOUNT_B,  # line 6: in stock (void)
        "PIN-42",  # line 7: new, too short to show any of it
        *keys,  # lines 8-13: new
    )
    before = snapshot(shell.database_url)

    dry = shell("stock", "import", STOCK_POOL, file, "--dry-run")
    assert dry.stdout.splitlines() == [
        "Pool keys: 8 item(s) would be added; skipped 5 (1 blank, 1 repeated in the file, 3 "
        "already in stock). Available after: 9.",
        "The first 5 of the 8 new item(s), masked (first 2 characters and the length):",
        f'  line 3: "pl…" ({len(ACCOUNT_D)} characters)',
        '  line 7: "…" (6 characters)',
        '  line 8: "LI…" (15 characters)',
        '  line 9: "LI…" (15 characters)',
        '  line 10: "LI…" (15 characters)',
        "Repeated in the file (skipped):",
        "  line 5 repeats line 3",
        "Already in stock (skipped; in any pool and state):",
        f"  line 1 is item #{item_c} (pool spare, available)",
        f"  line 4 is item #{item_a} (pool keys, available)",
        f"  line 6 is item #{item_b} (pool keys, void)",
        "Dry run: nothing was imported. Run the command without --dry-run to import.",
    ]
    assert messages(dry) == []
    assert snapshot(shell.database_url) == before

    document = json.loads(shell("stock", "import", STOCK_POOL, file, "--dry-run", "--json").stdout)
    assert document == {
        "dry_run": True,
        "pool": STOCK_POOL,
        "would_add": 8,
        "skipped": 5,
        "blank": 1,
        "repeated_in_file": 1,
        "already_in_stock": 3,
        "available_now": 1,
        "available_after": 9,
        "waiting": 0,
        "low_stock_threshold": 2,
        "unit": "line",
        "new_items": [
            {"position": 3, "begins": "pl", "length": len(ACCOUNT_D)},
            {"position": 7, "begins": "", "length": 6},
            *({"position": n, "begins": "LI", "length": 15} for n in (8, 9, 10)),
        ],
        "repeats": [{"position": 5, "first": 3}],
        "in_stock": [
            {"position": 1, "item_id": item_c, "pool": "spare", "status": "available"},
            {"position": 4, "item_id": item_a, "pool": STOCK_POOL, "status": "available"},
            {"position": 6, "item_id": item_b, "pool": STOCK_POOL, "status": "void"},
        ],
    }
    assert snapshot(shell.database_url) == before

    # The real import does what the dry run said.
    real = shell("stock", "import", STOCK_POOL, file)
    assert real.stdout.splitlines()[0] == summary(STOCK_POOL, 8, 1, 1, 3, 9)
    assert_never_in_clear(shell)


def test_a_dry_run_of_a_csv_names_rows_and_is_refused_like_the_import(
    shell: Shell, tmp_path: Path
) -> None:
    csv_file = tmp_path / "accounts.csv"
    csv_file.write_text(f"login,note\n{ACCOUNT_A},first\n\n{ACCOUNT_B},second\n{ACCOUNT_A},again\n")
    dry = shell("stock", "import", STOCK_POOL, str(csv_file), "--column", "login", "--dry-run")
    assert dry.stdout.splitlines()[1:5] == [
        "The 2 new item(s), masked (first 2 characters and the length):",
        f'  row 2: "pl…" ({len(ACCOUNT_A)} characters)',
        f'  row 4: "pl…" ({len(ACCOUNT_B)} characters)',
        "Repeated in the file (skipped):",
    ]
    assert dry.stdout.splitlines()[5] == "  row 5 repeats row 2"
    assert stored_items(shell.database_url) == {}

    refused = shell("stock", "import", "key", str(csv_file), "--column", "1", "--dry-run", ok=False)
    assert refused.returncode == 1
    assert messages(refused) == [
        "whop-autocancel: no plan in the catalog delivers from pool 'key' (stock pools in the "
        "catalog: keys); check the name, or pass --any-pool to import into it anyway"
    ]
    json_alone = shell("stock", "import", STOCK_POOL, str(csv_file), "--json", ok=False)
    assert json_alone.returncode == 2
    assert "--json goes with --dry-run" in json_alone.stderr
    assert stored_items(shell.database_url) == {}
    assert ACCOUNT_A not in "".join(result.stdout + result.stderr for _, result in shell.runs)


def test_list_shows_numbers_and_states_newest_first_never_contents(tmp_path: Path) -> None:
    # The command's output, on SQLite; listing on all three databases is test_stock.py's.
    shell = Shell(tmp_path)
    shell("stock", "import", STOCK_POOL, write_items(tmp_path, "a.txt", *ALL_ACCOUNTS))
    stored = stored_items(shell.database_url)
    a, b, c, d = (stored[account].id for account in ALL_ACCOUNTS)
    shell("stock", "void", str(c), "--reason", "leaked")

    assert shell("stock", "list", "spare").stdout.strip() == "No stock items with pool spare."
    listing = shell("stock", "list", STOCK_POOL)
    assert listing.stdout.splitlines()[0] == "4 stock item(s) with pool keys, newest first"
    assert [row[:2] for row in listing_rows(listing.stdout)] == [
        [str(d), "available"],
        [str(c), "void"],
        [str(b), "available"],
        [str(a), "available"],
    ]
    void_only = shell("stock", "list", STOCK_POOL, "--status", "void")
    assert void_only.stdout.splitlines()[0] == (
        "1 stock item(s) with pool keys and status void, newest first"
    )
    assert [(row[0], row[1], row[-1]) for row in listing_rows(void_only.stdout)] == [
        (str(c), "void", "leaked")
    ]

    lines = shell("stock", "list", STOCK_POOL, "--json", "--limit", "3").stdout.splitlines()
    rows = [json.loads(line) for line in lines]
    assert [(row["id"], row["status"]) for row in rows] == [
        (d, "available"),
        (c, "void"),
        (b, "available"),
    ]
    assert set(rows[0]) == {
        "id",
        "pool",
        "status",
        "order_id",
        "created_at",
        "assigned_at",
        "voided_at",
        "void_reason",
    }
    assert rows[1]["void_reason"] == "leaked"
    assert rows[1]["voided_at"].endswith("Z")
    bad_name = shell("stock", "list", "two words", ok=False)
    assert bad_name.returncode == 1
    assert messages(bad_name)[0].startswith("whop-autocancel: pool 'two words': ")
    assert_never_in_clear(shell)


def test_void_takes_several_items_in_one_transaction(tmp_path: Path) -> None:
    # The command's output, on SQLite; all-or-none on all three databases is test_stock.py's
    # (`test_voiding_many_items_is_all_or_none_past_one_batch`).
    shell = Shell(tmp_path)
    shell("stock", "import", STOCK_POOL, write_items(tmp_path, "a.txt", *ALL_ACCOUNTS))
    stored = stored_items(shell.database_url)
    a, b, c, _ = (stored[account].id for account in ALL_ACCOUNTS)

    # Several items in one command (one process, one transaction); a repeated id counts once.
    voided = shell("stock", "void", str(a), str(c), str(a), "--reason", "leaked")
    assert voided.stdout.splitlines() == [
        f"Stock item #{a} (pool keys) is void now; it will never be handed out.",
        f"Stock item #{c} (pool keys) is void now; it will never be handed out.",
    ]
    events = [event for event in log_events(voided) if event["event"] == "stock_item_voided"]
    assert [event["item_id"] for event in events] == [a, c]

    # An unknown id among them: nothing is voided, and every unknown id is named.
    refused = shell("stock", "void", str(b), "999998", str(c), "999999", ok=False)
    assert refused.returncode == 1
    assert refused.stdout == ""
    assert messages(refused) == [
        "whop-autocancel: no stock item #999998 or #999999 (see `whop-autocancel stock list "
        "POOL`): nothing was voided"
    ]
    statuses = {
        row.id: (row.status, row.void_reason) for row in stored_items(shell.database_url).values()
    }
    assert statuses[b] == ("available", None)  # nothing half-done
    assert statuses[c] == ("void", "leaked")

    again = shell("stock", "void", str(b), str(c))
    assert again.stdout.splitlines() == [
        f"Stock item #{b} (pool keys) is void now; it will never be handed out.",
        f"Stock item #{c} (pool keys) is already void; nothing to do.",
    ]
    assert_never_in_clear(shell)


# CSV -----------------------------------------------------------------------------------------


def test_csv_import_by_column_name_number_and_delimiter(shell: Shell, tmp_path: Path) -> None:
    csv_file = tmp_path / "accounts.csv"
    csv_file.write_text(
        "email,password,note\n"
        f'{ACCOUNT_A.split(":")[0]},"pw, with comma",first\n'
        f'{ACCOUNT_B.split(":")[0]},"line one\nline two",second\n'
        "\n"
        f"{ACCOUNT_A.split(':')[0]},other,repeat\n"
    )
    by_name = shell("stock", "import", STOCK_POOL, str(csv_file), "--column", "email")
    assert by_name.stdout.splitlines()[0] == summary(STOCK_POOL, 2, 1, 1, 0, 2)
    assert "Still low: 2 item(s) left" in by_name.stdout  # threshold 2
    by_number = shell("stock", "import", STOCK_POOL, str(csv_file), "--column", "2")
    assert by_number.stdout.splitlines()[0] == summary(STOCK_POOL, 3, 1, 0, 0, 5)

    stored = stored_items(shell.database_url)
    assert "line one\nline two" in stored
    shown = shell("stock", "show", str(stored["line one\nline two"].id))
    assert shown.stdout.splitlines()[1:] == ["line one", "line two"]  # the whole item

    semicolons = tmp_path / "keys.csv"
    semicolons.write_text("K-1;ann\nK-2;bob\nK-1;carl\n")
    no_header = shell(
        "stock", "import", STOCK_POOL, str(semicolons), "--column", "1", "--delimiter", ";",
        "--no-header",
    )  # fmt: skip
    assert no_header.stdout.splitlines()[0] == summary(STOCK_POOL, 2, 0, 1, 0, 7)

    wrong = shell("stock", "import", STOCK_POOL, str(csv_file), "--column", "passwd", ok=False)
    assert wrong.returncode == 1
    assert messages(wrong) == [
        f"whop-autocancel: {csv_file}: no column 'passwd' in the header "
        "(columns: email, password, note)"
    ]
    delimiter = shell(
        "stock", "import", STOCK_POOL, str(csv_file), "--column", "1", "--delimiter", "::",
        ok=False,
    )  # fmt: skip
    assert delimiter.returncode == 1
    assert messages(delimiter) == ["whop-autocancel: --delimiter must be one character"]
    missing = shell("stock", "import", STOCK_POOL, str(tmp_path / "nope.txt"), ok=False)
    assert missing.returncode == 1
    assert messages(missing) == [f"whop-autocancel: {tmp_path / 'nope.txt'} does not exist"]
    # Nothing was added by the refused imports.
    assert len(stored_items(shell.database_url)) == 7


# Pools -----------------------------------------------------------------------------------------


def test_an_unknown_pool_is_refused_unless_any_pool(shell: Shell, tmp_path: Path) -> None:
    items = write_items(tmp_path, "items.txt", ACCOUNT_A, ACCOUNT_B)
    refused = shell("stock", "import", "key", items, ok=False, LOG_LEVEL="INFO")
    assert refused.returncode == 1
    assert messages(refused) == [
        "whop-autocancel: no plan in the catalog delivers from pool 'key' (stock pools in the "
        "catalog: keys); check the name, or pass --any-pool to import into it anyway"
    ]
    assert stored_items(shell.database_url) == {}

    bad_name = shell("stock", "import", "two words", items, "--any-pool", ok=False)
    assert bad_name.returncode == 1
    assert messages(bad_name) == [
        "whop-autocancel: pool 'two words': a pool name is 1-64 letters, digits, '.', '_' or "
        "'-', starting with a letter or digit"
    ]

    allowed = shell("stock", "import", "spare", items, "--any-pool")
    assert allowed.stdout.splitlines()[0] == summary("spare", 2, 0, 0, 0, 2)
    # Items are unique across pools: the same accounts are not added to `keys` as well.
    same = shell("stock", "import", STOCK_POOL, items)
    assert same.stdout.splitlines()[0] == summary(STOCK_POOL, 0, 0, 0, 2, 0)

    levels = shell("stock", "levels")
    assert levels_row(levels.stdout, "spare") == [
        "spare",
        "2 LOW",  # the default threshold (5) applies to a pool the catalog does not name
        "0",
        "0",
        "5",
        "0",
        "(not in the catalog)",
    ]
    assert levels_row(levels.stdout, STOCK_POOL) == [
        "keys",
        "0 LOW",
        "0",
        "0",
        "2",
        "0",
        "Game account",
    ]
    assert_never_in_clear(shell)


def test_no_pools_at_all(tmp_path: Path) -> None:
    env = service_environment(tmp_path)  # the catalog without stock plans
    del env["STOCK_ENCRYPTION_KEY"]
    result = run_cli(tmp_path, "stock", "levels", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "No stock pools: no plan in the catalog uses stock:<pool>, and none is stored."
    )


# Keys ------------------------------------------------------------------------------------------


def test_a_stock_catalog_without_a_key_stops_with_exit_2(shell: Shell, tmp_path: Path) -> None:
    items = write_items(tmp_path, "items.txt", ACCOUNT_A)
    del shell.env["STOCK_ENCRYPTION_KEY"]
    for args in (
        ("stock", "import", STOCK_POOL, items),
        ("stock", "levels"),
        ("stock", "void", "1"),
        ("stock", "show", "1"),
        ("orders", "resend", "ord_x"),
    ):
        result = shell(*args, ok=False, LOG_LEVEL="INFO")
        assert result.returncode == 2, args
        [line] = messages(result)
        assert line.startswith(
            "whop-autocancel: configuration error: STOCK_ENCRYPTION_KEY is not set, but the "
            f"catalog delivers from stock ({STOCK_PLAN}): "
        )
        assert "whop-autocancel stock keygen" in line


def test_importing_without_a_key_and_without_stock_plans_stops_with_exit_2(
    tmp_path: Path,
) -> None:
    items = write_items(tmp_path, "items.txt", ACCOUNT_A)
    env = service_environment(tmp_path)  # the catalog without stock plans
    del env["STOCK_ENCRYPTION_KEY"]
    result = run_cli(tmp_path, "stock", "import", "spare", items, "--any-pool", env=env)
    assert result.returncode == 2
    assert messages(result) == [
        "whop-autocancel: configuration error: STOCK_ENCRYPTION_KEY is not set: stock items are "
        "stored encrypted; create a key with `whop-autocancel stock keygen`, set it and keep a "
        "copy in a safe place (items cannot be read without it)"
    ]


def test_a_malformed_key_stops_with_exit_2_without_echoing_it(shell: Shell) -> None:
    bad = STOCK_KEY[:-2]
    result = shell("stock", "levels", ok=False, STOCK_ENCRYPTION_KEY=bad)
    assert result.returncode == 2
    assert messages(result) == [
        "whop-autocancel: configuration error: STOCK_ENCRYPTION_KEY: key 1 is not a Fernet key "
        "(44 characters of url-safe base64); create one with `whop-autocancel stock keygen`"
    ]
    assert bad not in result.stderr


def test_a_changed_key_cannot_read_old_items_and_rotation_can(shell: Shell, tmp_path: Path) -> None:
    items = write_items(tmp_path, "items.txt", ACCOUNT_A, ACCOUNT_B)
    shell("stock", "import", STOCK_POOL, items)
    item = stored_items(shell.database_url)[ACCOUNT_A].id
    new_key = generate_key()

    wrong = shell("stock", "show", str(item), ok=False, STOCK_ENCRYPTION_KEY=new_key)
    assert wrong.returncode == 1
    assert messages(wrong) == [
        "whop-autocancel: a stored secret cannot be decrypted with STOCK_ENCRYPTION_KEY: was the "
        "key changed? Put the old key after the new one (space-separated) so both decrypt"
    ]
    assert ACCOUNT_A not in wrong.stdout + wrong.stderr

    rotated = f"{new_key} {STOCK_KEY}"
    shown = shell("stock", "show", str(item), STOCK_ENCRYPTION_KEY=rotated)
    assert shown.stdout.splitlines()[1] == ACCOUNT_A
    # Duplicates stored under the old key are still found under the new one…
    again = shell("stock", "import", STOCK_POOL, items, STOCK_ENCRYPTION_KEY=rotated)
    assert again.stdout.splitlines()[0] == summary(STOCK_POOL, 0, 0, 0, 2, 2)
    # …and new items are sealed with the new (first) key.
    more = write_items(tmp_path, "more.txt", ACCOUNT_C, ACCOUNT_A)
    added = shell("stock", "import", STOCK_POOL, more, STOCK_ENCRYPTION_KEY=rotated)
    assert added.stdout.splitlines()[0] == summary(STOCK_POOL, 1, 0, 0, 1, 3)
    database = Database(shell.database_url)
    try:
        with database.transaction() as session:
            rows = {row.id: row.content for row in session.scalars(select(StockItem))}
    finally:
        database.dispose()
    opened_by_new = {row_id for row_id, token in rows.items() if _opens(new_key, token)}
    assert len(opened_by_new) == 1
    assert Sealer(new_key).open(rows[opened_by_new.pop()]) == ACCOUNT_C
    assert_never_in_clear(shell)


def _opens(key: str, token: str) -> bool:
    try:
        Sealer(key).open(token)
    except Exception:
        return False
    return True


# Orders waiting for stock, levels, void of a delivered item, resend ----------------------------


@pytest.fixture
def runtime(tmp_path: Path, smtp_sink: SmtpSink) -> Iterator[Runtime]:
    (tmp_path / "catalog.toml").write_text(STOCK_CATALOG)
    built = make_runtime(make_settings(tmp_path, SMTP_URL=smtp_sink.url, CANCEL_DELAY=3600))
    yield built
    built.close()


def test_levels_void_and_resend_with_real_orders(
    tmp_path: Path, runtime: Runtime, smtp_sink: SmtpSink
) -> None:
    shell = Shell(tmp_path)
    shell("stock", "import", STOCK_POOL, write_items(tmp_path, "a.txt", ACCOUNT_A, ACCOUNT_B))
    first, second, third = pay(runtime, "ann@example.com", "bob@example.com", "carl@example.com")
    drain(runtime)
    stored = stored_items(shell.database_url)
    assert stored[ACCOUNT_A].order_id == first  # oldest item to the first payment
    assert stored[ACCOUNT_B].order_id == second
    assert ACCOUNT_A in smtp_sink.to("ann@example.com")[0].text

    listing = shell("orders")
    assert "3 order(s), newest first" in listing.stdout
    for order_id in (first, second, third):
        assert order_id in listing.stdout
    assert "delivery_failed (waiting for stock keys)" in listing.stdout

    levels = shell("stock", "levels")
    assert levels_row(levels.stdout, STOCK_POOL) == [
        "keys",
        "0 LOW",
        "2",
        "0",
        "2",
        "1",
        "Game account",
    ]
    assert "Orders are waiting for stock" in levels.stdout

    item_a = stored[ACCOUNT_A].id
    voided = shell("stock", "void", str(item_a), "--reason", "customer shared it")
    assert voided.stdout.strip() == (
        f"Stock item #{item_a} (pool keys) is void now. It was delivered to order {first}: "
        "rotate it where it lives (password, license server) so that copy stops working."
    )
    shown = shell("stock", "show", str(item_a))
    assert shown.stdout.splitlines() == [
        f"Stock item #{item_a} · pool keys · void · order {first} · void: customer shared it",
        ACCOUNT_A,
    ]
    listed = listing_rows(shell("stock", "list", STOCK_POOL).stdout)
    assert [row[:3] for row in listed] == [
        [str(stored[ACCOUNT_B].id), "assigned", second],
        [str(item_a), "void", first],
    ]

    # A dry run of the refill says what it would do, and serves nobody.
    refill_file = write_items(tmp_path, "b.txt", ACCOUNT_B, ACCOUNT_C)
    dry = shell("stock", "import", STOCK_POOL, refill_file, "--dry-run")
    assert dry.stdout.splitlines() == [
        "Pool keys: 1 item(s) would be added; skipped 1 (0 blank, 0 repeated in the file, 1 "
        "already in stock). Available after: 1.",
        "The 1 new item(s), masked (first 2 characters and the length):",
        f'  line 2: "pl…" ({len(ACCOUNT_C)} characters)',
        "Already in stock (skipped; in any pool and state):",
        f"  line 1 is item #{stored[ACCOUNT_B].id} (pool keys, assigned)",
        "1 order(s) are waiting for this pool: the worker would deliver 1 of them, oldest "
        "payment first.",
        "Would still be low: 0 item(s) left once the waiting orders are served, at or below "
        "the pool's low-stock threshold (2).",
        "Dry run: nothing was imported. Run the command without --dry-run to import.",
    ]
    drain(runtime)
    assert ACCOUNT_C not in stored_items(shell.database_url)
    assert len(smtp_sink.to("carl@example.com")) == 0

    # Refill: the waiting order is served by the worker, oldest payment first.
    refill = shell("stock", "import", STOCK_POOL, refill_file)
    assert refill.stdout.splitlines() == [
        summary(STOCK_POOL, 1, 0, 0, 1, 1),
        "1 order(s) were waiting for this pool: the worker delivers 1 of them now, oldest "
        "payment first.",
        "Still low: 0 item(s) left once the waiting orders are served, at or below the pool's "
        "low-stock threshold (2).",
    ]
    levels = shell("stock", "levels")
    # (The voided item left "assigned": it counts as void now, still held by its order.)
    assert levels_row(levels.stdout, STOCK_POOL)[1:6] == ["1 LOW", "1", "1", "2", "1"]
    drain(runtime)
    assert stored_items(shell.database_url)[ACCOUNT_C].order_id == third
    levels = shell("stock", "levels")
    assert levels_row(levels.stdout, STOCK_POOL)[1:6] == ["0 LOW", "2", "1", "2", "0"]
    assert "Orders are waiting" not in levels.stdout

    # Resend: the same item again, to the same customer.
    resent = shell("orders", "resend", second)
    item_b = stored[ACCOUNT_B].id
    assert resent.stdout.strip() == (
        f"Order {second}: the delivery email (stock item #{item_b} from pool keys to "
        "bob@example.com) is queued again to bob@example.com; a running worker sends it."
    )
    drain(runtime)
    bob = smtp_sink.to("bob@example.com")
    assert len(bob) == 2
    assert all(ACCOUNT_B in message.text for message in bob)
    with runtime.database.transaction() as session:
        emails = list(
            session.scalars(select(Email).where(Email.order_id == second, Email.kind == "delivery"))
        )
    assert len(emails) == 2
    assert all(email.sealed and ACCOUNT_B not in email.text_body for email in emails)

    # A voided item is not sent again; nor is anything for an unknown order.
    refused = shell("orders", "resend", first, ok=False)
    assert refused.returncode == 1
    assert messages(refused) == [
        f"whop-autocancel: cannot resend order {first}: stock item #{item_a} of order {first} "
        "was voided (customer shared it); it must not be sent again"
    ]
    unknown = shell("orders", "resend", "ord_DoesNotExist1", ok=False)
    assert unknown.returncode == 1
    assert messages(unknown) == [
        "whop-autocancel: no order ord_DoesNotExist1 (see `whop-autocancel orders`)"
    ]
    assert len(smtp_sink.to("ann@example.com")) == 1

    assert_never_in_clear(shell)


def test_a_waiting_order_cannot_be_resent(tmp_path: Path, runtime: Runtime) -> None:
    shell = Shell(tmp_path)
    [order_id] = pay(runtime, "dora@example.com")
    drain(runtime)
    result = shell("orders", "resend", order_id, ok=False)
    assert result.returncode == 1
    assert messages(result) == [
        f"whop-autocancel: order {order_id} is delivery_failed, not delivered: there is nothing "
        "to send again"
    ]


# A real worker process: its logs never hold the item either -------------------------------------


def test_a_worker_delivers_and_resends_without_logging_the_item(
    tmp_path: Path, smtp_sink: SmtpSink, simulator: SimulatorServer
) -> None:
    shell = Shell(tmp_path, SMTP_URL=smtp_sink.url, WHOP_API_URL=simulator.api_url)
    shell.env["CANCEL_DELAY"] = "0.2"
    shell("stock", "import", STOCK_POOL, write_items(tmp_path, "items.txt", ACCOUNT_D))
    purchase = simulator.state.create_purchase(
        STOCK_PLAN, email="erin@example.com", send_webhooks=False
    )
    runtime = make_runtime(make_settings(tmp_path, WHOP_API_URL=simulator.api_url))
    try:
        with (
            ServiceServer(runtime).running() as server,
            httpx.Client(base_url=server.url, timeout=10) as client,
        ):
            body = payment(
                "erin@example.com",
                payment_id=purchase["payment_id"],
                membership_id=purchase["membership_id"],
            )
            assert post_event(client, body).status_code == 200
    finally:
        runtime.close()

    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "whop_autocancel", "worker"],
            env=shell.env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(lambda: len(smtp_sink.to("erin@example.com")) == 1, 60, "the delivery")
            [order_id] = [
                row.order_id for row in stored_items(shell.database_url).values() if row.order_id
            ]
            shell("orders", "resend", order_id)
            wait_for(lambda: len(smtp_sink.to("erin@example.com")) == 2, 60, "the resend")
            wait_for(
                lambda: (
                    simulator.state.membership(purchase["membership_id"])["status"] == "canceled"
                ),
                60,
                "the cancellation",
            )
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
    assert all(ACCOUNT_D in message.text for message in smtp_sink.to("erin@example.com"))
    worker_log = log_path.read_text()
    for event in ('"event": "delivered"', '"event": "email_sent"', '"event": "cancelled"'):
        assert event in worker_log
    assert_never_in_clear(shell, worker_log)


def test_an_import_that_leaves_the_pool_low_says_so(shell: Shell, tmp_path: Path) -> None:
    low = shell("stock", "import", STOCK_POOL, write_items(tmp_path, "two.txt", "K-1", "K-2"))
    assert "Available now: 2." in low.stdout
    assert "Still low: 2 item(s) left once the waiting orders are served" in low.stdout
    assert "low-stock threshold (2)" in low.stdout
    enough = shell("stock", "import", STOCK_POOL, write_items(tmp_path, "one.txt", "K-3"))
    assert "Available now: 3." in enough.stdout
    assert "Still low" not in enough.stdout


# serve ---------------------------------------------------------------------------------------


def serve_events(shell: Shell) -> list[dict[str, Any]]:
    """Start `serve` as a real process, wait until it answers, stop it (SIGTERM): its log."""
    port = free_port()
    log_path = shell.tmp_path / f"serve-{port}.log"

    def answers() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "whop_autocancel", "serve", "--port", str(port)],
            env=shell.env,
            cwd=shell.tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(lambda: process.poll() is not None or answers(), 60, "serve to answer")
            assert process.poll() is None, log_path.read_text()
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    return [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]


def test_serve_warns_at_start_of_the_listed_pools_that_are_empty(
    shell: Shell, tmp_path: Path
) -> None:
    events = serve_events(shell)
    warnings = [event for event in events if event["event"] == "stock_pools_empty"]
    assert len(warnings) == 1, events
    [warning] = warnings
    assert warning["level"] == "warning"
    assert warning["pools"] == [STOCK_POOL]
    assert warning["action"] == f"whop-autocancel stock import {STOCK_POOL} FILE"
    assert "wait" in warning["consequence"]
    names = [event["event"] for event in events]
    assert names.index("stock_pools_empty") < names.index("Application startup complete.")

    shell("stock", "import", STOCK_POOL, write_items(tmp_path, "items.txt", ACCOUNT_A))
    assert "stock_pools_empty" not in [event["event"] for event in serve_events(shell)]
