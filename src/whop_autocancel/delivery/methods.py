"""Delivery methods, pluggable by name. A method turns a paid order into what the customer gets;
it runs inside the transaction that marks the order delivered, so it must not talk to the outside
world (emails go through the outbox)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from sqlalchemy.orm import Session

from whop_autocancel.delivery.catalog import CatalogPlan
from whop_autocancel.errors import WhopAutocancelError
from whop_autocancel.mail.render import RenderedEmail, render_email
from whop_autocancel.orders.models import Order


class DeliveryError(WhopAutocancelError):
    """The order cannot be delivered now; the message says why and what to do."""


@dataclass(frozen=True)
class DeliveryContext:
    session: Session
    order: Order
    plan: CatalogPlan
    support_email: str | None


@dataclass(frozen=True)
class Delivery:
    customer_email: RenderedEmail | None
    summary: str  # what was delivered, for the admin notice and logs (never a secret)


class DeliveryMethod(Protocol):
    name: str

    def deliver(self, context: DeliveryContext) -> Delivery: ...


class MessageDelivery:
    """Email the merchant's text (and link) to the customer."""

    name = "message"

    def deliver(self, context: DeliveryContext) -> Delivery:
        order, plan = context.order, context.plan
        if not order.email:
            raise DeliveryError(
                "Whop sent no customer email for this payment, so the product cannot be emailed "
                "(does the API key have the member:email:read permission?)"
            )
        values = {"order_id": order.id, "email": order.email, "plan_name": plan.name}
        email = render_email(
            "delivery_message",
            plan.render_subject(**values),
            message=plan.render_message(**values),
            link=plan.link,
            plan_name=plan.name,
            order_id=order.id,
            support_email=context.support_email,
        )
        return Delivery(customer_email=email, summary=f"message email to {order.email}")


class NoDelivery:
    """Nothing to send (the merchant delivers elsewhere); the order still counts as delivered."""

    name = "none"

    def deliver(self, context: DeliveryContext) -> Delivery:
        return Delivery(customer_email=None, summary="nothing to send (delivery = none)")


METHODS: dict[str, DeliveryMethod] = {
    method.name: method for method in (MessageDelivery(), NoDelivery())
}


def known_methods() -> frozenset[str]:
    return frozenset(METHODS)
