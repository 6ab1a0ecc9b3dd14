"""Orders: `orders` (list) and `orders resend ID`."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from whop_autocancel.admin.operations import DEFAULT_LIMIT, list_orders, resend_delivery
from whop_autocancel.cancellation.models import Cancellation
from whop_autocancel.cli import timeline
from whop_autocancel.cli.common import LimitOption, open_runtime, open_session, print_listing
from whop_autocancel.cli.output import (
    Column,
    JsonOption,
    Row,
    WideOption,
    iso,
    out,
    print_json_lines,
)
from whop_autocancel.orders.models import Order, OrderStatus


def orders(
    context: typer.Context,
    status: Annotated[
        OrderStatus | None,
        typer.Option(
            "--status",
            metavar="STATUS",
            help=f"Only orders in this status: {', '.join(s.value for s in OrderStatus)}.",
        ),
    ] = None,
    email: Annotated[
        str | None,
        typer.Option("--email", metavar="EMAIL", help="Only this customer's (any case)."),
    ] = None,
    limit: LimitOption = DEFAULT_LIMIT,
    json_output: JsonOption = False,
    wide: WideOption = False,
) -> None:
    """List orders, newest first, with their payment, membership and cancellation
    (`orders resend ID` sends an order's delivery email again)."""

    if context.invoked_subcommand is not None:
        return
    with open_session() as session:
        rows = [
            order_row(row.order, row.cancellation)
            for row in list_orders(
                session, status=status.value if status else None, email=email, limit=limit
            )
        ]
    if json_output:
        print_json_lines(rows)
        return
    print_listing(
        "order",
        {"status": status.value if status else None, "email": email},
        ORDER_COLUMNS,
        rows,
        wide=wide,
    )


def order_row(order: Order, cancellation: Cancellation | None) -> dict[str, Any]:
    """An order as `orders` shows it (one JSON line, one table row)."""
    waiting = order.waiting_for_stock and order.status == OrderStatus.DELIVERY_FAILED.value
    return {
        "id": order.id,
        "status": order.status,
        "waiting_for_stock": order.waiting_for_stock if waiting else None,
        "plan_id": order.plan_id,
        "email": order.email,
        "payment_id": order.whop_payment_id,
        "membership_id": order.whop_membership_id,
        "cancellation_id": cancellation.id if cancellation else None,
        "cancellation_status": cancellation.status if cancellation else None,
        "created_at": iso(order.created_at),
        "paid_at": iso(order.paid_at),
        "delivered_at": iso(order.delivered_at),
    }


def _status_cell(row: Row) -> str:
    pool = row["waiting_for_stock"]
    return str(row["status"]) + (f" (waiting for stock {pool})" if pool else "")


def _cancellation_cell(row: Row) -> str:
    if row["cancellation_id"] is None:
        return "-"
    return f"{row['cancellation_status']} (#{row['cancellation_id']})"


ORDER_COLUMNS = (
    Column("ID", "id", priority=100, identifier=True, keep=True),
    Column("Status", "status", priority=90, cell=_status_cell),
    Column("Email", "email", priority=80),
    Column("Membership", "membership_id", priority=70, identifier=True),
    Column("Cancellation", "cancellation_id", priority=60, cell=_cancellation_cell),
    Column("Created", "created_at", priority=50),
    Column("Plan", "plan_id", priority=40, identifier=True),
    Column("Payment", "payment_id", priority=30, identifier=True),
    Column("Paid", "paid_at", priority=20),
    Column("Delivered", "delivered_at", priority=10),
)


def orders_resend(
    order_id: Annotated[str, typer.Argument(metavar="ID", help="The order (ord_…).")],
) -> None:
    """Send the customer's delivery email again. It holds the same item (stock) or
    message."""

    with open_runtime() as runtime:
        resent = resend_delivery(runtime, order_id)
    out.print(
        f"Order {resent.order_id}: the delivery email ({resent.summary}) is queued again "
        f"to {resent.to}; a running worker sends it.",
        soft_wrap=True,
    )


orders_app = typer.Typer(help="List orders; send a delivery email again.")
orders_app.callback(invoke_without_command=True)(orders)
orders_app.command("resend")(orders_resend)
orders_app.command("show")(timeline.show)
