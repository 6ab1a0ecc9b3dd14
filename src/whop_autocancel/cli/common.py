"""What every command group shares: settings, the database and runtime, and the console."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import structlog
import typer

from whop_autocancel.catalog import Catalog
from whop_autocancel.cli.output import Column, Row, out, print_table
from whop_autocancel.errors import ConfigurationError, error_line
from whop_autocancel.logs import configure_logging, log_format
from whop_autocancel.settings import Required, Settings, load_settings

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy.orm import Session

    from whop_autocancel.db.engine import Database
    from whop_autocancel.runtime import Runtime

log = structlog.get_logger(__name__)


def cli_settings(*, required: Required = (), service: bool = False) -> Settings:
    """The settings, with every invalid one and every one of `required` that is missing
    reported in one error; then logging, on stderr: LOG_FORMAT if it is set, else console
    lines at a terminal and JSON elsewhere (a `service` logs JSON unless told otherwise)."""
    settings = load_settings(required=required)
    explicit = settings.LOG_FORMAT if "LOG_FORMAT" in settings.model_fields_set else None
    configure_cli_logging(settings.LOG_LEVEL, explicit, service=service)
    return settings


def configure_cli_logging(level: str, explicit: str | None, *, service: bool = False) -> None:
    terminal = sys.stderr.isatty()
    fmt = log_format(explicit, service=service, terminal=terminal)
    configure_logging(level, fmt, colors=terminal and not os.environ.get("NO_COLOR"))


def cli_catalog(settings: Settings) -> Catalog:
    """Read the catalog before touching anything, so a mistake stops start-up cleanly."""
    from whop_autocancel.catalog import load_catalog
    from whop_autocancel.delivery.methods import known_methods

    catalog = load_catalog(settings.CATALOG_PATH, known_methods())
    if not catalog.plans:
        log.warning(
            "catalog_empty",
            path=str(settings.CATALOG_PATH),
            consequence="nothing will be delivered or cancelled",
        )
    return catalog


def start_runtime(settings: Settings) -> Runtime:
    """Check everything the process needs, in the order a newcomer would fix it: catalog,
    queue, database (SQLite migrates itself); then build the runtime."""
    from whop_autocancel.jobs import Jobs
    from whop_autocancel.runtime import build_runtime

    catalog = cli_catalog(settings)
    try:
        Jobs(settings.QUEUE_URL, settings.QUEUE_NAME).ping()
    except ConfigurationError:
        raise
    except Exception as error:
        raise ConfigurationError(
            f"QUEUE_URL: cannot reach the job queue: {error_line(error)}"
        ) from None
    prepare_database(settings)
    runtime = build_runtime(settings, catalog=catalog)
    start_watching_whop(runtime.database, runtime.clock.now())
    return runtime


def start_watching_whop(database: Database, now: datetime) -> datetime:
    """The first start records when the service started watching Whop (DESIGN §5): the sweep
    never delivers a purchase paid before it (`recover` does, when asked)."""
    from whop_autocancel.db.install import start_watching

    since = start_watching(database, now)
    if since == now:
        log.warning(
            "watching_since_recorded",
            at=since.isoformat(),
            consequence="purchases paid before this are not delivered by the Whop sweep; "
            "`whop-autocancel recover --since DATE` lists them",
        )
    return since


def ping_database(database: Database) -> None:
    """One clear line when the database cannot be reached, not a driver's traceback."""
    try:
        database.ping()
    except Exception as error:
        raise ConfigurationError(
            f"DATABASE_URL: cannot connect to {safe_url(database.url)}: {error_line(error)}"
        ) from None


def prepare_database(settings: Settings) -> None:
    """SQLite migrates itself, whichever command comes first on a new machine; elsewhere the
    schema must already be current (`migrate`), because several processes on several
    machines share it and an upgrade is a step the operator takes (docs/operations.md)."""
    from whop_autocancel.db.engine import Database, sqlite_path
    from whop_autocancel.schema.migrate import current_revision, head_revision, upgrade_in_child

    database = Database(settings.DATABASE_URL)
    try:
        ping_database(database)
        if sqlite_path(settings.DATABASE_URL) is not None:
            # In a child process: alembic's memory is not kept by a long-running `serve`.
            before, after = upgrade_in_child(database)
            if before != after:
                # Named, so a mistyped path that made a new, empty database shows at once.
                log.info(
                    "database_migrated",
                    before=before,
                    after=after,
                    database=safe_url(settings.DATABASE_URL),
                )
            return
        current, head = current_revision(database), head_revision(database)
        if current != head:
            raise ConfigurationError(
                f"DATABASE_URL: the schema is at {current or 'nothing'}, not {head}: "
                "run `whop-autocancel migrate` first"
            )
    finally:
        database.dispose()


@contextmanager
def open_session(settings: Settings | None = None) -> Iterator[Session]:
    """A transaction on the configured database, its schema current (no catalog or queue)."""
    from whop_autocancel.db.engine import Database

    settings = settings or cli_settings()
    prepare_database(settings)
    database = Database(settings.DATABASE_URL)
    try:
        with database.transaction() as session:
            yield session
    finally:
        database.dispose()


@contextmanager
def open_runtime(*, required: Required = ()) -> Iterator[Runtime]:
    """The runtime on a current schema (a SQLite file is created or upgraded), once the
    settings in `required` are known to be set."""
    from whop_autocancel.runtime import build_runtime

    settings = cli_settings(required=required)
    prepare_database(settings)
    runtime = build_runtime(settings)
    try:
        yield runtime
    finally:
        runtime.close()


def safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


LimitOption = Annotated[
    int, typer.Option("--limit", min=1, metavar="N", help="Show at most this many.")
]


def print_listing(
    noun: str,
    filters: dict[str, str | None],
    columns: Sequence[Column],
    rows: Sequence[Row],
    *,
    wide: bool = False,
) -> None:
    """A listing of `rows`, newest first, titled with the count and the filters given; or one
    line when there are none."""
    given = [f"{name} {value}" for name, value in filters.items() if value]
    where = f" with {' and '.join(given)}" if given else ""
    if not rows:
        out.print(f"No {noun}s{where}.", soft_wrap=True)
        return
    print_table(columns, rows, title=f"{len(rows)} {noun}(s){where}, newest first", wide=wide)
