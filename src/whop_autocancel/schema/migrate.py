"""Schema migrations (alembic), run by `whop-autocancel migrate` and by `serve` on SQLite.

Alembic is imported only when a migration runs: a start on a current schema reads the revision
with one query and compares it with `HEAD_REVISION`; `serve` on SQLite runs a migration that
is due in a child process (`upgrade_in_child`). Either way the long-running process is spared
alembic's memory (9 MB of a `serve`'s 150).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import inspect, text

from whop_autocancel.db.engine import Database
from whop_autocancel.errors import ConfigurationError

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).with_name("migrations")
# The newest migration's revision: move it with each new migration (a test checks that it is
# alembic's head).
HEAD_REVISION = "0014"


def alembic_config(database: Database) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", database.url.replace("%", "%%"))
    return config


def upgrade(database: Database) -> tuple[str | None, str]:
    """Bring the schema to the newest revision; returns (revision before, revision after)."""
    before = current_revision(database)
    if before == HEAD_REVISION:
        return before, before
    from alembic import command

    config = alembic_config(database)
    with database.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    return before, head_revision(database)


def current_revision(database: Database) -> str | None:
    """The revision the database is at (None: never migrated), read as alembic stores it."""
    with database.engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None  # a database never migrated
        return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


def head_revision(database: Database) -> str:
    """The newest revision the code knows (`HEAD_REVISION`)."""
    return HEAD_REVISION


_EXCEPTION_LINE = re.compile(r"^[\w.]+(Error|Exception): ")


def upgrade_in_child(database: Database) -> tuple[str | None, str]:
    """`upgrade`, in a child process of this interpreter when a migration is due: what it
    imports (alembic, the migrations) goes away with it. Raises ConfigurationError with the
    child's last line when the migration fails."""
    before = current_revision(database)
    if before == HEAD_REVISION:
        return before, before
    done = subprocess.run(
        [sys.executable, "-m", "whop_autocancel.schema.migrate", database.url],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        # The exception's own line (a driver's error adds its SQL and a link after it).
        errors = [line for line in lines if _EXCEPTION_LINE.match(line)]
        why = errors[-1] if errors else (lines[-1] if lines else f"exit {done.returncode}")
        raise ConfigurationError(f"DATABASE_URL: migrating the schema failed: {why[:300]}")
    revisions = json.loads(done.stdout.strip().splitlines()[-1])
    return revisions["before"], revisions["after"]


if __name__ == "__main__":  # `upgrade_in_child`'s child: the URL in, the revisions out
    target = Database(sys.argv[1])
    try:
        old, new = upgrade(target)
    finally:
        target.dispose()
    print(json.dumps({"before": old, "after": new}))
