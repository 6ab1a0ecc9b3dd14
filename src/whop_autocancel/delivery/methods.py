"""Delivery methods, pluggable by name. A method turns a paid order into what the customer gets;
it runs inside the transaction that marks the order delivered, so it must not talk to the outside
world (emails go through the outbox)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy.orm import Session

from whop_autocancel.catalog import CatalogPlan
from whop_autocancel.delivery import stock
from whop_autocancel.delivery.models import StockStatus
from whop_autocancel.errors import WhopAutocancelError
from whop_autocancel.mail.render import EmailTemplates, RenderedEmail
from whop_autocancel.orders.models import Order
from whop_autocancel.sealing import Sealer, SealError

NO_EMAIL = (
    "Whop sent no customer email for this payment, so the product cannot be emailed "
    "(does the API key have the member:email:read permission?)"
)


class DeliveryError(WhopAutocancelError):
    """The order cannot be delivered now; the message says why and what to do."""


class OutOfStock(DeliveryError):
    """The pool has no available item: the order waits for stock."""

    def __init__(self, pool: str) -> None:
        super().__init__(f"pool {pool!r} is out of stock")
        self.pool = pool


class StockUnreadable(DeliveryError):
    """The item cannot be decrypted with STOCK_ENCRYPTION_KEY (a changed or missing key): the
    order waits, the item stays available, and the admin is told to fix the key."""

    def __init__(self, pool: str, item_id: int, reason: str) -> None:
        super().__init__(f"stock item #{item_id} of pool {pool!r} cannot be read: {reason}")
        self.pool = pool
        self.item_id = item_id


class WaitingInLine(DeliveryError):
    """Earlier orders are waiting for this pool: they are served first, in payment order."""

    def __init__(self, pool: str, ahead: int) -> None:
        super().__init__(f"{ahead} earlier order(s) are waiting for pool {pool!r}; served next")
        self.pool = pool


@dataclass(frozen=True)
class DeliveryContext:
    session: Session
    order: Order
    plan: CatalogPlan
    support_email: str | None
    templates: EmailTemplates
    now: datetime
    sealer: Sealer | None = None
    skip_locked: bool = False


@dataclass(frozen=True)
class Delivery:
    customer_email: RenderedEmail | None
    summary: str  # what was delivered, for the admin notice and logs (never a secret)
    sealed: bool = False  # the email holds a secret: store it encrypted
    pool: str | None = None  # the stock pool an item was taken from


class DeliveryMethod(Protocol):
    name: str

    def deliver(self, context: DeliveryContext) -> Delivery:
        """Deliver a paid order (inside the transaction that marks it delivered)."""
        ...

    def resend(self, context: DeliveryContext) -> Delivery:
        """The same delivery again, for a delivered order (`orders resend`)."""
        ...


def _values(context: DeliveryContext) -> dict[str, Any]:
    order, plan = context.order, context.plan
    return {"order_id": order.id, "email": order.email, "plan_name": plan.name}


class MessageDelivery:
    """Email the merchant's text (and link) to the customer."""

    name = "message"

    def deliver(self, context: DeliveryContext) -> Delivery:
        order, plan = context.order, context.plan
        if not order.email:
            raise DeliveryError(NO_EMAIL)
        values = _values(context)
        email = context.templates.render(
            "delivery_message",
            plan.render_subject(**values),
            message=plan.render_message(**values),
            link=plan.link,
            plan_name=plan.name,
            order_id=order.id,
            email=order.email,
            support_email=context.support_email,
        )
        return Delivery(customer_email=email, summary=f"message email to {order.email}")

    def resend(self, context: DeliveryContext) -> Delivery:
        return self.deliver(context)


class NoDelivery:
    """Nothing to send (the merchant delivers elsewhere); the order still counts as delivered."""

    name = "none"

    def deliver(self, context: DeliveryContext) -> Delivery:
        return Delivery(customer_email=None, summary="nothing to send (delivery = none)")

    def resend(self, context: DeliveryContext) -> Delivery:
        raise DeliveryError("this plan delivers nothing (delivery = none): there is no email")


class StockDelivery:
    """Hand the customer one item of the plan's pool (an account, a license key, a code),
    taken in the delivery's own transaction, exactly once."""

    name = "stock"

    def deliver(self, context: DeliveryContext) -> Delivery:
        order, pool = context.order, self._pool(context)
        if not order.email:
            raise DeliveryError(NO_EMAIL)  # checked first: an item must not go to nobody
        item = stock.item_for_order(context.session, order.id)
        item_id = item.id if item is not None else 0
        if item is None:
            ahead = stock.waits_behind(context.session, pool, order)
            if ahead and stock.available_count(context.session, pool, at_most=1):
                raise WaitingInLine(pool, ahead)
            if ahead:
                raise OutOfStock(pool)
        try:
            # A savepoint: if the item cannot be decrypted, its assignment is undone.
            with context.session.begin_nested():
                if item is None:
                    item = stock.claim_item(
                        context.session,
                        pool,
                        order.id,
                        context.now,
                        skip_locked=context.skip_locked,
                    )
                    if item is None:
                        raise OutOfStock(pool)
                item_id = item.id
                return self._email(context, item.id, item.content, pool)
        except SealError as error:
            raise StockUnreadable(pool, item_id, str(error)) from None

    def resend(self, context: DeliveryContext) -> Delivery:
        order, pool = context.order, self._pool(context)
        if not order.email:
            raise DeliveryError("the order has no customer email to send to")
        item = stock.item_for_order(context.session, order.id)
        if item is None:
            raise DeliveryError(f"order {order.id} holds no stock item")
        if item.status == StockStatus.VOID.value:
            raise DeliveryError(
                f"stock item #{item.id} of order {order.id} was voided ({item.void_reason}); "
                "it must not be sent again"
            )
        return self._email(context, item.id, item.content, pool)

    def _pool(self, context: DeliveryContext) -> str:
        pool = context.plan.pool
        assert pool is not None  # the catalog only gives `stock` plans with a pool
        return pool

    def _email(self, context: DeliveryContext, item_id: int, sealed: str, pool: str) -> Delivery:
        if context.sealer is None:
            raise DeliveryError("STOCK_ENCRYPTION_KEY is not set: stock cannot be read")
        order, plan = context.order, context.plan
        values = _values(context)
        email = context.templates.render(
            "delivery_stock",
            plan.render_subject(**values),
            message=plan.render_message(**values) if plan.message else "",
            item=context.sealer.open(sealed),
            link=plan.link,
            plan_name=plan.name,
            order_id=order.id,
            email=order.email,
            support_email=context.support_email,
        )
        return Delivery(
            customer_email=email,
            summary=f"stock item #{item_id} from pool {pool} to {order.email}",
            sealed=True,
            pool=pool,
        )


METHODS: dict[str, DeliveryMethod] = {
    method.name: method for method in (MessageDelivery(), NoDelivery(), StockDelivery())
}


def known_methods() -> frozenset[str]:
    return frozenset(METHODS)
