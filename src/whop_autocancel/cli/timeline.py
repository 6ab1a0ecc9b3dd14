"""`orders show REF`: one purchase's whole story, found by any id a merchant holds or an email."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from whop_autocancel.admin.timeline import PurchaseView, find_orders, purchase, view_json
from whop_autocancel.cli.common import open_session
from whop_autocancel.clock import format_utc
from whop_autocancel.errors import WhopAutocancelError

SOURCE_WIDTH = 12  # the longest source name ("cancellation") sets the column


def render(view: PurchaseView) -> list[str]:
    """Plain lines: ids whole, never wrapped by us (a terminal may wrap a long line)."""
    order = view.order
    lines = [f"Order {order['id']}: {order['status']}"]
    for label, key in (
        ("Plan", "plan_id"),
        ("Email", "email"),
        ("Payment", "payment_id"),
        ("Membership", "membership_id"),
        ("Checkout", "checkout_configuration_id"),
        ("Matched by", "matched_by"),
        ("Delivery", "delivery_method"),
        ("Waiting for stock", "waiting_for_stock"),
    ):
        if order.get(key):
            lines.append(f"  {label + ':':<19}{order[key]}")
    if view.cancellation is not None:
        row = view.cancellation
        lines.append(
            f"  {'Cancellation:':<19}#{row['id']} {row['status']}, {row['attempts']} attempt(s), "
            f"generation {row['generation']}"
        )
    lines.append("")
    for entry in view.entries:
        lines.append(f"{format_utc(entry.at)}  {entry.source:<{SOURCE_WIDTH}}  {entry.title}")
        if entry.source == "attempt" and entry.fields.get("idempotency_key"):
            lines.append(
                f"{'':<22}{'':<{SOURCE_WIDTH}}Idempotency-Key {entry.fields['idempotency_key']}"
            )
        elif entry.source == "email" and entry.fields.get("smtp_answer"):
            lines.append(f"{'':<22}{'':<{SOURCE_WIDTH}}SMTP: {entry.fields['smtp_answer']}")
    return lines


def show(
    ref: Annotated[
        str,
        typer.Argument(
            metavar="REF",
            help="An order, payment, membership, checkout or webhook event id, or an email.",
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False,
) -> None:
    """Show everything that happened to a purchase, in time order. Webhook events, the
    matching rule, the delivery, every email, every call to Whop, alerts and admin
    actions."""
    with open_session() as session:
        ids = find_orders(session, ref)
        views = [view for view in (purchase(session, one) for one in ids) if view is not None]
    if not views:
        raise WhopAutocancelError(
            f"no purchase matches {ref.strip()!r} (an order, payment, membership, checkout or "
            "event id, or the customer's email)"
        )
    if as_json:
        document = view_json(views[0]) if len(views) == 1 else [view_json(v) for v in views]
        typer.echo(json.dumps(document, ensure_ascii=False))
        return
    for number, view in enumerate(views):
        if number:
            typer.echo("")
        for line in render(view):
            typer.echo(line)
    if len(views) > 1:
        typer.echo(f"\n{len(views)} purchases match {ref.strip()!r}, newest first.")
