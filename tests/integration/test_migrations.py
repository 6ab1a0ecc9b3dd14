"""The migrations build exactly the schema the models describe, on every database, and undo
cleanly: a model change without its migration fails here, not in a merchant's upgrade."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from whop_autocancel.db.engine import Database
from whop_autocancel.schema import Base
from whop_autocancel.schema.migrate import alembic_config, current_revision, upgrade


def test_migrations_match_the_models_and_downgrade(database_url: str) -> None:
    database = Database(database_url)
    try:
        upgrade(database)
        with database.engine.connect() as connection:
            differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert differences == []
        config = alembic_config(database)
        with database.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "0003")
        assert current_revision(database) == "0003"
        upgrade(database)  # and back: the shared test databases stay at head
        assert current_revision(database) == "0010"
    finally:
        database.dispose()
