"""The `whop-autocancel` command. Every failure prints a clear line and exits non-zero."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated

import structlog
import typer
from rich.console import Console
from rich.table import Table

from whop_autocancel.catalog import Catalog
from whop_autocancel.errors import ConfigurationError, WhopAutocancelError
from whop_autocancel.logs import configure_logging
from whop_autocancel.settings import Settings, load_settings

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy.orm import Session

    from whop_autocancel.db.engine import Database
    from whop_autocancel.runtime import Runtime

app = typer.Typer(
    help="Deliver Whop one-time purchases and cancel their memberships, unattended.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
cancellations_app = typer.Typer(
    help="Inspect and retry membership cancellations.", no_args_is_help=True
)
app.add_typer(cancellations_app, name="cancellations")


out = Console(highlight=False)
log = structlog.get_logger(__name__)


def _settings() -> Settings:
    settings = load_settings()
    configure_logging(settings.LOG_LEVEL, settings.LOG_FORMAT)
    return settings


def _catalog(settings: Settings) -> Catalog:
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


def _start_runtime(settings: Settings) -> Runtime:
    """Check everything the process needs, in the order a newcomer would fix it: catalog,
    queue, database (SQLite migrates itself); then build the runtime."""
    from whop_autocancel.jobs import Jobs
    from whop_autocancel.runtime import build_runtime

    catalog = _catalog(settings)
    try:
        Jobs(settings.QUEUE_URL, settings.QUEUE_NAME).ping()
    except ConfigurationError:
        raise
    except Exception as error:
        raise ConfigurationError(
            f"QUEUE_URL: cannot reach the job queue: {_first_line(error)}"
        ) from None
    _prepare_database(settings, migrate_sqlite=True)
    runtime = build_runtime(settings, catalog=catalog)
    _start_watching(runtime.database, runtime.clock.now())
    return runtime


def _start_watching(database: Database, now: datetime) -> datetime:
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


def _ping(database: Database) -> None:
    """One clear line when the database cannot be reached, not a driver's traceback."""
    try:
        database.ping()
    except Exception as error:
        raise ConfigurationError(
            f"DATABASE_URL: cannot connect to {_safe_url(database.url)}: {_first_line(error)}"
        ) from None


