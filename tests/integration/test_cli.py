"""The command line, run as real processes: clear lines, honest exit codes."""

from __future__ import annotations

import itertools
import json
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer.main
from rich.cells import cell_len
from sqlalchemy.engine import make_url

from support.harness import (
    free_port,
    make_runtime,
    make_settings,
    run_cli,
    service_environment,
    wait_for,
)
from support.terminal import help_pages, on_terminal
from whop_autocancel.cancellation.models import Cancellation
from whop_autocancel.cli import app
from whop_autocancel.orders.models import Order
from whop_autocancel.schema.migrate import HEAD_REVISION
from whop_autocancel.settings import normalise_database_url


def test_serve_without_settings_stops_with_one_line_naming_the_setting(tmp_path: Path) -> None:
    env = service_environment(tmp_path)
    del env["WHOP_API_KEY"]
    result = run_cli(tmp_path, "serve", env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "whop-autocancel: configuration error: WHOP_API_KEY is not set: set it to your Whop "
        "account API key (Dashboard → Developer → API keys)"
    ]


def test_every_missing_and_invalid_setting_is_named_in_one_error(tmp_path: Path) -> None:
    env = service_environment(tmp_path, CANCEL_DELAY="-1", SMTP_URL="http://mail")
    for name in ("WHOP_API_KEY", "ADMIN_EMAILS", "MAIL_FROM"):
        del env[name]
    result = run_cli(tmp_path, "serve", env=env)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "whop-autocancel: configuration error: 5 settings to fix:"
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        "CANCEL_DELAY",
        "SMTP_URL",
        "WHOP_API_KEY is not set",
        "ADMIN_EMAILS is not set",
        "MAIL_FROM is not set",
    ]


def test_a_whop_listing_command_names_both_settings_it_lacks(tmp_path: Path) -> None:
    env = service_environment(tmp_path)
    del env["WHOP_API_KEY"], env["WHOP_COMPANY_ID"]
    assert run_cli(tmp_path, "migrate", env=env).returncode == 0
    result = run_cli(tmp_path, "backfill", "--plan", "plan_Message1", "--dry-run", env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "whop-autocancel: configuration error: 2 settings to fix:"
    assert lines[1].startswith("  WHOP_API_KEY is not set: ")
    assert lines[2].startswith("  WHOP_COMPANY_ID is not set: ")


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("CANCEL_DELAY", "-1", "CANCEL_DELAY: Input should be greater than or equal to 0"),
        ("RETRY_SCHEDULE", "1,soon", "RETRY_SCHEDULE.1:"),
        ("SMTP_URL", "http://mail", "SMTP_URL: must start with smtp:// or smtps://"),
        ("ADMIN_EMAILS", "nobody", "ADMIN_EMAILS: 'nobody' is not an email address"),
        ("DATABASE_URL", "oracle://x", "DATABASE_URL: must be sqlite:///PATH, postgresql://"),
        ("DATABASE_URL", "postgresql://127.0.0.1:99999/x", "DATABASE_URL: has an invalid port"),
        ("QUEUE_URL", "amqp://rabbit", "QUEUE_URL: must be sqlite:///PATH, postgresql://"),
        (
            "DATABASE_URL",
            "postgresql://nobody@127.0.0.1:1/none",
            "DATABASE_URL: cannot connect to postgresql+psycopg://nobody@127.0.0.1:1/none",
        ),
        ("QUEUE_URL", "redis://127.0.0.1:1/0", "QUEUE_URL: cannot reach the job queue"),
        ("CPU_AFFINITY", "fast", "CPU_AFFINITY: must be auto, off or CPU numbers like 0,1"),
        ("CPU_AFFINITY", "4096", "CPU_AFFINITY: names CPU 4096, which this process may not use"),
        (
            "WHOP_WEBHOOK_SECRET",
            "ws_",
            "WHOP_WEBHOOK_SECRET: is too short to be a real secret: Whop's is ws_ and 48 hex",
        ),
    ],
)
def test_invalid_settings_stop_with_one_line(
    tmp_path: Path, name: str, value: str, expected: str
) -> None:
    result = run_cli(tmp_path, "serve", env=service_environment(tmp_path, **{name: value}))
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert expected in line


