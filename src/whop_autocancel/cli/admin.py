"""The dashboard: `admin set-password`."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from whop_autocancel.cli.output import out

admin_app = typer.Typer(help="The dashboard at /admin: its password.", no_args_is_help=True)

HASH_SETTING = "ADMIN_PASSWORD_HASH"
SECRET_SETTING = "ADMIN_SESSION_SECRET"  # noqa: S105 (a setting's name)


@admin_app.command("set-password")
def set_password(
    stdin: Annotated[
        bool, typer.Option("--stdin", help="Read the password from the first line of stdin.")
    ] = False,
    env_file: Annotated[
        Path,
        typer.Option(
            "--env-file",
            metavar="PATH",
            help="The file the service reads its settings from (systemd: its EnvironmentFile).",
        ),
    ] = Path(".env"),
) -> None:
    """Set the dashboard's password. Its argon2id hash goes into the .env file as
    ADMIN_PASSWORD_HASH (with a random ADMIN_SESSION_SECRET if there is none); the password
    itself is never written or printed. Restart the web processes; everyone logged in is
    logged out."""
    from whop_autocancel.admin.web.passwords import hash_password

    if stdin:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    else:
        password = typer.prompt("New dashboard password", hide_input=True, confirmation_prompt=True)
    password_hash = hash_password(password)
    target = env_file.absolute()
    lines = target.read_text(encoding="utf-8").splitlines() if target.exists() else []
    lines = _set_line(lines, HASH_SETTING, password_hash)
    new_secret = not _value_of(lines, SECRET_SETTING)
    if new_secret:
        lines = _set_line(lines, SECRET_SETTING, secrets.token_urlsafe(32))
    _write(target, "\n".join(lines) + "\n")
    out.print(f"Wrote {HASH_SETTING} to {target}.", soft_wrap=True)
    if new_secret:
        out.print(
            f"Wrote a new random {SECRET_SETTING} to {target} (it signs the sessions).",
            soft_wrap=True,
        )
    out.print(
        "Restart the web processes (`serve`) to use it, with the same settings on every "
        "machine; anyone logged in to the dashboard is logged out.",
        soft_wrap=True,
    )
    if os.environ.get(HASH_SETTING):
        print(
            f"whop-autocancel: warning: {HASH_SETTING} is also set in the environment, and the "
            f"environment wins over {target.name}: unset it there",
            file=sys.stderr,
        )


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"^\s*(?:export\s+)?{name}\s*=")


def _value_of(lines: list[str], name: str) -> str:
    for line in lines:
        if _pattern(name).match(line):
            return line.split("=", 1)[1].strip().strip("'\"")
    return ""


def _set_line(lines: list[str], name: str, value: str) -> list[str]:
    """Replace the (first) line that sets `name`, dropping any later ones; else append it.
    The value is written unquoted: an argon2 hash or a token_urlsafe has nothing to quote, and
    both python-dotenv and systemd's EnvironmentFile read it as is."""
    pattern = _pattern(name)
    result: list[str] = []
    done = False
    for line in lines:
        if pattern.match(line):
            if not done:
                result.append(f"{name}={value}")
                done = True
            continue
        result.append(line)
    if not done:
        result.append(f"{name}={value}")
    return result


def _write(target: Path, text: str) -> None:
    """Replace the file at once (a crash leaves the old one or the new one), keeping its mode
    and owner; a new file is readable by its owner only (it holds secrets)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    before = target.stat() if target.exists() else None
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(temporary, before.st_mode & 0o777 if before else 0o600)
        if before is not None:
            # Not root: the file stays ours, as it was.
            with contextlib.suppress(PermissionError):
                os.chown(temporary, before.st_uid, before.st_gid)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
