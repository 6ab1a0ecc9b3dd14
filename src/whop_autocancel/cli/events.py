"""Stored webhook events: `events list|replay|ignore`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from whop_autocancel.admin.operations import (
    DEFAULT_LIMIT,
    OpsError,
    format_time,
    ignore_event,
    list_events,
    replay_event,
)
from whop_autocancel.cli.common import (
    LimitOption,
    open_runtime,
    open_session,
    out,
    print_listing,
    short,
)
from whop_autocancel.webhooks.models import EventStatus


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

    with open_session() as session:
        rows = list_events(
            session, status=status.value if status else None, event_type=event_type, limit=limit
        )
    print_listing(
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
                short(stored.last_error),
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

    with open_runtime() as runtime:
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

    with open_runtime() as runtime:
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


events_app = typer.Typer(
    help="Inspect, replay and ignore stored webhook events.", no_args_is_help=True
)
events_app.command("list")(events_list)
events_app.command("replay")(events_replay)
events_app.command("ignore")(events_ignore)