def test_an_invalid_catalog_stops_with_its_line_and_reason(tmp_path: Path) -> None:
    catalog = tmp_path / "bad.toml"
    catalog.write_text(
        '[plans.plan_A]\nname = "A"\ndelivery = "message"\n\n'
        '[plans.plan_B]\ndelivery = "carrier-pigeon"\n'
    )
    result = run_cli(
        tmp_path, "serve", env=service_environment(tmp_path, CATALOG_PATH=str(catalog))
    )
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert f'{catalog}:1: plan plan_A: delivery = "message" needs a message' in line


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[foo]\nx = 1\n", "unknown top-level key 'foo' (expected [plans.…] or [pools.…])"),
        # The key the merchant wrote, quoted back: neither markup nor an emoji code to rich.
        ('["[red]:cd:"]\nx = 1\n', "unknown top-level key '[red]:cd:' (expected [plans.…]"),
    ],
)
def test_a_broken_catalogs_error_is_printed_as_written(
    tmp_path: Path, toml: str, message: str
) -> None:
    """Issue 13, item 2: no error text is read as rich markup or emoji codes, through a pipe
    or at a terminal, by `check` (its lines are styled) or by a command that stops on it."""
    catalog = tmp_path / "broken.toml"
    catalog.write_text(toml)
    env = service_environment(
        tmp_path,
        CATALOG_PATH=str(catalog),
        WHOP_API_URL="http://127.0.0.1:9/api/v1",  # nothing listens: the Whop lines fail fast
        SMTP_URL="smtp://127.0.0.1:9",
    )
    expected = f"{catalog}:1: {message}"

    checked = run_cli(tmp_path, "check", env=env)
    assert checked.returncode == 1
    [line] = [line for line in checked.stdout.splitlines() if " catalog: " in line]
    assert line.startswith(f"FAIL catalog: {expected}"), line

    at_terminal = on_terminal(tmp_path, "check", env=env, columns=200)
    assert at_terminal.returncode == 1
    [line] = [line for line in at_terminal.stdout.splitlines() if " catalog: " in line]
    assert line.startswith(f"FAIL catalog: {expected}"), line

    served = run_cli(tmp_path, "serve", env=env)
    assert served.returncode == 2
    [line] = served.stderr.strip().splitlines()
    assert line.startswith(f"whop-autocancel: configuration error: {expected}"), line


@pytest.mark.parametrize("command", [("migrate",), ("stock", "levels"), ("orders",)])
def test_an_unreachable_database_is_one_line_for_every_command(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    env = service_environment(tmp_path, DATABASE_URL="postgresql://nobody@127.0.0.1:1/none")
    result = run_cli(tmp_path, *command, env=env)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "DATABASE_URL: cannot connect to postgresql+psycopg://nobody@127.0.0.1:1/none" in line


def test_serve_logs_uvicorns_lines_without_their_color_message(tmp_path: Path) -> None:
    """Issue 13, item 6: uvicorn's own lines (`Started server process [PID]`) carry their text
    again, with ANSI colour codes, in `color_message`; `serve` with LOG_FORMAT=console logs
    the line once, without that field."""
    env = service_environment(
        tmp_path, LOG_FORMAT="console", WHOP_API_URL="http://127.0.0.1:9/api/v1"
    )
    log = tmp_path / "serve.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "whop_autocancel", "serve", "--port", str(free_port())],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            wait_for(
                lambda: (
                    "Application startup complete" in log.read_text() or process.poll() is not None
                ),
                60,
                "serve to start",
            )
        finally:
            process.terminate()
            process.wait(timeout=30)
    text = log.read_text()
    [started] = [line for line in text.splitlines() if "Started server process" in line]
    assert started.rstrip().endswith(f"Started server process [{process.pid}]"), started
    assert "color_message" not in text
    assert "\\x1b" not in text


def test_migrate_says_what_it_did(tmp_path: Path) -> None:
    first = run_cli(tmp_path, "migrate")
    assert first.returncode == 0, first.stderr
    assert f"Database migrated from empty to {HEAD_REVISION}." in first.stdout
    second = run_cli(tmp_path, "migrate")
    assert f"already at revision {HEAD_REVISION}; nothing to do" in second.stdout


