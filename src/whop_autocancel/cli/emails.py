"""The outbox: `emails` (list) and `emails retry ID|--all-failed`."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from whop_autocancel.admin.emails import (
    DEFAULT_LIMIT,
    EmailRow,
    EmailStatus,
    failed_email_ids,
    list_emails,
    retry_email,
)
from whop_autocancel.cli.common import LimitOption, open_runtime, open_session
from whop_autocancel.cli.output import (
    Column,
    JsonOption,
    Row,
    WideOption,
    iso,
    out,
    print_json_lines,
    print_table,
    say,
)
from whop_autocancel.mail.models import DELIVERY_KIND


def emails(
    context: typer.Context,
    status: Annotated[
        EmailStatus | None,
        typer.Option(
            "--status",
            metavar="STATUS",
            help=f"Only these: {', '.join(s.value for s in EmailStatus)} (without it: "
            "pending and failed).",
        ),
    ] = None,
    limit: LimitOption = DEFAULT_LIMIT,
    json_output: JsonOption = False,
    wide: WideOption = False,
) -> None:
    """List the outbox, newest first: emails still being tried and emails given up, by default
    (`emails retry ID` sends a failed one again). Never a body: it may hold a stock item."""
    if context.invoked_subcommand is not None:
        return
    with open_session() as session:
        rows = [email_row(row) for row in list_emails(session, status=status, limit=limit)]
    if json_output:
        print_json_lines(rows)
        return
    which = {None: "pending or failed ", EmailStatus.ALL: ""}.get(status, f"{status} ")
    if not rows:
        out.print(f"No {which}emails.")
        return
    print_table(
        EMAIL_COLUMNS,
        rows,
        title=f"{len(rows)} {which}email(s), newest first",
        wide=wide,
    )
    if any(row["status"] == EmailStatus.FAILED.value for row in rows):
        say(
            "Fix the cause (the address, or SMTP_URL: `whop-autocancel check`), then send a "
            "failed email again with `whop-autocancel emails retry ID` (or `--all-failed`)."
        )


def email_row(row: EmailRow) -> dict[str, Any]:
    """An email as `emails` shows it: who, what, and where it stands (never the body)."""
    return {
        "id": row.id,
        "status": row.status,
        "kind": row.kind,
        "order_id": row.order_id,
        "to": row.to,
        "subject": row.subject,
        "attempts": row.attempts,
        "next_attempt_at": iso(row.next_attempt_at) if row.status == "pending" else None,
        "last_error": row.last_error,
        "created_at": iso(row.created_at),
        "sent_at": iso(row.sent_at),
        "failed_at": iso(row.failed_at),
    }


def _done_cell(row: Row) -> str:
    return str(row["sent_at"] or row["failed_at"] or "-")


EMAIL_COLUMNS = (
    Column("ID", "id", priority=100, identifier=True, keep=True, right=True),
    Column("Status", "status", priority=95),
    Column("Kind", "kind", priority=70),
    Column("Order", "order_id", priority=80, identifier=True),
    Column("To", "to", priority=90),
    Column("Tries", "attempts", priority=30, right=True),
    Column("Next attempt", "next_attempt_at", priority=40),
    Column("Last answer", "last_error", priority=60, free_text=True),
    Column("Created", "created_at", priority=50),
    Column("Sent/failed", "sent_at", priority=20, cell=_done_cell),
)


def emails_retry(
    email_id: Annotated[int | None, typer.Argument(metavar="ID", help="The email's ID.")] = None,
    all_failed: Annotated[
        bool, typer.Option("--all-failed", help="Retry every failed email.")
    ] = False,
) -> None:
    """Put a failed email back to be sent, its attempts from zero. A running worker sends
    it; a delivery email accepted now lets its order's membership be cancelled."""
    if (email_id is None) == (not all_failed):
        raise typer.BadParameter("give one email ID or --all-failed")
    with open_runtime() as runtime:
        with runtime.database.transaction() as session:
            ids = failed_email_ids(session) if all_failed else [email_id]
        if not ids:
            out.print("No failed emails to retry.")
            return
        for one in ids:
            assert one is not None
            retried = retry_email(runtime, one)
            what = f"Email #{retried.id} ({retried.kind} to {retried.to}"
            what += f", order {retried.order_id})" if retried.order_id else ")"
            after = (
                " Once the SMTP server accepts it, the order's cancellation, if it waits for "
                "this email, runs."
                if retried.kind == DELIVERY_KIND
                else ""
            )
            out.print(
                f"{what} is queued again (attempts start over); a running worker sends it "
                f"now. It had failed with: {retried.previous_error or '-'}.{after}",
                soft_wrap=True,
            )


emails_app = typer.Typer(help="The email outbox: list; send a failed email again.")
emails_app.callback(invoke_without_command=True)(emails)
emails_app.command("retry")(emails_retry)
