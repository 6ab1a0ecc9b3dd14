"""`whop-autocancel admin set-password`: the dashboard's password hash (and its session
secret) written into the .env file the settings read, never the password itself."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from typer.testing import CliRunner

from support.harness import run_cli, service_environment
from whop_autocancel.cli import app
from whop_autocancel.settings import load_settings

PASSWORD = "DISTINCTIVE correct horse battery"


def set_password(tmp_path: Path, *args: str, password: str = PASSWORD, **env: str) -> object:
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "whop_autocancel", "admin", "set-password", "--stdin", *args],
        env=service_environment(tmp_path, **env),
        cwd=tmp_path,
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def env_lines(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {name: value for name, value in pairs}


def test_it_writes_the_hash_and_a_session_secret_into_a_new_dotenv(tmp_path: Path) -> None:
    result = set_password(tmp_path)
    assert result.returncode == 0, result.stderr
    dotenv = tmp_path / ".env"
    assert f"Wrote ADMIN_PASSWORD_HASH to {dotenv}" in result.stdout
    assert "ADMIN_SESSION_SECRET" in result.stdout  # a new one was written too
    assert PASSWORD not in result.stdout + result.stderr + dotenv.read_text()
    assert stat.S_IMODE(dotenv.stat().st_mode) == 0o600
    values = env_lines(dotenv)
    assert PasswordHasher().verify(values["ADMIN_PASSWORD_HASH"], PASSWORD)
    assert len(values["ADMIN_SESSION_SECRET"]) >= 32
    # The settings read it back as written (the hash's `$` signs survive the .env parser).
    previous = Path.cwd()
    os.chdir(tmp_path)
    try:
        settings = load_settings(ADMIN_EMAILS="a@b.test")
    finally:
        os.chdir(previous)
    assert settings.dashboard_enabled
    assert settings.ADMIN_PASSWORD_HASH is not None
    assert settings.ADMIN_PASSWORD_HASH.get_secret_value() == values["ADMIN_PASSWORD_HASH"]


def test_it_replaces_the_hash_line_and_keeps_everything_else(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "# shop settings\nWHOP_API_KEY=sk_keep_me\nADMIN_PASSWORD_HASH=$argon2id$old\n"
        "ADMIN_SESSION_SECRET=kept-secret-0123456789-0123456789-abc\nMAIL_FROM=shop@x.test"
    )
    result = set_password(tmp_path)
    assert result.returncode == 0, result.stderr
    text = dotenv.read_text()
    assert text.startswith("# shop settings\nWHOP_API_KEY=sk_keep_me\nADMIN_PASSWORD_HASH=$argon2")
    assert "$argon2id$old" not in text
    assert text.count("ADMIN_PASSWORD_HASH=") == 1
    values = env_lines(dotenv)
    assert values["ADMIN_SESSION_SECRET"] == "kept-secret-0123456789-0123456789-abc"
    assert values["MAIL_FROM"] == "shop@x.test"
    assert "ADMIN_SESSION_SECRET" not in result.stdout  # kept, not replaced


def test_an_env_file_elsewhere_and_an_overriding_environment_variable(tmp_path: Path) -> None:
    target = tmp_path / "etc" / "env"
    target.parent.mkdir()
    result = set_password(
        tmp_path, "--env-file", str(target), ADMIN_PASSWORD_HASH="$argon2id$from-environment"
    )
    assert result.returncode == 0, result.stderr
    assert f"Wrote ADMIN_PASSWORD_HASH to {target}" in result.stdout
    assert not (tmp_path / ".env").exists()
    assert "ADMIN_PASSWORD_HASH is also set in the environment" in result.stderr


@pytest.mark.parametrize("password", ["", "short"])
def test_an_empty_or_short_password_is_refused(tmp_path: Path, password: str) -> None:
    result = set_password(tmp_path, password=password)
    assert result.returncode == 1
    assert "at least 12 characters" in result.stderr
    assert not (tmp_path / ".env").exists()


def test_the_prompt_asks_twice_and_refuses_a_mismatch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    mismatch = runner.invoke(
        app, ["admin", "set-password"], input=f"{PASSWORD}\n{PASSWORD}x\n{PASSWORD}\n{PASSWORD}\n"
    )
    assert mismatch.exit_code == 0, mismatch.output
    assert PASSWORD not in mismatch.output  # no echo
    assert "do not match" in mismatch.output.lower()
    assert PasswordHasher().verify(env_lines(tmp_path / ".env")["ADMIN_PASSWORD_HASH"], PASSWORD)


def test_run_cli_help_lists_the_admin_group(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "admin", "--help")
    assert result.returncode == 0
    assert "set-password" in result.stdout