@pytest.mark.parametrize(
    "command",
    [
        ("orders",),
        ("events", "list"),
        ("alerts",),
        ("cancellations", "failed"),
        ("emails",),
        ("stock", "levels"),
    ],
)
def test_every_command_migrates_a_new_sqlite_database_by_itself(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    """The README's promise: SQLite migrates by itself, whichever command comes first."""
    from whop_autocancel.db.engine import Database
    from whop_autocancel.schema.migrate import HEAD_REVISION, current_revision

    result = run_cli(tmp_path, *command)
    assert result.returncode == 0, result.stderr
    assert "migrate`" not in result.stdout + result.stderr  # no "run `migrate` first"
    [migrated] = [
        json.loads(line) for line in result.stderr.splitlines() if "database_migrated" in line
    ]
    assert migrated["before"] is None
    assert migrated["after"] == HEAD_REVISION
    assert migrated["database"] == f"sqlite:///{tmp_path / 'service.db'}"  # a typo shows
    database = Database(f"sqlite:///{tmp_path / 'service.db'}")
    try:
        assert current_revision(database) == HEAD_REVISION
    finally:
        database.dispose()
    # Only `serve`, `worker` and `migrate` start watching Whop (DESIGN §5): a look at the
    # orders before the first start must not move that moment.
    assert "watching_since_recorded" not in result.stderr


def test_failed_cancellations_are_listed_and_retried(tmp_path: Path) -> None:
    runtime = make_runtime(make_settings(tmp_path))
    now = runtime.clock.now()
    with runtime.database.transaction() as session:
        session.add(
            Order(
                id="ord_CliTest1",
                status="delivered",
                created_at=now,
                email="buyer@example.com",
                plan_id="plan_Message1",
                billing_reason="one_time",
                order_metadata={},
            )
        )
        session.flush()
        session.add(
            Cancellation(
                order_id="ord_CliTest1",
                membership_id="mem_CliTest1",
                status="failed",
                attempts=1,
                generation=1,
                generation_started_at=now,
                next_attempt_at=now,
                last_error="Whop refused",
                last_http_status=422,
                created_at=now,
                updated_at=now,
            )
        )
    runtime.close()

    listing = run_cli(tmp_path, "cancellations", "failed")
    assert listing.returncode == 0, listing.stderr
    for text in (
        "1 failed cancellation(s)",
        "ord_CliTest1",
        "mem_CliTest1",
        "buyer@example.com",
        "Whop refused",
        "422",
    ):
        assert text in listing.stdout

    missing = run_cli(tmp_path, "cancellations", "retry", "999")
    assert missing.returncode == 1
    assert "there is no cancellation #999" in missing.stderr

    retried = run_cli(tmp_path, "cancellations", "retry", "--all")
    assert retried.returncode == 0, retried.stderr
    assert (
        "Cancellation #1 (membership mem_CliTest1) scheduled again as attempt generation 2"
        in retried.stdout
    )

    again = run_cli(tmp_path, "cancellations", "retry", "1")
    assert again.returncode == 1
    assert "is scheduled; only failed or skipped ones can be retried" in again.stderr
    assert run_cli(tmp_path, "cancellations", "failed").stdout.strip() == (
        "No failed cancellations."
    )


def test_retry_needs_an_id_or_all(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "cancellations", "retry")
    assert result.returncode == 2
    assert "give one cancellation ID or --all" in result.stderr


def test_deploy_prints_units_and_refuses_bad_options(tmp_path: Path) -> None:
    systemd = run_cli(tmp_path, "deploy", "systemd", "--web", "2", "--workers", "3")
    assert systemd.returncode == 0, systemd.stderr
    assert "# ---- /etc/systemd/system/whop-autocancel-web@.service ----" in systemd.stdout
    assert "whop-autocancel-worker@3" in systemd.stdout
    supervisor = run_cli(tmp_path, "deploy", "supervisor", "--workers", "0")
    assert supervisor.returncode == 0, supervisor.stderr
    assert "[program:whop-autocancel-web]" in supervisor.stdout
    assert "[program:whop-autocancel-worker]" not in supervisor.stdout
    bad = run_cli(tmp_path, "deploy", "supervisor", "--web", "0", "--workers", "0")
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("whop-autocancel: configuration error: --web/--workers")


def test_the_demo_refuses_a_shops_database_naming_it_without_its_password(
    tmp_path: Path, database_url: str
) -> None:
    runtime = make_runtime(make_settings(tmp_path, DATABASE_URL=database_url))
    with runtime.database.transaction() as session:
        session.add(
            Order(
                id="ord_RealShop1",
                status="delivered",
                created_at=runtime.clock.now(),
                order_metadata={},
            )
        )
    runtime.close()
    shown = make_url(normalise_database_url(database_url)).render_as_string(hide_password=True)

    result = run_cli(tmp_path, "demo", env=service_environment(tmp_path, DATABASE_URL=database_url))

    assert result.returncode == 1
    assert result.stdout.strip().splitlines()[-1] == (
        f"The demo refuses to run on DATABASE_URL={shown}: it holds 1 order already, and a "
        "shop's database is no place for the demo's fake purchases. Point DATABASE_URL at a "
        "new, empty database, or unset it to run the demo on a temporary SQLite database."
    )
    assert "temporary SQLite database in" not in result.stdout
    password = make_url(database_url).password
    if password:  # a server with a password (CI): it is never shown
        assert str(password) not in result.stdout + result.stderr


def test_the_demo_resolves_a_relative_sqlite_path_where_it_was_started(tmp_path: Path) -> None:
    """`sqlite:///shop.db` is the merchant's file in the folder they run the demo from."""
    runtime = make_runtime(
        make_settings(tmp_path, DATABASE_URL=f"sqlite:///{tmp_path / 'shop.db'}")
    )
    with runtime.database.transaction() as session:
        session.add(
            Order(
                id="ord_RealShop2", status="paid", created_at=runtime.clock.now(), order_metadata={}
            )
        )
    runtime.close()

    result = run_cli(
        tmp_path, "demo", env=service_environment(tmp_path, DATABASE_URL="sqlite:///shop.db")
    )

    assert result.returncode == 1
    assert f"DATABASE_URL=sqlite:///{tmp_path / 'shop.db'}: it holds 1 order already" in (
        result.stdout
    )


def test_serve_on_a_port_in_use_says_so_in_one_line_before_starting_anything(
    tmp_path: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(tmp_path, "serve", "--port", str(port))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"whop-autocancel: configuration error: --port: 127.0.0.1:{port} is in use (another "
        "`whop-autocancel serve`?): stop that process or choose another --port"
    ]  # and nothing else: no worker_started, no migration, no uvicorn line
    assert result.stdout == ""
    assert not (tmp_path / "service.db").exists()  # nothing started: not even a migration
    assert not (tmp_path / "queue.db").exists()


def every_command() -> list[tuple[tuple[str, ...], Any]]:
    """Every command and command group of the app (the hidden ones aside), root first, as
    click sees them: walked from the command tree typer builds, not from a list."""
    found: list[tuple[tuple[str, ...], Any]] = []

    def walk(command: Any, path: tuple[str, ...]) -> None:
        found.append((path, command))
        for name, sub in getattr(command, "commands", {}).items():
            if not sub.hidden:
                walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    return found


def words_shown(command: Any) -> set[str]:
    """The words a help page must show whole: the command's help; each option's and
    argument's names, placeholder, help and default; each sub-command's summary."""
    texts = [command.help or ""]
    for param in command.params:
        if param.param_type_name == "argument":  # named in capitals, as the usage line does
            texts.append(param.metavar or param.name.upper())
        else:
            texts += [*param.opts, *param.secondary_opts, param.metavar or ""]
        texts.append(getattr(param, "help", None) or "")
        shown = getattr(param, "show_default", None) is not False
        if (
            shown
            and isinstance(param.default, str | int | float)
            and not isinstance(param.default, bool)
        ):
            texts.append(str(param.default))
    for sub in getattr(command, "commands", {}).values():
        texts.append(sub.get_short_help_str(limit=10_000))  # its first sentence, uncut
    return {word for text in texts for word in text.split()}


def test_every_commands_help_reads_cleanly_at_80_columns(tmp_path: Path) -> None:
    """Issue 13, item 7: `--help` of every command and group, through a pipe at COLUMNS=80
    (and, for the root, on an 80-column terminal): no line wider than 80, no `<str>`-style or
    `{name}` placeholder, no word split across two lines or cut short."""
    commands = every_command()
    assert len(commands) > 20  # the walk found the groups' commands too
    env = service_environment(tmp_path)
    pages = help_pages(tmp_path, [path for path, _ in commands], env=env, columns=80)
    for (path, command), (code, page) in zip(commands, pages, strict=True):
        name = " ".join(("whop-autocancel", *path, "--help"))
        assert code == 0, f"{name}: exit code {code}\n{page}"
        assert page.startswith(f"Usage: whop-autocancel {' '.join(path)}".rstrip()), page
        lines = page.splitlines()
        for line in lines:
            assert cell_len(line) <= 80, f"{name}: {cell_len(line)} cells: {line!r}"
        placeholders = re.findall(r"<[^<>\n]*>|\{[^{}\n]*\}", page)
        assert not placeholders, f"{name}: {placeholders}\n{page}"
        for above, below in itertools.pairwise(lines):
            split = re.search(r"\w-$", above) and re.match(r"\s*\w", below)
            assert not split, f"{name}: a word split across lines:\n{above}\n{below}"
        # A word cut by the wrapper, or shortened with "...", is on no line whole.
        missing = [w for w in words_shown(command) if not any(w in line for line in lines)]
        assert not missing, f"{name}: not whole on a line: {sorted(missing)}\n{page}"

    at_terminal = on_terminal(tmp_path, "--help", env=env, columns=80)
    assert at_terminal.returncode == 0
    assert at_terminal.stdout == pages[0][1]  # the batch prints what a process of its own does
