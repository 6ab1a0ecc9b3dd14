"""Listings that survive a terminal and a pipe (issue 11, item 3), run as real processes:
through a pipe at COLUMNS=80 (and without COLUMNS), on an 80-column pseudo-terminal, and with
`--wide`. Every line fits; every id shown is whole on its row; a column that does not fit is
hidden whole and named in the footer; `--wide` shows them all. Logs never land in a
command's output: console lines at a terminal, JSON through a pipe, LOG_FORMAT when set."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.cells import cell_len

from support.cli_shop import WIDTH, Shop, cli_shop
from support.harness import STOCK_POOL
from support.terminal import Run, hidden_columns, on_terminal, piped, table_lines
from whop_autocancel.mail.sink import SmtpSink
from whop_autocancel.simulator import SimulatorServer


@pytest.fixture
def shop(tmp_path: Path, simulator: SimulatorServer, smtp_sink: SmtpSink) -> Iterator[Shop]:
    with cli_shop(tmp_path, simulator, smtp_sink) as built:
        yield built


# Checks -------------------------------------------------------------------------------------


def whole(value: str, line: str) -> bool:
    return re.search(rf"(^|\s){re.escape(value)}(\s|$)", line) is not None


def check_listing(
    run: Run,
    first_header: str,
    columns: dict[str, list[str]],
    *,
    wide: bool = False,
    width: int = WIDTH,
) -> list[str]:
    """`columns`: header → the values its rows must show whole, one per row, in any order.
    Returns the headers shown. Fails naming what went wrong."""
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    if not wide:
        too_long = [line for line in lines if cell_len(line) > width]
        assert not too_long, "\n".join(too_long)
    header, rows, _ = table_lines(run.stdout, first_header)
    hidden = hidden_columns(run.stdout)
    named = [name for name in hidden if not name.startswith("+")]
    counted = sum(int(name[1:]) for name in hidden if name.startswith("+"))
    assert set(header) <= set(columns), header
    missing = [name for name in columns if name not in header]
    assert named == missing[: len(named)], (header, hidden)  # in the columns' order
    assert len(named) + counted == len(missing), (header, hidden)
    footers = [line for line in lines if line.startswith("Hidden: ")]
    assert len(footers) == (1 if missing else 0)  # one line, only when something is hidden
    for name, values in columns.items():
        if name not in header:
            continue
        for value in values:
            assert any(whole(value, row) for row in rows), f"{name} {value} not whole in {rows}"
    if wide:
        assert hidden == []
    return header


ORDER_HEADERS = (
    "ID",
    "Status",
    "Email",
    "Membership",
    "Cancellation",
    "Created",
    "Plan",
    "Payment",
    "Paid",
    "Delivered",
)


def order_columns(shop: Shop) -> dict[str, list[str]]:
    orders = shop.orders
    return {
        **{name: [] for name in ORDER_HEADERS},
        "ID": [order.id for order in orders],
        "Email": [order.email or "" for order in orders],
        "Membership": [order.whop_membership_id or "" for order in orders],
        "Plan": [order.plan_id or "" for order in orders],
        "Payment": [order.whop_payment_id or "" for order in orders],
    }


# Tests --------------------------------------------------------------------------------------


def test_orders_fit_80_columns_through_a_pipe_hiding_whole_columns(shop: Shop) -> None:
    run = shop.pipe("orders")
    header = check_listing(run, "ID", order_columns(shop))
    # The kept id, then the columns that fit by priority (the long addresses do not).
    assert header == ["ID", "Status", "Membership", "Cancellation"]
    hidden = hidden_columns(run.stdout)
    assert "Payment" in hidden
    assert hidden_columns(run.stdout) == [name for name in ORDER_HEADERS if name not in header]
    footer = [line for line in run.stdout.splitlines() if line.startswith("Hidden: ")]
    assert len(footer) == 1  # one line
    assert "│" not in run.stdout
    assert "\x1b" not in run.stdout  # no colour through a pipe


def test_a_pipe_without_columns_is_80_wide(shop: Shop) -> None:
    check_listing(shop.pipe("orders", columns=None), "ID", order_columns(shop))


def test_wide_shows_every_column_and_every_id(shop: Shop) -> None:
    run = shop.pipe("orders", "--wide")
    header = check_listing(run, "ID", order_columns(shop), wide=True)
    assert header == list(ORDER_HEADERS)
    assert any(len(line) > WIDTH for line in run.stdout.splitlines())


def test_a_wide_terminal_shows_more_columns(shop: Shop) -> None:
    narrow = check_listing(shop.pipe("orders"), "ID", order_columns(shop))
    wider = check_listing(shop.pipe("orders", columns=160), "ID", order_columns(shop), width=160)
    assert set(narrow) < set(wider)


def test_orders_on_an_80_column_terminal(shop: Shop) -> None:
    run = shop.terminal("orders")
    header = check_listing(run, "ID", order_columns(shop))
    assert hidden_columns(run.stdout)
    assert "ID" in header


def test_events_keep_their_long_ids_whole(shop: Shop) -> None:
    columns = {
        "ID": [event.id for event in shop.events],
        "Type": [],
        "Status": [],
        "Attempts": [],
        "Received": [],
        "Last error": [],
    }
    run = shop.pipe("events", "list")
    header = check_listing(run, "ID", columns)
    assert "Last error" in header  # shortened with an ellipsis, not hidden
    [broken] = [line for line in run.stdout.splitlines() if "BrokenPayment" in line]
    assert broken.rstrip().endswith("…") or "EventDataError" in broken
    check_listing(shop.pipe("events", "list", "--wide"), "ID", columns, wide=True)


def test_failed_cancellations_keep_the_id_retry_needs(shop: Shop) -> None:
    [row] = shop.cancellations
    [order] = [order for order in shop.orders if order.id == row.order_id]
    columns = {
        "ID": [str(row.id)],
        "Order": [row.order_id],
        "Membership": [row.membership_id or ""],
        "Customer": [order.email or ""],
        "Tries": [],
        "Gen": [],
        "HTTP": [],
        "Error": [],
        "Failed at": [],
    }
    for width in (80, 40):  # even where nothing else fits, the ID stays, whole
        run = shop.pipe("cancellations", "failed", columns=width)
        header, rows, _ = table_lines(run.stdout, "ID")
        assert header[0] == "ID"
        assert rows[0].split()[0] == str(row.id)
    check_listing(shop.pipe("cancellations", "failed"), "ID", columns)
    check_listing(shop.pipe("cancellations", "failed", "--wide"), "ID", columns, wide=True)


def test_emails_fit_too(shop: Shop) -> None:
    columns = {
        "ID": [str(email.id) for email in shop.emails if email.sent_at is None],
        "Status": [],
        "Kind": [],
        "Order": [],
        "To": [],
        "Tries": [],
        "Next attempt": [],
        "Last answer": [],
        "Created": [],
        "Sent/failed": [],
    }
    run = shop.pipe("emails")
    check_listing(run, "ID", columns)
    assert "To" in table_lines(run.stdout, "ID")[0]
    check_listing(shop.pipe("emails", "--wide"), "ID", columns, wide=True)
    check_listing(shop.terminal("emails"), "ID", columns)


def test_alerts_fit_too(shop: Shop) -> None:
    columns = {
        "ID": [str(alert.id) for alert in shop.alerts],
        "Kind": [],
        "Order": [alert.order_id for alert in shop.alerts if alert.order_id],
        "Subject": [],
        "Created": [],
        "Notified": [],
    }
    check_listing(shop.pipe("alerts"), "ID", columns)
    check_listing(shop.terminal("alerts"), "ID", columns)
    check_listing(shop.pipe("alerts", "--wide"), "ID", columns, wide=True)


def test_stock_levels_fit(shop: Shop) -> None:
    columns = {
        "Pool": [STOCK_POOL],
        "Available": [],
        "Assigned": [],
        "Void": [],
        "Threshold": [],
        "Waiting": [],
        "Plans": [],
    }
    check_listing(shop.pipe("stock", "levels"), "Pool", columns)
    check_listing(shop.pipe("stock", "levels", "--wide"), "Pool", columns, wide=True)


def test_stock_list_fits(shop: Shop) -> None:
    items = shop.tmp_path / "list.txt"
    items.write_text("".join(f"LIST-KEY-{n:04d}-QX\n" for n in range(3)))
    assert shop.pipe("stock", "import", STOCK_POOL, str(items)).returncode == 0
    listed = shop.pipe("stock", "list", STOCK_POOL, "--json").stdout.splitlines()
    ids = [str(json.loads(line)["id"]) for line in listed]
    reason = "leaked on a forum by a customer who posted the whole list of keys he was sent"
    assert shop.pipe("stock", "void", ids[-1], "--reason", reason).returncode == 0
    columns = {
        "ID": ids,
        "Status": [],
        "Order": [],
        "Created": [],
        "Assigned": [],
        "Voided": [],
        "Void reason": [],
    }
    run = shop.pipe("stock", "list", STOCK_POOL)
    check_listing(run, "ID", columns)
    assert "LIST-KEY" not in run.stdout  # numbers and states, never an item
    check_listing(shop.terminal("stock", "list", STOCK_POOL), "ID", columns)
    wide = shop.pipe("stock", "list", STOCK_POOL, "--wide")
    check_listing(wide, "ID", columns, wide=True)
    assert reason in wide.stdout


# Logs ---------------------------------------------------------------------------------------


def test_a_command_at_a_terminal_logs_console_lines_not_json(shop: Shop) -> None:
    env = {k: v for k, v in shop.env.items() if k != "LOG_FORMAT"}
    terminal = on_terminal(shop.tmp_path, "stock", "import", STOCK_POOL, str(items(shop)), env=env)
    assert terminal.returncode == 0, terminal.stdout
    lines = terminal.stdout.splitlines()
    assert any("stock_imported" in line for line in lines)  # the log line, readable
    assert not [line for line in lines if line.lstrip().startswith("{")]
    assert any(line.startswith(f"Pool {STOCK_POOL}: 2 item(s) added") for line in lines)


def test_through_a_pipe_logs_are_json_on_stderr_and_stdout_is_the_output(shop: Shop) -> None:
    env = {k: v for k, v in shop.env.items() if k != "LOG_FORMAT"}
    run = piped(shop.tmp_path, "stock", "import", STOCK_POOL, str(items(shop)), env=env)
    assert run.returncode == 0, run.stderr
    assert not [line for line in run.stdout.splitlines() if line.startswith("{")]
    logged = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("{")]
    assert [line["event"] for line in logged] == ["stock_imported"]


def test_log_format_when_set_is_kept_at_a_terminal(shop: Shop) -> None:
    terminal = on_terminal(
        shop.tmp_path,
        "stock",
        "import",
        STOCK_POOL,
        str(items(shop)),
        env={**shop.env, "LOG_FORMAT": "json"},
    )
    assert terminal.returncode == 0, terminal.stdout
    assert any(
        line.startswith("{") and '"stock_imported"' in line for line in terminal.stdout.splitlines()
    )


def items(shop: Shop) -> Path:
    path = shop.tmp_path / "items.txt"
    path.write_text("KEY-1\nKEY-2\n")
    return path
