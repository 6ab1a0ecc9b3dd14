"""`whop-autocancel check` as a real process against the simulator and a real SMTP server."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from support.harness import (
    KEEP_PLAN,
    MESSAGE_PLAN,
    NONE_PLAN,
    STOCK_CATALOG,
    STOCK_KEY,
    STOCK_POOL,
    run_cli,
    service_environment,
)
from whop_autocancel.mail.sink import SmtpSink
from whop_autocancel.sealing import generate_key
from whop_autocancel.simulator import SimulatorServer


def check(
    tmp_path: Path, simulator: SimulatorServer, sink: SmtpSink, **settings: str
) -> tuple[int, list[str], str]:
    values = {
        "WHOP_API_URL": simulator.api_url,
        "SMTP_URL": sink.url,
        "WHOP_COMPANY_ID": "biz_SimStore",
    }
    env = service_environment(tmp_path, **{**values, **settings})
    result = run_cli(tmp_path, "check", env=env)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return result.returncode, lines, result.stderr


def line(lines: list[str], name: str) -> str:
    [found] = [entry for entry in lines if entry.split(":")[0].split(maxsplit=1)[-1] == name]
    return found


def catalog(tmp_path: Path, *plans: str) -> str:
    path = tmp_path / "check-catalog.toml"
    path.write_text("".join(f'[plans.{plan}]\ndelivery = "none"\n\n' for plan in plans))
    return str(path)


def test_everything_right_passes_with_one_line_per_check(
    tmp_path: Path, simulator: SimulatorServer, smtp_sink: SmtpSink
) -> None:
    code, lines, stderr = check(tmp_path, simulator, smtp_sink)
    assert code == 0, "\n".join(lines) + stderr
    for name in (
        "settings",
        "catalog",
        "database",
        "queue",
        "smtp",
        "whop memberships",
        "whop payments",
        f"plan {MESSAGE_PLAN}",
        f"plan {NONE_PLAN}",
    ):
        assert line(lines, name).startswith("ok"), name
    assert "cannot be proven without cancelling" in lines[-1]
    assert not (tmp_path / "service.db").exists()  # check creates nothing


def test_a_subscription_plan_fails_the_check(
    tmp_path: Path, simulator: SimulatorServer, smtp_sink: SmtpSink
) -> None:
    simulator.state.create_plan("plan_Monthly1", "renewal")
    code, lines, _ = check(
        tmp_path,
        simulator,
        smtp_sink,
        CATALOG_PATH=catalog(tmp_path, MESSAGE_PLAN, "plan_Monthly1"),
    )
    assert code == 1
    assert line(lines, "plan plan_Monthly1").startswith("FAIL")
    assert "subscription (renewal)" in line(lines, "plan plan_Monthly1")
    assert line(lines, f"plan {MESSAGE_PLAN}").startswith("ok")


def test_an_unknown_plan_fails_the_check(
    tmp_path: Path, simulator: SimulatorServer, smtp_sink: SmtpSink
) -> None:
    code, lines, _ = check(
        tmp_path, simulator, smtp_sink, CATALOG_PATH=catalog(tmp_path, "plan_Typo1")
    )
    assert code == 1
    assert "does not exist for this API key" in line(lines, "plan plan_Typo1")


def test_a_wrong_api_key_is_said_to_be_wrong(
    tmp_path: Path, simulator: SimulatorServer, smtp_sink: SmtpSink
) -> None:
    """Issue 13, item 3: Whop's 401 means the key itself is not accepted (mistyped, revoked,
    deleted), not that it lacks a permission: every Whop line says so and where to get one."""
    code, lines, _ = check(tmp_path, simulator, smtp_sink, WHOP_API_KEY="apik_wrong")
    assert code == 1
    for name in ("whop memberships", "whop payments", f"plan {MESSAGE_PLAN}"):
        text = line(lines, name)
        assert text.startswith(f"FAIL {name}: Whop does not accept the API key"), text
        assert "HTTP 401: Invalid or missing API key" in text
        assert "wrong, revoked or deleted" in text
        assert "Dashboard → Developer → API keys" in text
        assert "WHOP_API_KEY" in text
        assert ":read" not in text  # no permission is named: none is missing
    assert "apik_wrong" not in "\n".join(lines)


@pytest.mark.parametrize(
    ("missing", "checks"),
    [
        ("member:basic:read", ["whop memberships"]),
        ("payment:basic:read", ["whop payments"]),
        ("plan:basic:read", [f"plan {plan}" for plan in (KEEP_PLAN, MESSAGE_PLAN, NONE_PLAN)]),
    ],
)
def test_a_key_without_a_permission_names_the_missing_one(
    tmp_path: Path,
    simulator: SimulatorServer,
    smtp_sink: SmtpSink,
    missing: str,
    checks: list[str],
) -> None:
    """Issue 13, item 3: Whop's 403 names the permission the key lacks, on the checks that
    need it; the others pass."""
    simulator.state.set_missing_permissions([missing])
    code, lines, _ = check(tmp_path, simulator, smtp_sink)
    assert code == 1
    failed = [text.split(":")[0].removeprefix("FAIL ") for text in lines if text.startswith("FAIL")]
    assert sorted(failed) == sorted(checks), lines
    for name in checks:
        text = line(lines, name)
        assert text.startswith(f"FAIL {name}: the API key lacks the {missing} permission"), text
        assert "HTTP 403" in text
        assert "Dashboard → Developer → API keys" in text


def test_smtp_down_and_missing_company_id_each_get_their_line(
    tmp_path: Path, simulator: SimulatorServer, smtp_sink: SmtpSink
) -> None:
    env_sink = SmtpSink()  # never started: nothing listens on its port
    code, lines, _ = check(tmp_path, simulator, env_sink, WHOP_COMPANY_ID="")
    assert code == 1
    assert line(lines, "smtp").startswith("FAIL")
    assert "Connection refused" in line(lines, "smtp")
    assert "WHOP_COMPANY_ID" in line(lines, "whop memberships")
    assert line(lines, "settings").startswith("ok")


def test_a_webhook_secret_that_is_not_whops_fails_settings(
    tmp_path: Path, simulator: SimulatorServer, smtp_sink: SmtpSink
) -> None:
    code, lines, _ = check(
        tmp_path, simulator, smtp_sink, WHOP_WEBHOOK_SECRET="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    )
    assert code == 1
    assert "start with ws_" in line(lines, "settings")


def test_stock_check_names_empty_pools_and_passes_once_stocked(
    tmp_path: Path, simulator: SimulatorServer, smtp_sink: SmtpSink
) -> None:
    (tmp_path / "catalog.toml").write_text(STOCK_CATALOG)
    code, lines, _ = check(tmp_path, simulator, smtp_sink)
    assert code == 1
    assert line(lines, "stock").startswith("FAIL stock: no items: import them")
    items = tmp_path / "keys.txt"
    items.write_text("KEY-A\nKEY-B\nKEY-C\n")
    env = service_environment(tmp_path)
    imported = run_cli(tmp_path, "stock", "import", STOCK_POOL, str(items), env=env)
    assert imported.returncode == 0, imported.stderr
    code, lines, stderr = check(tmp_path, simulator, smtp_sink)
    assert code == 0, "\n".join(lines) + stderr
    assert "keys: 3 available" in line(lines, "stock")
    assert "KEY-A" not in "\n".join(lines) + stderr  # levels only, never contents

    code, lines, _ = check(tmp_path, simulator, smtp_sink, STOCK_ENCRYPTION_KEY="")
    assert code == 1
    assert "STOCK_ENCRYPTION_KEY is not set" in line(lines, "stock")

    other = generate_key()  # a machine set up with another key
    code, lines, _ = check(tmp_path, simulator, smtp_sink, STOCK_ENCRYPTION_KEY=other)
    assert code == 1
    assert "cannot decrypt the stored items of keys (item #3)" in line(lines, "stock")
    # Rotation: the new key first, the old after; rekey; then the new key alone works.
    rotated = service_environment(tmp_path, STOCK_ENCRYPTION_KEY=f"{other} {STOCK_KEY}")
    rekeyed = run_cli(tmp_path, "stock", "rekey", env=rotated)
    assert rekeyed.returncode == 0, rekeyed.stderr
    assert "Re-encrypted 3 item(s) and 0 email(s)" in rekeyed.stdout
    assert "remove the older key" in rekeyed.stdout
    code, lines, _ = check(tmp_path, simulator, smtp_sink, STOCK_ENCRYPTION_KEY=other)
    assert code == 0, "\n".join(lines)


def test_every_check_is_one_line_whatever_a_driver_writes(
    tmp_path: Path, simulator: SimulatorServer, smtp_sink: SmtpSink
) -> None:
    """Issue 13, item 5: psycopg adds a hint line and SQLAlchemy a "(Background on this error
    at: …)" line to their errors, and the settings error lists each setting on a line of its
    own: `check` still prints one line per check (and its closing note), nothing else."""
    closed = "postgresql://nobody@127.0.0.1:1/none"  # nothing listens on port 1
    code, lines, _ = check(
        tmp_path,
        simulator,
        smtp_sink,
        DATABASE_URL=closed,
        QUEUE_URL=closed,
        ADMIN_EMAILS="",
        MAIL_FROM="",
    )
    assert code == 1
    checks, note = lines[:-1], lines[-1]
    assert note.startswith("note: ")
    for text in checks:
        assert re.match(r"(ok  |FAIL) [a-z][\w .-]*: \S", text), text
    assert [text.split(":")[0].split(maxsplit=1)[1] for text in checks] == [
        "settings",
        "catalog",
        "database",
        "queue",
        "smtp",
        "whop memberships",
        "whop payments",
        *(f"plan {plan}" for plan in sorted((MESSAGE_PLAN, NONE_PLAN, KEEP_PLAN))),
    ]
    database = line(lines, "database")
    assert "Connection refused" in database
    assert "Is the server running on that host" in database  # the hint, on the same line
    assert "Background on this error" not in "\n".join(lines)
    assert "Connection refused" in line(lines, "queue")
    settings = line(lines, "settings")
    assert "ADMIN_EMAILS is not set" in settings
    assert "MAIL_FROM is not set" in settings
