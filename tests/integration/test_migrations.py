"""The migrations build exactly the schema the models describe, on every database, and undo
cleanly: a model change without its migration fails here, not in a merchant's upgrade."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import insert, inspect, select

from support.facts import email_row
from whop_autocancel.db.engine import Database
from whop_autocancel.errors import ConfigurationError
from whop_autocancel.mail.models import Email
from whop_autocancel.schema import Base
from whop_autocancel.schema.migrate import (
    HEAD_REVISION,
    alembic_config,
    current_revision,
    upgrade,
    upgrade_in_child,
)


def downgrade(database: Database, revision: str) -> None:
    """Take the schema of `database` down to `revision` (alembic's downgrade)."""
    config = alembic_config(database)
    with database.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)


def test_migrations_match_the_models_and_downgrade(database_url: str) -> None:
    database = Database(database_url)
    try:
        upgrade(database)
        with database.engine.connect() as connection:
            differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert differences == []
        downgrade(database, "0003")
        assert current_revision(database) == "0003"
        upgrade(database)  # and back: the shared test databases stay at head
        assert current_revision(database) == HEAD_REVISION
    finally:
        database.dispose()


def test_emails_done_lose_their_next_attempt_and_get_it_back_on_downgrade(
    database_url: str,
) -> None:
    """0011: an email sent or given up has no next attempt (so the due index holds only the
    waiting ones); a downgrade gives each one back (the column is NOT NULL there)."""
    database = Database(database_url)
    at = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
    sent, failed = at + timedelta(seconds=5), at + timedelta(seconds=9)
    try:
        upgrade(database)
        downgrade(database, "0010")
        emails = Email.__table__
        rows = {"waiting": {}, "sent": {"sent_at": sent}, "failed": {"failed_at": failed}}
        with database.engine.begin() as connection:
            for kind, done in rows.items():
                connection.execute(insert(emails).values(email_row(kind, at, **done)))

        def next_attempts() -> dict[str, datetime | None]:
            with database.engine.connect() as connection:
                found = connection.execute(select(emails.c.kind, emails.c.next_attempt_at))
                return {kind: due for kind, due in found}

        upgrade(database)
        assert next_attempts() == {"waiting": at, "sent": None, "failed": None}
        downgrade(database, "0010")
        assert next_attempts() == {"waiting": at, "sent": sent, "failed": failed}
        upgrade(database)  # the shared test databases stay at head
    finally:
        database.dispose()


def test_the_oldest_waiting_index_built_by_hand_first_is_kept(database_url: str) -> None:
    """0014: on a big PostgreSQL table the merchant may build the index first, without holding
    writes (`CREATE INDEX CONCURRENTLY`, as the migration's text says); the upgrade then keeps
    it instead of failing on it, and drops the index on `status` alone."""
    database = Database(database_url)
    try:
        upgrade(database)
        downgrade(database, "0013")
        with database.engine.begin() as connection:
            connection.exec_driver_sql(
                "CREATE INDEX ix_webhook_events_status_received_at "
                "ON webhook_events (status, received_at, id)"
            )
        upgrade(database)
        with database.engine.connect() as connection:
            names = {index["name"] for index in inspect(connection).get_indexes("webhook_events")}
            differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert "ix_webhook_events_status_received_at" in names
        assert "ix_webhook_events_status" not in names
        assert differences == []
    finally:
        database.dispose()


def test_the_code_knows_the_newest_migration() -> None:
    """`HEAD_REVISION` (what a start compares the database with, without loading alembic) is
    alembic's head: a new migration must move it."""
    from alembic.script import ScriptDirectory

    config = alembic_config(Database("sqlite://"))
    assert ScriptDirectory.from_config(config).get_current_head() == HEAD_REVISION


def test_a_start_on_a_current_schema_does_not_load_alembic(tmp_path: Path) -> None:
    """The check at every `serve` start reads the revision with one query: a process whose
    schema is current never imports alembic (9 MB of its memory)."""
    url = f"sqlite:///{tmp_path / 'service.db'}"
    database = Database(url)
    try:
        upgrade(database)  # the first start migrates
    finally:
        database.dispose()
    script = (
        "import sys\n"
        "from whop_autocancel.db.engine import Database\n"
        "from whop_autocancel.schema.migrate import upgrade\n"
        f"database = Database({url!r})\n"
        f"assert upgrade(database) == ({HEAD_REVISION!r}, {HEAD_REVISION!r}), upgrade(database)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'alembic'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "[]"


def test_serve_migrates_sqlite_in_a_child_process(tmp_path: Path) -> None:
    """A first `serve` on SQLite migrates in a child process: the server itself never loads
    alembic. A migration that fails says why in one line."""
    url = f"sqlite:///{tmp_path / 'service.db'}"
    script = (
        "import sys\n"
        "from whop_autocancel.db.engine import Database\n"
        "from whop_autocancel.schema.migrate import current_revision, upgrade_in_child\n"
        f"database = Database({url!r})\n"
        f"assert upgrade_in_child(database) == (None, {HEAD_REVISION!r})\n"
        f"assert current_revision(database) == {HEAD_REVISION!r}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'alembic'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "[]"

    broken = tmp_path / "broken.db"  # a table of the first migration's there already
    sqlite3.connect(broken).execute("CREATE TABLE orders (id TEXT)").connection.close()
    database = Database(f"sqlite:///{broken}")
    try:
        with pytest.raises(ConfigurationError, match=r"migrating the schema failed: .*orders"):
            upgrade_in_child(database)
    finally:
        database.dispose()