def _first_line(error: Exception) -> str:
    """`Type: first line of the message` (a driver's message can run to many lines)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


def _prepare_database(settings: Settings, *, migrate_sqlite: bool) -> None:
    """SQLite migrates itself; elsewhere the schema must already be current (`migrate`)."""
    from whop_autocancel.db.engine import Database, sqlite_path
    from whop_autocancel.schema.migrate import current_revision, head_revision, upgrade

    database = Database(settings.DATABASE_URL)
    try:
        _ping(database)
        if migrate_sqlite and sqlite_path(settings.DATABASE_URL) is not None:
            before, after = upgrade(database)
            if before != after:
                log.info("database_migrated", before=before, after=after)
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
def _session() -> Iterator[Session]:
    """A transaction on the configured database, its schema current (no catalog or queue)."""
    from whop_autocancel.db.engine import Database

    settings = _settings()
    _prepare_database(settings, migrate_sqlite=False)
    database = Database(settings.DATABASE_URL)
    try:
        with database.transaction() as session:
            yield session
    finally:
        database.dispose()


@contextmanager
def _runtime(*, migrate_sqlite: bool = False) -> Iterator[Runtime]:
    """The runtime on a current schema (`migrate_sqlite`: a SQLite file is created or
    upgraded, as `serve` does, for commands that may come first on a new machine)."""
    from whop_autocancel.runtime import build_runtime

    settings = _settings()
    _prepare_database(settings, migrate_sqlite=migrate_sqlite)
    runtime = build_runtime(settings)
    try:
        yield runtime
    finally:
        runtime.close()


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    no_worker: Annotated[
        bool, typer.Option("--no-worker", help="Web only; run `worker` processes separately.")
    ] = False,
) -> None:
    """Run the web endpoint and (unless --no-worker) an in-process job worker."""
    import uvicorn

    from whop_autocancel.app import create_app

    settings = _settings()
    settings.require_runtime()
    runtime = _start_runtime(settings)
    log.info(
        "serve_starting",
        host=host,
        port=port,
        worker=not no_worker,
        plans=len(runtime.catalog.plans),
        database=_safe_url(settings.DATABASE_URL),
    )
    application = create_app(runtime, with_worker=not no_worker)
    uvicorn.run(
        application,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.SHUTDOWN_TIMEOUT),
        proxy_headers=True,
        forwarded_allow_ips=settings.FORWARDED_ALLOW_IPS,
    )
    runtime.close()


@app.command()
def worker() -> None:
    """Run a job worker alone (scale-out: any number, on any machine). SIGTERM stops it
    gracefully: running jobs finish, no new ones start."""
    from whop_autocancel.worker import run_worker

    settings = _settings()
    settings.require_runtime()
    runtime = _start_runtime(settings)
    try:
        run_worker(runtime)
    finally:
        runtime.close()


@app.command()
def migrate() -> None:
    """Create or upgrade the database schema to the newest version. The first run records
    when the service started watching Whop."""
    from whop_autocancel.clock import SystemClock
    from whop_autocancel.db.engine import Database
    from whop_autocancel.schema.migrate import upgrade

    settings = _settings()
    database = Database(settings.DATABASE_URL)
    try:
        _ping(database)
        before, after = upgrade(database)
        since = _start_watching(database, SystemClock().now())
    finally:
        database.dispose()
    if before == after:
        out.print(f"Database already at revision {after}; nothing to do.")
    else:
        out.print(f"Database migrated from {before or 'empty'} to {after}.")
    out.print(
        f"Watching Whop since {since:%Y-%m-%d %H:%M:%S} UTC: purchases paid before it are "
        "not delivered (`whop-autocancel recover` lists them)."
    )


@app.command()
def check() -> None:
    """Check settings, catalog, database, queue, SMTP and the Whop API key; one line each.
    Exits non-zero when any check fails."""
    from whop_autocancel.checks import CANCEL_NOTE, run_checks

    settings = _settings()
    failed = 0
    for result in run_checks(settings):
        failed += not result.ok
        mark = "[green]ok  [/green]" if result.ok else "[red]FAIL[/red]"
        out.print(f"{mark} {result.name}: {result.detail}", soft_wrap=True)
    out.print(CANCEL_NOTE, soft_wrap=True)
    if failed:
        raise WhopAutocancelError(f"{failed} check(s) failed")


@app.command()
def sweep(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report what would be done; change nothing.")
    ] = False,
) -> None:
    """Run the sweeps now: stuck work (re-enqueue what a crash left), then Whop (recover
    purchases whose webhook never came, cancel memberships that are still live)."""
    with _runtime() as runtime:
        stuck = runtime.stuck_sweep.run(force=True, dry_run=dry_run)
        would = "would re-enqueue" if dry_run else "re-enqueued"
        out.print(
            f"stuck work: {would} {stuck.cancellations} cancellation(s), {stuck.deliveries} "
            f"delivery(ies), {stuck.emails} email(s), {stuck.events} event(s), "
            f"{stuck.stock_pools} stock pool(s) with waiting orders"
        )
        whop = runtime.whop_sweep.run(force=True, dry_run=dry_run)
        recovered = "would recover" if dry_run else "recovered"
        again = "would cancel again" if dry_run else "cancelling again"
        out.print(
            f"whop: {whop.payments_seen} payment(s) read, {recovered} "
            f"{len(whop.recovered_payments)} whose webhook never came"
            + (f" ({', '.join(whop.recovered_payments[:10])})" if whop.recovered_payments else "")
        )
        if whop.skipped_payments:
            skip = "would skip" if dry_run else "skipped"
            out.print(f"whop: {skip} {len(whop.skipped_payments)} payment(s), not delivered:")
            for skipped in whop.skipped_payments[:50]:
                out.print(f"  {skipped.payment_id}: {skipped.reason}", soft_wrap=True)
        out.print(
            f"whop: {whop.memberships_seen} membership(s) read, {again} "
            f"{len(whop.recancelled)} still live"
            + (f" ({', '.join(whop.recancelled[:10])})" if whop.recancelled else "")
        )
        if whop.stopped:
            raise WhopAutocancelError(f"the Whop sweep stopped early: {whop.stopped}")


@app.command()
def backfill(
    plan: Annotated[str, typer.Option("--plan", help="A listed one-time plan (plan_…).")],
    since: Annotated[
        str | None, typer.Option("--since", help="Only memberships created after YYYY-MM-DD.")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List them; cancel nothing.")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Cancel the live memberships of a listed one-time plan sold before the service started
    watching, that belong to no order of ours. Everything else is listed as skipped."""
    from datetime import UTC, datetime

    from rich.progress import Progress

    from whop_autocancel.reconcile.backfill import BackfillRefused

    try:
        start = datetime.strptime(since, "%Y-%m-%d").replace(tzinfo=UTC) if since else None
    except ValueError:
        raise typer.BadParameter("use YYYY-MM-DD", param_hint="--since") from None
    with _runtime() as runtime:
        runtime.settings.require("WHOP_API_KEY")
        job = runtime.backfill()
        try:
            job.check_plan(plan)
            survey = job.survey(plan, start)
        except BackfillRefused as error:
            raise WhopAutocancelError(f"Not backfilling: {error}") from None
        live, skipped = survey.to_cancel, survey.skipped
        out.print(
            f"{len(live) + len(skipped)} live membership(s) of {plan}"
            + (f" created after {since}" if since else "")
            + f": {len(live)} to cancel, {len(skipped)} skipped. The service started watching "
            f"at {survey.watching_since:%Y-%m-%d %H:%M:%S} UTC: only memberships sold before "
            "then, of no order of ours, are cancelled.",
            soft_wrap=True,
        )
        table = Table()
        for column in ("Membership", "Status", "Customer", "Created"):
            table.add_column(column, no_wrap=True)
        for membership in live[:50]:
            table.add_row(
                membership.membership_id,
                membership.status,
                membership.email or "-",
                membership.created_at or "-",
            )
        if live:
            out.print(table)
        if len(live) > 50:
            out.print(f"… and {len(live) - 50} more.")
        if skipped:
            out.print("Skipped (left alone):")
            for item in skipped:
                out.print(
                    f"  {item.membership.membership_id} (created "
                    f"{item.membership.created_at or 'at an unknown time'}): {item.reason}",
                    soft_wrap=True,
                )
        if dry_run or not live:
            out.print("Dry run: nothing cancelled." if dry_run else "Nothing to cancel.")
            return
        if not yes and not typer.confirm(f"Cancel these {len(live)} membership(s) now?"):
            raise WhopAutocancelError("Not cancelled.")
        outcomes: dict[str, int] = {}
        with Progress(console=out) as progress:
            task = progress.add_task("cancelling", total=len(live))
            for membership in live:
                status = job.cancel(plan, membership)
                outcomes[status] = outcomes.get(status, 0) + 1
                progress.advance(task)
        out.print(
            "Done: "
            + ", ".join(f"{count} {status}" for status, count in sorted(outcomes.items()))
            + "."
            + (f" {len(skipped)} skipped (above)." if skipped else "")
        )
        if outcomes.get("scheduled"):
            out.print("Scheduled ones are retried by the workers (Whop asked to wait or failed).")
        if outcomes.get("failed"):
            raise WhopAutocancelError(
                f"{outcomes['failed']} failed: see `whop-autocancel cancellations failed`"
            )


