"""Running `whop-autocancel` as a real process through a pipe or on a pseudo-terminal, and
reading the listings it prints."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from dataclasses import dataclass
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def piped(tmp_path: Path, *args: str, env: dict[str, str], columns: int | None = 80) -> Run:
    """The command with stdout and stderr pipes, as in `whop-autocancel … | cat`; COLUMNS as
    given (None: unset)."""
    environment = {k: v for k, v in env.items() if k != "COLUMNS"}
    if columns is not None:
        environment["COLUMNS"] = str(columns)
    done = subprocess.run(
        [sys.executable, "-m", "whop_autocancel", *args],
        env=environment,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return Run(done.returncode, done.stdout, done.stderr)


def on_terminal(
    tmp_path: Path, *args: str, env: dict[str, str], columns: int = 80, timeout: float = 60
) -> Run:
    """The command with stdout and stderr on one pseudo-terminal `columns` wide (COLUMNS
    unset, as in an interactive shell). What the terminal received, ANSI codes stripped, is
    `stdout`; `stderr` is empty (both went to the terminal)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    environment = {k: v for k, v in env.items() if k != "COLUMNS"}
    environment["TERM"] = "xterm"
    process = subprocess.Popen(
        [sys.executable, "-m", "whop_autocancel", *args],
        env=environment,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        close_fds=True,
    )
    os.close(slave)
    received = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                received += chunk
            elif process.poll() is not None:
                break
        returncode = process.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
    text = ANSI.sub("", received.decode("utf-8", "replace")).replace("\r\n", "\n")
    return Run(returncode, text, "")


def table_lines(stdout: str, first_header: str) -> tuple[list[str], list[str], list[str]]:
    """The header cells, the row lines and the lines after the table of the first table whose
    header starts with `first_header` (cells are separated by two spaces or more)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first_header))
    header = re.split(r"\s{2,}", lines[start].strip())
    end = start + 1
    while end < len(lines) and lines[end].strip() and not lines[end].startswith("Hidden"):
        end += 1
    return header, lines[start + 1 : end], lines[end:]


def hidden_columns(stdout: str) -> list[str]:
    """The columns the one footer line says were hidden (none: no footer); a footer that
    counts the last ones ("and 2 more") gives `+2` for them."""
    found = re.search(r"^Hidden: (.*) \(see --wide or --json\)\.$", stdout, re.MULTILINE)
    if not found:
        return []
    names, _, more = found.group(1).partition(" and ")
    return names.split(", ") + ([f"+{more.split()[0]}"] if more else [])


HELP_END = "--- end of help, exit code "


def help_pages(
    tmp_path: Path, commands: list[tuple[str, ...]], *, env: dict[str, str], columns: int = 80
) -> list[tuple[int, str]]:
    """`whop-autocancel COMMAND… --help` for each of `commands`, through a pipe at `columns`:
    the exit code and the page of each. One process runs them all (each start imports the
    whole command line, about a second): it calls the console script's own entry point,
    `main()`, once per command, as the script would."""
    script = (
        "import json, sys\n"
        "from whop_autocancel.cli import main\n"
        "for command in json.loads(sys.argv[1]):\n"
        "    sys.argv = ['whop-autocancel', *command, '--help']\n"
        "    code = 0\n"
        "    try:\n"
        "        main()\n"
        "    except SystemExit as stopped:\n"
        "        code = stopped.code or 0\n"
        f"    print({HELP_END!r} + str(code), flush=True)\n"
    )
    environment = {k: v for k, v in env.items() if k != "COLUMNS"}
    environment["COLUMNS"] = str(columns)
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(commands)],
        env=environment,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    # Page 1, then for each page its exit code and the next page (none after the last).
    chunks = done.stdout.split(HELP_END)
    assert len(chunks) == len(commands) + 1, done.stdout + done.stderr
    codes, texts = [], [chunks[0]]
    for chunk in chunks[1:]:
        code, _, text = chunk.partition("\n")
        codes.append(int(code))
        texts.append(text)
    return list(zip(codes, texts[:-1], strict=True))
