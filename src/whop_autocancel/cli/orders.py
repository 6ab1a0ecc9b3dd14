"""Orders: `orders` (list) and `orders resend ID`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from whop_autocancel.admin.operations import (
    DEFAULT_LIMIT,
    format_time,
    list_orders,
    resend_delivery,
)
from whop_autocancel.cancellation.models import Cancellation
from whop_autocancel.cli import timeline
from whop_autocancel.cli.common import LimitOption, open_runtime, open_session, out, print_listing
from whop_autocancel.orders.models import Order, OrderStatus


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

    if context.invoked_subcommand is not None:
        return
    with open_session() as session:
        rows = list_orders(
            session, status=status.value if status else None, email=email, limit=limit
        )
    print_listing(
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


def orders_resend(
    order_id: Annotated[str, typer.Argument(metavar="ID", help="The order (ord_…).")],
) -> None:
    """Send the customer's delivery email again, with the same item (stock) or message."""

    with open_runtime() as runtime:
        resent = resend_delivery(runtime, order_id)
    out.print(
        escape(
            f"Order {resent.order_id}: the delivery email ({resent.summary}) is queued again "
            f"to {resent.to}; a running worker sends it."
        ),
        soft_wrap=True,
    )


orders_app = typer.Typer(help="List orders; send a delivery email again.")
orders_app.callback(invoke_without_command=True)(orders)
orders_app.command("resend")(orders_resend)
orders_app.command("show")(timeline.show)
