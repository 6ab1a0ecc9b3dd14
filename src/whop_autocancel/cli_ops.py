"""Admin recovery commands: `orders`, `events list|replay|ignore` and `cancel MEMBERSHIP`.
`register(app)` adds them to the main typer app; the logic lives in `ops.py`. Failures raise
`WhopAutocancelError` (exit 1) or `ConfigurationError` (exit 2), printed by `cli.main()`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import click
import typer
from rich.markup import escape
from rich.table import Table

from whop_autocancel.admin.operations import (
    DEFAULT_LIMIT,
    OpsError,
    cancel_membership,
    cancel_target,
    format_time,
    ignore_event,
    list_events,
    list_orders,
    replay_event,
)
from whop_autocancel.cancellation.models import Cancellation
from whop_autocancel.orders.models import Order, OrderStatus
from whop_autocancel.webhooks.models import EventStatus

ERROR_WIDTH = 80

LimitOption = Annotated[int, typer.Option("--limit", min=1, help="Show at most this many.")]


def register(app: typer.Typer) -> None:
    """Add the recovery commands to `app`."""
    orders_app = typer.Typer(help="List orders; send a delivery email again.")
    orders_app.callback(invoke_without_command=True)(orders)
    app.add_typer(orders_app, name="orders")
    events_app = typer.Typer(
        help="Inspect, replay and ignore stored webhook events.", no_args_is_help=True
    )
    events_app.command("list")(events_list)
    events_app.command("replay")(events_replay)
    events_app.command("ignore")(events_ignore)
    app.add_typer(events_app, name="events")
    app.command("cancel")(cancel)
    from whop_autocancel import cli_stock

    cli_stock.register(app, orders_app)


def _short(text: str | None, width: int = ERROR_WIDTH) -> str:
    if not text:
        return "-"
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def _print_listing(
    noun: str,
    filters: dict[str, str | None],
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
) -> None:
    """A table of `rows`, newest first, titled with the count and the filters given; or one
    line when there are none."""
    from whop_autocancel.cli import out

    given = [f"{name} {value}" for name, value in filters.items() if value]
    where = f" with {' and '.join(given)}" if given else ""
    if not rows:
        out.print(escape(f"No {noun}s{where}."))
        return
    table = Table(title=escape(f"{len(rows)} {noun}(s){where}, newest first"))
    for column in columns:
        table.add_column(column, overflow="fold")
    for cells in rows:
        table.add_row(*(escape(cell) for cell in cells))
    out.print(table)


def orders(
    context: typer.Context,
    status: Annotated[
        OrderStatus | None, typer.Option("--status", help="Only orders in this status.")
    ] = None,
    email: Annotated[
        str | None, typer.Option("--email", help="Only this customer's (any case).")
    ] = None,
    limit: LimitOption = DEFAULT_LIMIT,
) -> None:
    """List orders, newest first, with their payment, membership and cancellation
    (`orders resend ID` sends an order's delivery email again)."""
    from whop_autocancel.cli import _session

    if context.invoked_subcommand is not None:
        return
    with _session() as session:
        rows = list_orders(
            session, status=status.value if status else None, email=email, limit=limit
        )
    _print_listing(
        "order",
        {"status": status.value if status else None, "email": email},
        (
            "ID",
            "Status",
            "Plan",
            "Email",
            "Payment",
            "Membership",
            "Cancellation",
            "Created",
            "Paid",
            "Delivered",
        ),
        [_order_cells(row.order, row.cancellation) for row in rows],
    )


def _order_cells(order: Order, cancellation: Cancellation | None) -> tuple[str, ...]:
    waiting = order.waiting_for_stock and order.status == OrderStatus.DELIVERY_FAILED.value
    return (
        order.id,
        order.status + (f" (waiting for stock {order.waiting_for_stock})" if waiting else ""),
        order.plan_id or "-",
        order.email or "-",
        order.whop_payment_id or "-",
        order.whop_membership_id or "-",
        f"{cancellation.status} (#{cancellation.id})" if cancellation else "-",
        format_time(order.created_at),
        format_time(order.paid_at),
        format_time(order.delivered_at),
    )


def events_list(
    status: Annotated[
        EventStatus | None, typer.Option("--status", help="Only events in this status.")
    ] = None,
    event_type: Annotated[
        str | None, typer.Option("--type", help="Only events of this type, e.g. payment.succeeded.")
    ] = None,
    limit: LimitOption = DEFAULT_LIMIT,
) -> None:
    """List stored webhook events, newest first."""
    from whop_autocancel.cli import _session, out

    with _session() as session:
        rows = list_events(
            session, status=status.value if status else None, event_type=event_type, limit=limit
        )
    _print_listing(
        "event",
        {"status": status.value if status else None, "type": event_type},
        ("ID", "Type", "Status", "Attempts", "Received", "Last error"),
        [
            (
                stored.id,
                stored.type,
                stored.status,
                str(stored.attempts),
                format_time(stored.received_at),
                _short(stored.last_error),
            )
            for stored in rows
        ],
    )
    if any(stored.status == EventStatus.FAILED.value for stored in rows):
        out.print(
            "Apply a failed event again with `whop-autocancel events replay ID`, or stop "
            "retrying it with `whop-autocancel events ignore ID`."
        )


def events_replay(
    event_id: Annotated[str, typer.Argument(metavar="ID", help="The event's ID (its webhook-id).")],
) -> None:
    """Apply a stored event again now, as if it had just arrived (whatever its status)."""
    from whop_autocancel.cli import _runtime, out

    with _runtime() as runtime:
        result = replay_event(runtime, event_id)
    name = f"Event {result.event_id} ({result.event_type})"
    if result.failed:
        raise OpsError(
            f"event {result.event_id} ({result.event_type}) still fails to apply: "
            f"{result.last_error}. It stays failed (attempt {result.attempts}) and the sweep "
            f"keeps retrying it; `whop-autocancel events ignore {result.event_id}` stops that"
        )
    changed = (
        f"It changed: {', '.join(result.changed_tables)}."
        if result.changed
        else "Nothing changed (applying an event is idempotent)."
    )
    if result.status == EventStatus.IGNORED.value:
        verdict = f"is {result.status}: whop-autocancel does not act on {result.event_type} events."
    elif result.previous_status == result.status:
        verdict = f"was already {result.status}; applied again."
    else:
        verdict = f"replayed: {result.previous_status} → {result.status}."
    out.print(escape(f"{name} {verdict} {changed}"), soft_wrap=True)


def events_ignore(
    event_id: Annotated[str, typer.Argument(metavar="ID", help="The event's ID (its webhook-id).")],
) -> None:
    """Mark a failed event ignored, so the sweep stops retrying it (handled ones are refused)."""
    from whop_autocancel.cli import _runtime, out

    with _runtime() as runtime:
        result = ignore_event(runtime, event_id)
    name = f"Event {result.event_id} ({result.event_type})"
    if not result.changed:
        out.print(escape(f"{name} is already ignored; nothing to do."), soft_wrap=True)
        return
    out.print(
        escape(
            f"{name} marked ignored (it was {result.previous_status}); the sweep no longer "
            f"retries it. `whop-autocancel events replay {result.event_id}` applies it again."
        ),
        soft_wrap=True,
    )


def cancel(
    membership_id: Annotated[
        str, typer.Argument(metavar="MEMBERSHIP", help="The Whop membership (mem_…) to cancel.")
    ],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Cancel the Whop membership of a known order now, recorded like any other cancellation.
    Only one-time purchases of plans listed in the catalog (and not `cancel = false`)."""
    from whop_autocancel.cli import _runtime, out

    with _runtime() as runtime:
        runtime.settings.require("WHOP_API_KEY")
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
