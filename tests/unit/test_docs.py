"""The docs are part of the change: the README's configuration table lists every setting."""

from __future__ import annotations

import re
from pathlib import Path

from whop_autocancel.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_every_setting_is_in_the_readme_table_and_nothing_else() -> None:
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", readme, flags=re.MULTILINE))
    assert documented == set(Settings.model_fields)


def test_readme_defaults_match_the_code() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([A-Z_]+)` \| `([^`]*)` \|", readme, flags=re.MULTILINE))
    defaults = Settings.model_fields
    for name, shown in rows.items():
        default = defaults[name].default
        if isinstance(default, list):
            default = ",".join(
                f"{value:g}" if isinstance(value, float) else str(value) for value in default
            )
        elif isinstance(default, bool):
            default = str(default).lower()
        elif hasattr(default, "get_secret_value"):
            default = default.get_secret_value()
        elif isinstance(default, float):
            default = f"{default:g}"
        assert shown == str(default), name
