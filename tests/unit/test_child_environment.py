"""The processes that tests and benchmarks start run the code of this checkout.

Every child (`serve`, `worker`, the simulator) runs in a directory of its own, so a relative
`PYTHONPATH` (the benchmarks' own instructions say `PYTHONPATH=src`) would name nothing there,
and the child would import whatever the virtualenv's install points at: another tree's code
measured in an A/B comparison, silently."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from support.harness import SOURCE, service_environment

WHERE = "import whop_autocancel; print(whop_autocancel.__file__)"


def imported_by_child(environment: dict[str, str], cwd: Path) -> Path:
    completed = subprocess.run(
        [sys.executable, "-c", WHERE],
        env=environment,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return Path(completed.stdout.strip())


def test_a_child_in_its_own_directory_imports_this_checkouts_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoy = tmp_path / "src" / "whop_autocancel"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", "src")  # relative, as the benchmarks are run

    imported = imported_by_child(service_environment(tmp_path), cwd=tmp_path)

    assert imported == SOURCE / "whop_autocancel" / "__init__.py"
    assert Path(__file__).resolve().parents[2] / "src" == SOURCE


def test_the_parents_own_path_entries_stay_usable_in_the_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "only_here.py").write_text("NAME = 'found'\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", "extra")  # relative to the parent's directory
    elsewhere = tmp_path / "child"
    elsewhere.mkdir()

    completed = subprocess.run(
        [sys.executable, "-c", "import only_here; print(only_here.NAME)"],
        env=service_environment(elsewhere),
        cwd=elsewhere,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )

    assert completed.stdout.strip() == "found"