@app.command()
def recover(
    since: Annotated[
        str,
        typer.Option(
            "--since", help="From when (UTC): YYYY-MM-DD or YYYY-MM-DDTHH:MM.", show_default=False
        ),
    ],
    apply: Annotated[
        bool, typer.Option("--apply", help="Deliver them now (without it: a dry run).")
    ] = False,
) -> None:
    """List the purchases paid before the service started watching Whop (since --since) that
    it would deliver; with --apply, deliver them as the Whop sweep would. Dry run first."""
    from datetime import UTC, datetime

    from whop_autocancel.reconcile.recover import RecoverRefused

    start: datetime | None = None
    for form in ("%Y-%m-%d", "%Y-%m-%dT%H:%M"):
        try:
            start = datetime.strptime(since, form).replace(tzinfo=UTC)
            break
        except ValueError:
            continue
    if start is None:
        raise typer.BadParameter("use YYYY-MM-DD or YYYY-MM-DDTHH:MM (UTC)", param_hint="--since")
    with _runtime() as runtime:
        runtime.settings.require("WHOP_API_KEY")
        job = runtime.recovery()
        try:
            survey = job.survey(start)
        except RecoverRefused as error:
            raise WhopAutocancelError(f"Not recovering: {error}") from None
        out.print(
            f"Payments created from {survey.since:%Y-%m-%d %H:%M} UTC until the service started "
            f"watching ({survey.until:%Y-%m-%d %H:%M:%S} UTC): {survey.payments_seen} read.",
            soft_wrap=True,
        )
        found = survey.recoverable
        verb = "were" if apply else "would be"
        out.print(f"{len(found)} purchase(s) {verb} delivered:" if found else "Nothing to deliver.")
        if found:
            table = Table()
            for column in ("Payment", "Created", "Plan", "Customer", "Delivery"):
                table.add_column(column, overflow="fold")
            for payment in found:
                facts = payment.facts
                delivery = payment.note or (
                    f"{payment.delivery}, then cancel the membership"
                    if payment.cancels
                    else f"{payment.delivery}, membership kept"
                )
                table.add_row(
                    facts.payment_id,
                    f"{facts.created_at:%Y-%m-%d %H:%M:%S}" if facts.created_at else "-",
                    f"{payment.plan_name} ({facts.plan_id})",
                    facts.email or "-",
                    delivery,
                )
            out.print(table)
        if survey.skipped:
            out.print(f"{len(survey.skipped)} skipped (left alone):")
            for skipped in survey.skipped:
                out.print(f"  {skipped.payment_id}: {skipped.reason}", soft_wrap=True)
        if not apply:
            if found:
                out.print("Dry run: nothing changed. Run it again with --apply to deliver them.")
            else:
                out.print("Dry run: nothing changed.")
            return
        applied = job.apply(survey)
        out.print(
            f"Recovered {len(applied)} purchase(s): their delivery is queued; a running worker "
            "delivers them and then cancels their memberships."
        )


