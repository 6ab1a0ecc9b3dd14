"""Deployment files: the systemd units and the supervisord config, parsed back and checked."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from whop_autocancel.deploy import DeployOptions, render_supervisor, render_systemd
from whop_autocancel.errors import ConfigurationError

UNIT_DIR = "/etc/systemd/system"
EXECUTABLE = "/opt/whop-autocancel/.venv/bin/whop-autocancel"
HEADER = re.compile(r"^# ---- (.+?) ----$", flags=re.MULTILINE)


# ----- parsing helpers ------------------------------------------------------------------------


class _RepeatedKeys(dict[str, Any]):
    """configparser's option store that keeps every occurrence of a repeated key (systemd
    accumulates `After=`, `Wants=`...): while reading, values are lists, so extend them."""

    def __setitem__(self, key: str, value: Any) -> None:
        if isinstance(value, list) and key in self:
            self[key].extend(value)
        else:
            super().__setitem__(key, value)


def parse_unit(text: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(
        strict=False, interpolation=None, dict_type=_RepeatedKeys, empty_lines_in_values=False
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(text)
    return parser


def values(unit: configparser.RawConfigParser, section: str, key: str) -> list[str]:
    """Every value of a key, in order, with space-separated lists split (`After=a b`)."""
    if not unit.has_option(section, key):
        return []
    return [item for line in unit.get(section, key).splitlines() for item in line.split()]


def split_files(text: str) -> tuple[dict[str, str], str]:
    """The unit files by name, and the install hint that follows them."""
    files: dict[str, str] = {}
    hint = ""
    matches = list(HEADER.finditer(text))
    assert matches, "no file headers"
    for match, following in zip(matches, [*matches[1:], None], strict=True):
        body = text[match.end() : following.start() if following else len(text)]
        path = match.group(1)
        if path.startswith(f"{UNIT_DIR}/"):
            name = path.removeprefix(f"{UNIT_DIR}/")
            assert name not in files, f"{name} twice"
            files[name] = body
        else:
            hint += body
    return files, hint


def systemd_units(options: DeployOptions) -> tuple[dict[str, configparser.RawConfigParser], str]:
    files, hint = split_files(render_systemd(options))
    return {name: parse_unit(body) for name, body in files.items()}, hint


def supervisor_config(options: DeployOptions) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=True, interpolation=None)
    parser.read_string(render_supervisor(options))
    return parser


def expand(template: str, program: str, number: int) -> str:
    """What supervisord makes of `%(program_name)s` and `%(process_num)d`."""
    return template % {"program_name": program, "process_num": number}


def enabled_in_hint(hint: str) -> list[str]:
    lines = [line for line in hint.splitlines() if "systemctl enable --now" in line]
    assert len(lines) == 1, hint
    return lines[0].split("systemctl enable --now", 1)[1].split()


# ----- supervisor -----------------------------------------------------------------------------


def test_supervisor_defaults() -> None:
    config = supervisor_config(DeployOptions())
    assert config.sections() == [
        "program:whop-autocancel-web",
        "program:whop-autocancel-worker",
        "group:whop-autocancel",
    ]
    assert config.get("group:whop-autocancel", "programs") == (
        "whop-autocancel-web,whop-autocancel-worker"
    )
    for program in ("whop-autocancel-web", "whop-autocancel-worker"):
        section = config[f"program:{program}"]
        assert section["numprocs"] == "2"
        assert section["process_name"] == "%(program_name)s-%(process_num)d"
        assert section["user"] == "whop-autocancel"
        assert section["directory"] == "/opt/whop-autocancel"
        assert section["stopsignal"] == "TERM"
        assert section["stopwaitsecs"] == "45"
        for key in ("stopasgroup", "killasgroup", "autostart", "autorestart", "redirect_stderr"):
            assert section[key] == "true", key
        assert section["startsecs"] == "3"
        assert section["stdout_logfile"] == (
            "/var/log/whop-autocancel/%(program_name)s-%(process_num)d.log"
        )
    worker = config["program:whop-autocancel-worker"]
    assert worker["command"] == f"{EXECUTABLE} worker"
    assert worker["numprocs_start"] == "1"


@pytest.mark.parametrize(("port", "web"), [(8000, 2), (9100, 3), (65535, 1)])
def test_supervisor_web_ports_follow_process_num(port: int, web: int) -> None:
    options = DeployOptions(port=port, web=web, workers=1, host="10.0.0.5")
    section = supervisor_config(options)["program:whop-autocancel-web"]
    assert int(section["numprocs"]) == web
    first = int(section["numprocs_start"])
    numbers = range(first, first + int(section["numprocs"]))
    commands = [expand(section["command"], "whop-autocancel-web", n) for n in numbers]
    assert commands == [
        f"{EXECUTABLE} serve --no-worker --host 10.0.0.5 --port {p}"
        for p in range(port, port + web)
    ]
    names = [expand(section["process_name"], "whop-autocancel-web", n) for n in numbers]
    assert names == [f"whop-autocancel-web-{p}" for p in range(port, port + web)]
    logs = [expand(section["stdout_logfile"], "whop-autocancel-web", n) for n in numbers]
    assert logs == [f"/var/log/whop-autocancel/whop-autocancel-web-{p}.log" for p in numbers]


def test_supervisor_omits_a_program_with_no_processes() -> None:
    workers_only = supervisor_config(DeployOptions(web=0, workers=3))
    assert workers_only.sections() == ["program:whop-autocancel-worker", "group:whop-autocancel"]
    assert workers_only.get("group:whop-autocancel", "programs") == "whop-autocancel-worker"
    assert workers_only.get("program:whop-autocancel-worker", "numprocs") == "3"

    web_only = supervisor_config(DeployOptions(web=1, workers=0))
    assert web_only.sections() == ["program:whop-autocancel-web", "group:whop-autocancel"]
    assert web_only.get("group:whop-autocancel", "programs") == "whop-autocancel-web"


def test_supervisor_options_reach_every_program() -> None:
    options = DeployOptions(
        user="shop",
        workdir="/srv/shop",
        executable="/srv/shop/venv/bin/whop-autocancel",
        log_dir="/srv/log",
        stop_timeout=90,
    )
    config = supervisor_config(options)
    for program in ("whop-autocancel-web", "whop-autocancel-worker"):
        section = config[f"program:{program}"]
        assert section["user"] == "shop"
        assert section["directory"] == "/srv/shop"
        assert section["command"].startswith("/srv/shop/venv/bin/whop-autocancel ")
        assert section["stopwaitsecs"] == "90"
        assert expand(section["stdout_logfile"], program, 1) == f"/srv/log/{program}-1.log"


def test_supervisor_says_to_migrate_before_update() -> None:
    text = render_supervisor(DeployOptions())
    comments = "\n".join(line for line in text.splitlines() if line.startswith(";"))
    assert f"{EXECUTABLE} migrate" in comments
    assert comments.index("migrate") < comments.index("supervisorctl update")
    assert "/opt/whop-autocancel/.env" in comments


# ----- systemd --------------------------------------------------------------------------------


def test_systemd_files_and_install_hint() -> None:
    units, hint = systemd_units(DeployOptions())
    assert list(units) == [
        "whop-autocancel-migrate.service",
        "whop-autocancel-web@.service",
        "whop-autocancel-worker@.service",
        "whop-autocancel.target",
    ]
    assert "systemctl daemon-reload" in hint
    assert enabled_in_hint(hint) == [
        "whop-autocancel.target",
        "whop-autocancel-web@8000",
        "whop-autocancel-web@8001",
        "whop-autocancel-worker@1",
        "whop-autocancel-worker@2",
    ]
    assert values(units["whop-autocancel.target"], "Unit", "Wants") == [
        "whop-autocancel-web@8000.service",
        "whop-autocancel-web@8001.service",
        "whop-autocancel-worker@1.service",
        "whop-autocancel-worker@2.service",
    ]
    assert values(units["whop-autocancel.target"], "Install", "WantedBy") == ["multi-user.target"]


def test_systemd_web_unit() -> None:
    units, _ = systemd_units(DeployOptions(host="10.0.0.5", stop_timeout=60))
    web = units["whop-autocancel-web@.service"]
    assert values(web, "Service", "ExecStart") == [
        *f"{EXECUTABLE} serve --no-worker --host 10.0.0.5 --port %i".split()
    ]
    assert web.get("Service", "TimeoutStopSec") == "60"
    assert web.get("Service", "StandardOutput") == "append:/var/log/whop-autocancel/web-%i.log"
    assert web.get("Service", "StandardError") == "append:/var/log/whop-autocancel/web-%i.log"
    assert "whop-autocancel-migrate.service" in values(web, "Unit", "After")
    assert "whop-autocancel-migrate.service" in values(web, "Unit", "Wants")
    assert "network-online.target" in values(web, "Unit", "After")
    assert values(web, "Install", "WantedBy") == ["whop-autocancel.target"]


def test_systemd_worker_unit() -> None:
    units, _ = systemd_units(DeployOptions())
    worker = units["whop-autocancel-worker@.service"]
    assert worker.get("Service", "ExecStart") == f"{EXECUTABLE} worker"
    assert worker.get("Service", "StandardOutput") == (
        "append:/var/log/whop-autocancel/worker-%i.log"
    )
    assert "whop-autocancel-migrate.service" in values(worker, "Unit", "After")


@pytest.mark.parametrize(
    "name", ["whop-autocancel-web@.service", "whop-autocancel-worker@.service"]
)
def test_systemd_long_running_units_share_the_essentials(name: str) -> None:
    units, _ = systemd_units(DeployOptions())
    unit = units[name]
    expected = {
        "User": "whop-autocancel",
        "Group": "whop-autocancel",
        "WorkingDirectory": "/opt/whop-autocancel",
        "EnvironmentFile": "/etc/whop-autocancel/env",
        "Restart": "always",
        "RestartSec": "2",
        "KillSignal": "SIGTERM",
        "KillMode": "mixed",
        "TimeoutStopSec": "45",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "full",
        "PrivateTmp": "yes",
    }
    for key, value in expected.items():
        assert values(unit, "Service", key) == [value], key
    assert values(unit, "Unit", "PartOf") == ["whop-autocancel.target"]


def test_systemd_migrate_unit() -> None:
    units, _ = systemd_units(DeployOptions())
    migrate = units["whop-autocancel-migrate.service"]
    assert migrate.get("Service", "Type") == "oneshot"
    assert migrate.get("Service", "RemainAfterExit") == "yes"
    assert migrate.get("Service", "ExecStart") == f"{EXECUTABLE} migrate"
    assert migrate.get("Service", "User") == "whop-autocancel"
    assert migrate.get("Service", "EnvironmentFile") == "/etc/whop-autocancel/env"
    # systemd refuses Restart=always on a oneshot unit.
    assert migrate.get("Service", "Restart") == "on-failure"


def test_systemd_without_an_environment_file() -> None:
    units, hint = systemd_units(DeployOptions(env_file=None))
    for name, unit in units.items():
        if unit.has_section("Service"):
            assert not unit.has_option("Service", "EnvironmentFile"), name
    assert "/opt/whop-autocancel/.env" in hint


@pytest.mark.parametrize(
    ("web", "workers", "port"), [(0, 1, 8000), (1, 0, 8000), (3, 4, 9000), (5, 0, 65531)]
)
def test_systemd_instances_follow_the_options(web: int, workers: int, port: int) -> None:
    units, hint = systemd_units(DeployOptions(web=web, workers=workers, port=port))
    assert ("whop-autocancel-web@.service" in units) == (web > 0)
    assert ("whop-autocancel-worker@.service" in units) == (workers > 0)
    web_instances = [f"whop-autocancel-web@{p}" for p in range(port, port + web)]
    worker_instances = [f"whop-autocancel-worker@{n}" for n in range(1, workers + 1)]
    assert enabled_in_hint(hint) == ["whop-autocancel.target", *web_instances, *worker_instances]
    assert values(units["whop-autocancel.target"], "Unit", "Wants") == [
        f"{instance}.service" for instance in [*web_instances, *worker_instances]
    ]
    if web:
        assert f"curl -fsS http://127.0.0.1:{port}/readyz" in hint
    else:
        assert "readyz" not in hint


def test_systemd_is_deterministic_and_ends_with_a_newline() -> None:
    text = render_systemd(DeployOptions())
    assert text == render_systemd(DeployOptions())
    assert text.endswith("\n")
    assert render_supervisor(DeployOptions()).endswith("\n")


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    executable = tmp_path / "whop-autocancel"
    executable.write_text("#!/bin/sh\nexit 0\n")
    executable.chmod(0o755)
    options = DeployOptions(executable=str(executable), web=2, workers=2)
    files, _ = split_files(render_systemd(options))
    for name, body in files.items():
        (tmp_path / name).write_text(body)
    # Instances load from their templates; verify checks every unit given and what they pull in.
    to_verify = [
        "whop-autocancel-migrate.service",
        "whop-autocancel-web@8000.service",
        "whop-autocancel-worker@1.service",
        "whop-autocancel.target",
    ]
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(tmp_path / n) for n in to_verify)],
        env={"SYSTEMD_UNIT_PATH": f"{tmp_path}:", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    complaints = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if "whop-autocancel" in line or str(tmp_path) in line
    ]
    assert result.returncode == 0, result.stdout + result.stderr
    assert complaints == []


# ----- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "flag"),
    [
        ({"port": 0}, "--port"),
        ({"port": 65536}, "--port"),
        ({"port": 65535, "web": 2}, "--port"),
        ({"web": -1}, "--web"),
        ({"workers": -1}, "--workers"),
        ({"web": 0, "workers": 0}, "--web"),
        ({"stop_timeout": 0}, "--stop-timeout"),
        ({"user": ""}, "--user"),
        ({"user": "Shop Owner"}, "--user"),
        ({"user": "x" * 40}, "--user"),
        ({"user": "root"}, "--user"),
        ({"workdir": "opt/whop"}, "--workdir"),
        ({"workdir": "/opt/my shop"}, "--workdir"),
        ({"workdir": "/opt/../etc"}, "--workdir"),
        ({"executable": "whop-autocancel"}, "--executable"),
        ({"executable": "/opt/%i/bin"}, "--executable"),
        ({"env_file": "env"}, "--env-file"),
        ({"env_file": "-/etc/whop-autocancel/env"}, "--env-file"),
        ({"env_file": ""}, "--env-file"),
        ({"log_dir": "/var/log/$USER"}, "--log-dir"),
        ({"log_dir": "logs"}, "--log-dir"),
        ({"host": "127.0.0.1; rm -rf /"}, "--host"),
        ({"host": ""}, "--host"),
    ],
)
def test_every_invalid_option_is_named(overrides: dict[str, Any], flag: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        DeployOptions(**overrides)
    message = str(caught.value)
    assert message.startswith(f"{flag}"), message
    assert "\n" not in message


def test_the_both_zero_error_names_both_options() -> None:
    with pytest.raises(ConfigurationError, match="--web/--workers"):
        DeployOptions(web=0, workers=0)


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "::1", "::", "app-1.internal"])
def test_valid_hosts_are_accepted(host: str) -> None:
    units, hint = systemd_units(DeployOptions(host=host, web=1, workers=0))
    assert f"--host {host} " in units["whop-autocancel-web@.service"].get("Service", "ExecStart")
    assert "/readyz" in hint
