"""The checkout API's logic (DESIGN §5): a pending order plus a Whop checkout configuration whose
metadata names it. The one synchronous Whop call in the service (DESIGN §3): short timeout, and
Whop unreachable means 503 with the order left `pending`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import structlog

from whop_autocancel.clock import Clock
from whop_autocancel.db.engine import Database
from whop_autocancel.delivery.catalog import Catalog
from whop_autocancel.errors import WhopAutocancelError
from whop_autocancel.orders.models import Order, OrderStatus
from whop_autocancel.orders.service import new_order_id
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
        reply = self._whop().create_checkout_configuration(
            plan_id=plan_id,
            metadata={"order_id": order_id},
            redirect_url=self._redirect_url,
            company_id=self._company_id,
            timeout=self._timeout,
        )
        body = reply.body if isinstance(reply.body, dict) else {}
        configuration_id, purchase_url = body.get("id"), body.get("purchase_url")
        if not (reply.ok and isinstance(configuration_id, str) and isinstance(purchase_url, str)):
            log.error(
                "checkout_whop_failed", order_id=order_id, plan_id=plan_id, error=reply.describe()
            )
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

    def status(self, order_id: str) -> CheckoutStatus | None:
        with self._database.transaction() as session:
            order = session.get(Order, order_id)
            if order is None:
                return None
            purchase_url = (order.order_metadata or {}).get("purchase_url")
            return CheckoutStatus(
                order_id=order.id,
                status=order.status,
                plan_id=order.plan_id,
                purchase_url=purchase_url if isinstance(purchase_url, str) else None,
                paid_at=order.paid_at,
                delivered_at=order.delivered_at,
            )
