"""Cancellations: `cancellations failed|retry` and `cancel MEMBERSHIP`."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from whop_autocancel.admin.operations import OpsError, cancel_membership, cancel_target
from whop_autocancel.cancellation.models import Cancellation
from whop_autocancel.cli.common import open_runtime, open_session
from whop_autocancel.cli.output import (
    Column,
    JsonOption,
    WideOption,
    iso,
    out,
    print_json_lines,
    print_table,
    say,
)
from whop_autocancel.clock import format_utc
from whop_autocancel.errors import WhopAutocancelError
from whop_autocancel.orders.models import Order

cancellations_app = typer.Typer(
    help="Inspect and retry membership cancellations.", no_args_is_help=True
)


@cancellations_app.command("failed")
def cancellations_failed(json_output: JsonOption = False, wide: WideOption = False) -> None:
    """List the cancellations that finally failed and need a human."""
    from whop_autocancel.cancellation.service import failed_cancellations

    with open_session() as session:
        rows = [failed_row(row, order) for row, order in failed_cancellations(session)]
    if json_output:
        print_json_lines(rows)
        return
    if not rows:
        out.print("No failed cancellations.")
        return
    print_table(FAILED_COLUMNS, rows, title=f"{len(rows)} failed cancellation(s)", wide=wide)
    say("Retry one with `whop-autocancel cancellations retry ID`, or all with `--all`.")


def failed_row(cancellation: Cancellation, order: Order) -> dict[str, Any]:
    """A failed cancellation as `cancellations failed` shows it."""
    return {
        "id": cancellation.id,
        "order_id": order.id,
        "membership_id": cancellation.membership_id,
        "email": order.email,
        "attempts": cancellation.attempts,
        "generation": cancellation.generation,
        "last_http_status": cancellation.last_http_status,
        "last_error": cancellation.last_error,
        "failed_at": iso(cancellation.updated_at),
    }


FAILED_COLUMNS = (
    Column("ID", "id", priority=100, identifier=True, keep=True, right=True),
    Column("Order", "order_id", priority=90, identifier=True),
    Column("Membership", "membership_id", priority=80, identifier=True),
    Column("Customer", "email", priority=50),
    Column("Tries", "attempts", priority=20, right=True),
    Column("Gen", "generation", priority=10, right=True),
    Column("HTTP", "last_http_status", priority=40, right=True),
    Column("Error", "last_error", priority=70, free_text=True),
    Column("Failed at", "failed_at", priority=30),
)


@cancellations_app.command("retry")
def cancellations_retry(
    cancellation_id: Annotated[
        int | None, typer.Argument(metavar="ID", help="The cancellation's ID.")
    ] = None,
    all_failed: Annotated[bool, typer.Option("--all", help="Retry every failed one.")] = False,
) -> None:
    """Schedule failed cancellations again; a worker runs them. Each gets a new attempt
    generation."""
    from whop_autocancel.admin.operations import failed_cancellation_ids, retry_cancellation
    from whop_autocancel.cancellation.service import RetryRefused

    if (cancellation_id is None) == (not all_failed):
        raise typer.BadParameter("give one cancellation ID or --all")
    with open_runtime() as runtime:
        ids = failed_cancellation_ids(runtime) if all_failed else [cancellation_id]
        if not ids:
            out.print("No failed cancellations to retry.")
            return
        for one in ids:
            assert one is not None
            try:
                retried = retry_cancellation(runtime, one)
            except RetryRefused as error:
                raise WhopAutocancelError(f"Not retried: {error}") from None
            out.print(
                f"Cancellation #{one} (membership {retried.membership_id or 'unknown'}) "
                f"scheduled again as attempt generation {retried.generation}; a running "
                "worker will cancel it now."
            )


def cancel(
    membership_id: Annotated[
        str, typer.Argument(metavar="MEMBERSHIP", help="The Whop membership (mem_…) to cancel.")
    ],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Cancel the Whop membership of a known order now. It is recorded like any other
    cancellation. Only one-time purchases of plans listed in the catalog (and not
    `cancel = false`)."""
    with open_runtime(required=("WHOP_API_KEY",)) as runtime:
        target = cancel_target(runtime, membership_id)
        if target.already_done:
            out.print(
                f"Membership {target.membership_id} (order {target.order_id}) is already "
                f"{target.cancellation_status} (cancellation #{target.cancellation_id}); "
                "Whop was not called.",
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
            except typer.Abort:  # no answer: the input ended (no terminal) or Ctrl-C
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
            f"{row} is scheduled to try again at {format_utc(result.next_attempt_at)}; a "
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
    out.print(message, soft_wrap=True)
