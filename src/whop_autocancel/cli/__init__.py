"""The `whop-autocancel` command: one module per command group, on the admin layer. Every
failure prints a clear line and exits non-zero (1; 2 for a configuration error)."""

from __future__ import annotations

import sys

import typer

from whop_autocancel.cli import (
    admin,
    alerts,
    cancellations,
    emails,
    events,
    orders,
    reconcile,
    service,
    stock,
)
from whop_autocancel.cli.common import configure_cli_logging
from whop_autocancel.cli.help import use_help_command
from whop_autocancel.errors import ConfigurationError, WhopAutocancelError

app = typer.Typer(
    help="Deliver Whop one-time purchases and cancel their memberships, unattended.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Help and usage errors as plain text, wrapped at spaces to 80 columns at most: no boxes,
    # no `<str>` type placeholders, no help text read as rich markup.
    rich_markup_mode=None,
)
for command in (
    service.serve,
    service.worker,
    service.migrate,
    service.check,
    reconcile.sweep,
    reconcile.backfill,
    reconcile.recover,
    cancellations.cancel,
    alerts.alerts,
    service.demo,
    service.simulator,
    service.deploy,
):
    app.command()(command)
app.add_typer(orders.orders_app, name="orders")
app.add_typer(events.events_app, name="events")
app.add_typer(cancellations.cancellations_app, name="cancellations")
app.add_typer(stock.stock_app, name="stock")
app.add_typer(emails.emails_app, name="emails")
app.add_typer(admin.admin_app, name="admin")
use_help_command(app)


def main() -> None:
    # Until a command reads LOG_FORMAT, anything logged goes to stderr too (structlog's own
    # default would print it on stdout, in the middle of the command's output).
    configure_cli_logging("INFO", None)
    try:
        app(prog_name="whop-autocancel")  # also when run as `python -m whop_autocancel`
    except ConfigurationError as error:
        print(f"whop-autocancel: configuration error: {error}", file=sys.stderr)
        sys.exit(2)
    except WhopAutocancelError as error:
        print(f"whop-autocancel: {error}", file=sys.stderr)
        sys.exit(1)
