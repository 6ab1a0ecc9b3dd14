"""What delivery and cancellation do when an order changes: the implementation of
`orders.service.OrderHooks` that the runtime gives the order service."""

from __future__ import annotations

from datetime import datetime

import structlog
from sqlalchemy.orm import Session

from whop_autocancel.cancellation.service import attach_membership
from whop_autocancel.catalog import Catalog
from whop_autocancel.delivery import stock
from whop_autocancel.jobs import Jobs
from whop_autocancel.orders.models import Order
from whop_autocancel.orders.service import ends_order
from whop_autocancel.whop.payloads import ClaimFacts

log = structlog.get_logger(__name__)


class PurchaseHooks:
    """Attaches a late membership id to its waiting cancellation; settles a stock item on a
    refund or dispute."""

    def __init__(self, catalog: Catalog, jobs: Jobs) -> None:
        self._catalog = catalog
        self._jobs = jobs

    def membership_attached(self, session: Session, order: Order, now: datetime) -> None:
        attach_membership(session, self._jobs, order, now)

    def claim_recorded(
        self, session: Session, order: Order, claim: ClaimFacts, now: datetime
    ) -> tuple[list[tuple[str, str]], list[str]]:
        return settle_stock_item(session, self._catalog, order, claim, now)


def settle_stock_item(
    session: Session, catalog: Catalog, order: Order, claim: ClaimFacts, now: datetime
) -> tuple[list[tuple[str, str]], list[str]]:
    """A stock order's item on a refund or dispute: with `on_refund = "void"`, voided once
    the money has gone back (a refund `succeeded`, a dispute `lost`); kept by the customer
    otherwise. Returns the alert's extra lines."""
    item = stock.item_for_order(session, order.id)
    if item is None:
        return [], []
    plan = catalog.get(order.plan_id)
    rotate = f"then run: whop-autocancel stock void {item.id}"
    if plan is None or plan.on_refund != "void":
        return (
            [("Stock item", f"#{item.id} ({item.pool}), kept by the customer")],
            [
                "The customer keeps the stock item (on_refund = keep). To retire it, rotate "
                f"the account or key yourself, {rotate}",
            ],
        )
    if not ends_order(claim):
        later = "succeeds" if claim.kind == "refund" else "is lost"
        return (
            [("Stock item", f"#{item.id} ({item.pool}), {item.status}")],
            [
                f"The {claim.kind} is {claim.status}: stock item #{item.id} is voided only if "
                f"the {claim.kind} {later} (on_refund = void); you will be told.",
            ],
        )
    result = stock.void_item(session, item.id, f"{claim.kind} {claim.claim_id}", now)
    if result.changed:
        log.warning(
            "stock_item_voided",
            order_id=order.id,
            item_id=item.id,
            pool=item.pool,
            by=claim.kind,
        )
    state = "voided now" if result.changed else "void already"
    return (
        [("Stock item", f"#{item.id} ({item.pool}), {state}")],
        [
            f"Stock item #{item.id} was marked void (on_refund = void): it will never be "
            "handed out again. Rotate it where it lives (change the account's password, "
            "disable the license key) so the customer's copy stops working.",
        ],
    )
