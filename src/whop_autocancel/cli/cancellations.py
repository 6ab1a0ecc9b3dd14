"""Cancellations: `cancellations failed|retry` and `cancel MEMBERSHIP`."""

from __future__ import annotations

from typing import Annotated

import click
import typer
from rich.markup import escape
from rich.table import Table

from whop_autocancel.admin.operations import OpsError, cancel_membership, cancel_target, format_time
from whop_autocancel.cli.common import cli_settings, open_runtime, out, prepare_database
from whop_autocancel.errors import WhopAutocancelError

cancellations_app = typer.Typer(
    help="Inspect and retry membership cancellations.", no_args_is_help=True
)


@cancellations_app.command("failed")
def cancellations_failed() -> None:
    """List the cancellations that finally failed and need a human."""
    from whop_autocancel.cancellation.service import failed_cancellations
    from whop_autocancel.db.engine import Database

    settings = cli_settings()
    prepare_database(settings, migrate_sqlite=False)
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
    settings = cli_settings()
    prepare_database(settings, migrate_sqlite=False)
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


def cancel(
    membership_id: Annotated[
        str, typer.Argument(metavar="MEMBERSHIP", help="The Whop membership (mem_…) to cancel.")
    ],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Cancel the Whop membership of a known order now, recorded like any other cancellation.
    Only one-time purchases of plans listed in the catalog (and not `cancel = false`)."""
    from whop_autocancel.cli.common import out

    with open_runtime(required=("WHOP_API_KEY",)) as runtime:
        target = cancel_target(runtime, membership_id)
        if target.already_done:
            out.print(
                escape(
                    f"Membership {target.membership_id} (order {target.order_id}) is already "
                    f"{target.cancellation_status} (cancellation #{target.cancellation_id}); "
                    "Whop was not called."
                ),
                soft_wrap=True,
            )
            return
        if not yes:
            plan = target.plan_name or target.plan_id or "unknown plan"
            question = (
                f"Cancel Whop membership {target.membership_id} of order {target.order_id} "
                f"({plan}, {target.email or 'no email'}, order {target.order_status}) now?"
            )
            try:
                confirmed = typer.confirm(question, default=False)
            except click.exceptions.Abort:
                confirmed = False
            if not confirmed:
                raise OpsError(f"membership {target.membership_id} not cancelled")
        result = cancel_membership(runtime, membership_id)
    head = f"Membership {result.membership_id} (order {result.order_id})"
    row = f"cancellation #{result.cancellation_id}, attempt generation {result.generation}"
    if result.action == "none":
        message = f"{head} is already {result.status} ({row}); Whop was not called."
    elif result.status == "canceled":
        message = f"{head} canceled in Whop ({row})."
    elif result.status == "already_inactive":
        message = f"{head} was already inactive in Whop; recorded as already_inactive ({row})."
    elif result.status == "scheduled":
        message = (
            f"{head} is not cancelled yet (last error: {result.last_error or 'none'}). The "
            f"{row} is scheduled to try again at {format_time(result.next_attempt_at)} UTC; a "
            "running worker does it."
        )
    elif result.status == "running":
        message = (
            f"{head}: a worker is cancelling it right now ({row}); see `whop-autocancel "
            "orders` for the outcome."
        )
    else:
        raise OpsError(
            f"membership {result.membership_id} (order {result.order_id}) not cancelled: the "
            f"{row} is {result.status}: {result.last_error or 'no error recorded'}"
        )
    out.print(escape(message), soft_wrap=True)
