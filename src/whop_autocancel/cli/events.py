"""Stored webhook events: `events list|replay|ignore`."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from whop_autocancel.admin.operations import (
    DEFAULT_LIMIT,
    OpsError,
    ignore_event,
    list_events,
    replay_event,
)
from whop_autocancel.cli.common import LimitOption, open_runtime, open_session, print_listing
from whop_autocancel.cli.output import (
    Column,
    JsonOption,
    WideOption,
    iso,
    out,
    print_json_lines,
    say,
)
from whop_autocancel.webhooks.models import EventStatus, WebhookEvent


def events_list(
    status: Annotated[
        EventStatus | None,
        typer.Option(
            "--status",
            metavar="STATUS",
            help=f"Only events in this status: {', '.join(s.value for s in EventStatus)}.",
        ),
    ] = None,
    event_type: Annotated[
        str | None,
        typer.Option(
            "--type", metavar="TYPE", help="Only events of this type, e.g. payment.succeeded."
        ),
    ] = None,
    limit: LimitOption = DEFAULT_LIMIT,
    json_output: JsonOption = False,
    wide: WideOption = False,
) -> None:
    """List stored webhook events, newest first."""

    with open_session() as session:
        rows = [
            event_row(stored)
            for stored in list_events(
                session, status=status.value if status else None, event_type=event_type, limit=limit
            )
        ]
    if json_output:
        print_json_lines(rows)
        return
    print_listing(
        "event",
        {"status": status.value if status else None, "type": event_type},
        EVENT_COLUMNS,
        rows,
        wide=wide,
    )
    if any(row["status"] == EventStatus.FAILED.value for row in rows):
        say(
            "Apply a failed event again with `whop-autocancel events replay ID`, or stop "
            "retrying it with `whop-autocancel events ignore ID`."
        )


def event_row(stored: WebhookEvent) -> dict[str, Any]:
    """A stored webhook event as `events list` shows it (never its body)."""
    return {
        "id": stored.id,
        "type": stored.type,
        "status": stored.status,
        "attempts": stored.attempts,
        "received_at": iso(stored.received_at),
        "handled_at": iso(stored.handled_at),
        "next_attempt_at": iso(stored.next_attempt_at),
        "last_error": stored.last_error,
    }


EVENT_COLUMNS = (
    Column("ID", "id", priority=100, identifier=True, keep=True),
    Column("Type", "type", priority=90),
    Column("Status", "status", priority=80),
    Column("Attempts", "attempts", priority=40, right=True),
    Column("Received", "received_at", priority=60),
    Column("Last error", "last_error", priority=50, free_text=True),
)


def events_replay(
    event_id: Annotated[str, typer.Argument(metavar="ID", help="The event's ID (its webhook-id).")],
) -> None:
    """Apply a stored event again now, whatever its status. It is applied as if it had just
    arrived."""

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
    out.print(f"{name} {verdict} {changed}", soft_wrap=True)


def events_ignore(
    event_id: Annotated[str, typer.Argument(metavar="ID", help="The event's ID (its webhook-id).")],
) -> None:
    """Mark a failed event ignored: the sweep stops retrying it. A handled event is
    refused."""

    with open_runtime() as runtime:
        result = ignore_event(runtime, event_id)
    name = f"Event {result.event_id} ({result.event_type})"
    if not result.changed:
        out.print(f"{name} is already ignored; nothing to do.", soft_wrap=True)
        return
    out.print(
        f"{name} marked ignored (it was {result.previous_status}); the sweep no longer "
        f"retries it. `whop-autocancel events replay {result.event_id}` applies it again.",
        soft_wrap=True,
    )


events_app = typer.Typer(
    help="Inspect, replay and ignore stored webhook events.", no_args_is_help=True
)
events_app.command("list")(events_list)
events_app.command("replay")(events_replay)
events_app.command("ignore")(events_ignore)