@cancellations_app.command("failed")
def cancellations_failed() -> None:
    """List the cancellations that finally failed and need a human."""
    from whop_autocancel.cancellation.service import failed_cancellations
    from whop_autocancel.db.engine import Database

    settings = _settings()
    _prepare_database(settings, migrate_sqlite=False)
    database = Database(settings.DATABASE_URL)
    try:
        with database.transaction() as session:
            rows = failed_cancellations(session)
    finally:
        database.dispose()
    if not rows:
        out.print("No failed cancellations.")
        return
    table = Table(title=f"{len(rows)} failed cancellation(s)")
    for column in (
        "ID",
        "Order",
        "Membership",
        "Customer",
        "Tries",
        "Gen",
        "HTTP",
        "Error",
        "Failed at",
    ):
        table.add_column(column, overflow="fold", no_wrap=column != "Error")
    for cancellation, order in rows:
        table.add_row(
            str(cancellation.id),
            order.id,
            cancellation.membership_id or "-",
            order.email or "-",
            str(cancellation.attempts),
            str(cancellation.generation),
            str(cancellation.last_http_status or "-"),
            cancellation.last_error or "-",
            cancellation.updated_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    out.print(table)
    out.print("Retry one with `whop-autocancel cancellations retry ID`, or all with `--all`.")


@cancellations_app.command("retry")
def cancellations_retry(
    cancellation_id: Annotated[int | None, typer.Argument(help="The cancellation's ID.")] = None,
    all_failed: Annotated[bool, typer.Option("--all", help="Retry every failed one.")] = False,
) -> None:
    """Schedule failed cancellations again (a new attempt generation; a worker runs them)."""
    from whop_autocancel.cancellation.service import RetryRefused, failed_cancellations
    from whop_autocancel.runtime import build_runtime

    if (cancellation_id is None) == (not all_failed):
        raise typer.BadParameter("give one cancellation ID or --all")
    settings = _settings()
    _prepare_database(settings, migrate_sqlite=False)
    runtime = build_runtime(settings)
    try:
        with runtime.database.transaction() as session:
            ids = (
                [c.id for c, _ in failed_cancellations(session)]
                if all_failed
                else [cancellation_id]
            )
        if not ids:
            out.print("No failed cancellations to retry.")
            return
        for one in ids:
            assert one is not None
            try:
                with runtime.database.transaction() as session:
                    row = runtime.cancellations.retry(session, one)
                    membership = row.membership_id
                    generation = row.generation
            except RetryRefused as error:
                raise WhopAutocancelError(f"Not retried: {error}") from None
            out.print(
                f"Cancellation #{one} (membership {membership or 'unknown'}) scheduled "
                f"again as attempt generation {generation}; a running worker will "
                "cancel it now."
            )
    finally:
        runtime.close()


@app.command()
def demo(
    keep: Annotated[bool, typer.Option(help="Keep the temporary folder for inspection.")] = False,
) -> None:
    """Run the whole flow against the built-in Whop simulator and an SMTP sink, then print
    what happened to each purchase. Exits 0 only if everything ended as it should."""
    from whop_autocancel.demo import run_demo

    configure_logging("WARNING", "console")
    ok = run_demo(out, keep=keep)
    raise typer.Exit(0 if ok else 1)


@app.command()
def simulator(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8900,
    api_key: Annotated[
        str, typer.Option(envvar="SIM_API_KEY", help="The bearer key it accepts.")
    ] = "sim_key",
    webhook_secret: Annotated[
        str, typer.Option(envvar="SIM_WEBHOOK_SECRET", help="The ws_… secret it signs with.")
    ] = "ws_simulator",  # noqa: S107
    webhook_url: Annotated[
        str | None, typer.Option(envvar="SIM_WEBHOOK_URL", help="Where it sends webhooks.")
    ] = None,
    plan: Annotated[
        list[str] | None,
        typer.Option(help="A plan it knows, as ID[:one_time|renewal]; repeatable."),
    ] = None,
    company_id: Annotated[str, typer.Option(help="The store's biz_… id.")] = "biz_SimStore",
    seed: Annotated[int, typer.Option(help="Seed of the fault injection's dice.")] = 1,
    time_scale: Annotated[float, typer.Option(help="Multiplies Whop's delays.")] = 1.0,
) -> None:
    """Run the Whop simulator (a stand-in for api.whop.com) until interrupted. Its control API
    is described in docs/simulator.md."""
    import signal
    import threading

    from whop_autocancel.simulator import SimulatorServer

    plans: list[tuple[str, str]] = []
    for entry in plan or []:
        plan_id, _, plan_type = entry.partition(":")
        if plan_type not in ("", "one_time", "renewal") or not plan_id.startswith("plan_"):
            raise typer.BadParameter(
                f"{entry!r}: expected plan_ID, plan_ID:one_time or plan_ID:renewal",
                param_hint="--plan",
            )
        plans.append((plan_id, plan_type or "one_time"))
    configure_logging("INFO", "console")
    server = SimulatorServer(
        api_key=api_key,
        webhook_secret=webhook_secret,
        webhook_url=webhook_url,
        time_scale=time_scale,
        host=host,
        port=port,
        company_id=company_id,
        seed=seed,
    )
    server.start()
    for plan_id, plan_type in plans:
        server.state.create_plan(plan_id, plan_type)  # type: ignore[arg-type]
    out.print(
        f"Whop simulator at {server.api_url} (control API under {server.url}/_sim); "
        "Ctrl-C or SIGTERM stops it."
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


UserOption = Annotated[str, typer.Option("--user", help="The account the processes run as.")]
WorkdirOption = Annotated[str, typer.Option("--workdir", help="Folder with .env and the catalog.")]
ExecutableOption = Annotated[
    str, typer.Option("--executable", help="The installed whop-autocancel command.")
]
HostOption = Annotated[str, typer.Option("--host", help="Address the web processes bind.")]
PortOption = Annotated[int, typer.Option("--port", help="First web port (then +1, +2, …).")]
WebOption = Annotated[int, typer.Option("--web", help="Web processes on this machine.")]
WorkersOption = Annotated[int, typer.Option("--workers", help="Worker processes here.")]
StopOption = Annotated[
    int, typer.Option("--stop-timeout", help="Seconds to wait after SIGTERM (> SHUTDOWN_TIMEOUT).")
]
LogOption = Annotated[str, typer.Option("--log-dir", help="Folder for the log files.")]


class ProcessManager(StrEnum):
    systemd = "systemd"
    supervisor = "supervisor"


@app.command()
def deploy(
    kind: Annotated[ProcessManager, typer.Argument(help="systemd or supervisor.")],
    user: UserOption = "whop-autocancel",
    workdir: WorkdirOption = "/opt/whop-autocancel",
    executable: ExecutableOption = "/opt/whop-autocancel/.venv/bin/whop-autocancel",
    env_file: Annotated[
        str,
        typer.Option(
            "--env-file",
            help="systemd: EnvironmentFile with the settings ('none' to omit); supervisor "
            "reads .env from --workdir.",
        ),
    ] = "/etc/whop-autocancel/env",
    host: HostOption = "127.0.0.1",
    port: PortOption = 8000,
    web: WebOption = 2,
    workers: WorkersOption = 2,
    stop_timeout: StopOption = 45,
    log_dir: LogOption = "/var/log/whop-autocancel",
) -> None:
    """Print ready-to-use process manager files for web and worker processes: systemd units
    (migrate, web@PORT, worker@N, a target) or a supervisord config. See docs/deploy.md."""
    from whop_autocancel.deploy import DeployOptions, render_supervisor, render_systemd

    systemd = kind is ProcessManager.systemd
    options = DeployOptions(
        user=user,
        workdir=workdir,
        executable=executable,
        env_file=env_file if systemd and env_file.lower() != "none" else None,
        host=host,
        port=port,
        web=web,
        workers=workers,
        stop_timeout=stop_timeout,
        log_dir=log_dir,
    )
    sys.stdout.write(render_systemd(options) if systemd else render_supervisor(options))


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _register_ops() -> None:
    from whop_autocancel import cli_ops  # imports from this module inside its functions

    cli_ops.register(app)


_register_ops()


def main() -> None:
    try:
        app()
    except ConfigurationError as error:
        print(f"whop-autocancel: configuration error: {error}", file=sys.stderr)
        sys.exit(2)
    except WhopAutocancelError as error:
        print(f"whop-autocancel: {error}", file=sys.stderr)
        sys.exit(1)
