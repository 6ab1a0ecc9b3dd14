"""The checkout API's logic (DESIGN §5): a pending order plus a Whop checkout configuration whose
metadata names it. The one synchronous Whop call in the service (DESIGN §3): short timeout, and
when Whop does not create the checkout the order is closed (`abandoned`) before the 503, so no
payment can ever be guessed onto it (DESIGN §5, binding invariants)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import structlog

from whop_autocancel.catalog import Catalog
from whop_autocancel.clock import Clock
from whop_autocancel.db.engine import Database
from whop_autocancel.errors import WhopAutocancelError
from whop_autocancel.orders.models import Order, OrderStatus
from whop_autocancel.orders.service import new_order_id
from whop_autocancel.orders.states import transition
from whop_autocancel.whop.client import WhopClient

log = structlog.get_logger(__name__)


class CheckoutError(WhopAutocancelError):
    def __init__(self, http_status: int, message: str, order_id: str | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.order_id = order_id


@dataclass(frozen=True)
class Checkout:
    order_id: str
    purchase_url: str
    checkout_configuration_id: str


# What `GET /api/checkouts/{id}` shows instead of `delivery_failed` while the order only waits
# for its stock pool to be refilled (it is delivered as soon as an item is imported).
WAITING_FOR_STOCK = "waiting_for_stock"


@dataclass(frozen=True)
class CheckoutStatus:
    order_id: str
    status: str
    plan_id: str | None
    purchase_url: str | None
    paid_at: datetime | None
    delivered_at: datetime | None


class CheckoutService:
    def __init__(
        self,
        database: Database,
        catalog: Catalog,
        clock: Clock,
        whop: Callable[[], WhopClient],
        *,
        redirect_url: str | None,
        company_id: str | None,
        timeout: float,
    ) -> None:
        self._database = database
        self._catalog = catalog
        self._clock = clock
        self._whop = whop
        self._redirect_url = redirect_url
        self._company_id = company_id
        self._timeout = timeout

    def create(self, plan_id: str, email: str | None) -> Checkout:
        if not self._catalog.is_listed(plan_id):
            raise CheckoutError(404, f"plan {plan_id} is not sold here")
        order_id = new_order_id()
        with self._database.transaction() as session:
            session.add(
                Order(
                    id=order_id,
                    status=OrderStatus.PENDING.value,
                    plan_id=plan_id,
                    email=email,
                    created_at=self._clock.now(),
                    order_metadata={},
                )
            )
        try:
            reply = self._whop().create_checkout_configuration(
                plan_id=plan_id,
                metadata={"order_id": order_id},
                redirect_url=self._redirect_url,
                company_id=self._company_id,
                timeout=self._timeout,
            )
        except Exception:
            self._abandon(order_id, "the Whop call raised")
            raise
        body = reply.body if isinstance(reply.body, dict) else {}
        configuration_id, purchase_url = body.get("id"), body.get("purchase_url")
        if not (reply.ok and isinstance(configuration_id, str) and isinstance(purchase_url, str)):
            error = reply.describe() if not reply.ok else f"{reply.describe()}, no checkout in it"
            log.error("checkout_whop_failed", order_id=order_id, plan_id=plan_id, error=error)
            self._abandon(order_id, f"Whop did not create its checkout: {error}")
            raise CheckoutError(503, "Whop is not reachable right now; please try again", order_id)
        with self._database.transaction() as session:
            order = session.get(Order, order_id)
            assert order is not None
            order.checkout_configuration_id = configuration_id
            order.order_metadata = {"purchase_url": purchase_url}
        log.info(
            "checkout_created",
            order_id=order_id,
            plan_id=plan_id,
            checkout_configuration_id=configuration_id,
        )
        return Checkout(order_id, purchase_url, configuration_id)

    def _abandon(self, order_id: str, reason: str) -> None:
        """Close the order whose checkout Whop did not create: nobody holds a link to pay it,
        so only a payment naming it (its metadata order id) may ever reach it again."""
        with self._database.transaction() as session:
            order = session.get(Order, order_id, with_for_update=True)
            if order is not None:
                transition(order, OrderStatus.ABANDONED, reason)

    def status(self, order_id: str) -> CheckoutStatus | None:
        with self._database.transaction() as session:
            order = session.get(Order, order_id)
            if order is None:
                return None
            purchase_url = (order.order_metadata or {}).get("purchase_url")
            waiting = order.status == OrderStatus.DELIVERY_FAILED.value and order.waiting_for_stock
            return CheckoutStatus(
                order_id=order.id,
                status=WAITING_FOR_STOCK if waiting else order.status,
                plan_id=order.plan_id,
                purchase_url=purchase_url if isinstance(purchase_url, str) else None,
                paid_at=order.paid_at,
                delivered_at=order.delivered_at,
            )
