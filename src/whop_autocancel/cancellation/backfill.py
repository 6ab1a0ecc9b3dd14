"""Onboarding backfill: cancel the live memberships of a listed one-time plan that were sold
before the service was installed. Each is recorded like any other cancellation (an order marked
`backfill` in its metadata, a cancellation row, the same state machine and alerts)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from whop_autocancel.cancellation.models import Cancellation, CancellationStatus
from whop_autocancel.cancellation.service import CancellationService, schedule_cancellation
from whop_autocancel.clock import Clock
from whop_autocancel.db.engine import Database
from whop_autocancel.delivery.catalog import Catalog
from whop_autocancel.errors import WhopAutocancelError
from whop_autocancel.orders.models import Order, OrderStatus
from whop_autocancel.orders.service import ONE_TIME, new_order_id
from whop_autocancel.whop.client import WhopClient
from whop_autocancel.whop.outcomes import INACTIVE_STATUSES

log = structlog.get_logger(__name__)
MAX_PAGES = 200


class BackfillRefused(WhopAutocancelError):
    """The plan must not be backfilled (not listed, delivery-only, or a subscription)."""


@dataclass(frozen=True)
class LiveMembership:
    membership_id: str
    status: str
    email: str | None
    user_id: str | None
    created_at: str | None


class Backfill:
    def __init__(
        self,
        database: Database,
        catalog: Catalog,
        cancellations: CancellationService,
        clock: Clock,
        whop: Callable[[], WhopClient],
        *,
        company_id: str | None,
        versioned: bool,
    ) -> None:
        self._database = database
        self._catalog = catalog
        self._cancellations = cancellations
        self._clock = clock
        self._whop = whop
        self._company_id = company_id
        self._versioned = versioned

    def check_plan(self, plan_id: str) -> None:
        """Refuse anything the safety rule (DESIGN §1) would never cancel."""
        plan = self._catalog.get(plan_id)
        if plan is None:
            raise BackfillRefused(f"plan {plan_id} is not listed in the catalog")
        if not plan.cancel:
            raise BackfillRefused(f"plan {plan_id} is delivery-only (cancel = false)")
        if not self._versioned and self._company_id is None:
            raise BackfillRefused("set WHOP_COMPANY_ID: Whop's membership list needs it")
        reply = self._whop().retrieve_plan(plan_id)
        if not reply.ok or not isinstance(reply.body, dict):
            raise BackfillRefused(f"cannot read plan {plan_id} from Whop: {reply.describe()}")
        if reply.body.get("plan_type") != ONE_TIME:
            raise BackfillRefused(
                f"plan {plan_id} is {reply.body.get('plan_type')!r}, not one_time: its "
                "memberships are never cancelled"
            )

    def live_memberships(self, plan_id: str, since: datetime | None) -> list[LiveMembership]:
        """Every membership of the plan that still grants access at Whop."""
        return list(self._live(plan_id, since))

    def _live(self, plan_id: str, since: datetime | None) -> Iterator[LiveMembership]:
        client = self._whop()
        cursor: str | None = None
        for _ in range(MAX_PAGES):
            page = client.list_memberships(
                company_id=self._company_id,
                first=100,
                after=cursor,
                plan_id=plan_id,
                created_after=since,
            )
            if not page.ok:
                raise WhopAutocancelError(f"listing memberships failed: {page.describe()}")
            for item in page.items:
                status, membership_id = item.get("status"), item.get("id")
                if not isinstance(membership_id, str) or status in INACTIVE_STATUSES:
                    continue
                user = item.get("user") if isinstance(item.get("user"), dict) else {}
                yield LiveMembership(
                    membership_id=membership_id,
                    status=str(status),
                    email=(user or {}).get("email") or item.get("email"),
                    user_id=(user or {}).get("id") or item.get("user_id"),
                    created_at=item.get("created_at"),
                )
            cursor = page.next_cursor
            if cursor is None:
                return
        raise WhopAutocancelError(f"more than {MAX_PAGES} pages of memberships: use --since")

    def cancel(self, plan_id: str, membership: LiveMembership) -> str:
        """Record and cancel one membership now; returns the cancellation's status."""
        now = self._clock.now()

        def prepare(session: Session) -> int | None:
            order = session.scalars(
                select(Order).where(Order.whop_membership_id == membership.membership_id)
            ).first()
            if order is None:
                order = Order(
                    id=new_order_id(),
                    status=OrderStatus.DELIVERED.value,
                    plan_id=plan_id,
                    whop_membership_id=membership.membership_id,
                    whop_user_id=membership.user_id,
                    email=membership.email,
                    billing_reason=ONE_TIME,
                    created_at=now,
                    delivered_at=now,
                    delivery_method="backfill",
                    order_metadata={
                        "backfill": True,
                        "membership_created_at": membership.created_at,
                    },
                )
                session.add(order)
                session.flush()
            row = session.scalars(
                select(Cancellation).where(Cancellation.order_id == order.id)
            ).first()
            if row is None:
                created = schedule_cancellation(session, order, now, now)
                return created.id if created else None
            if row.status in (
                CancellationStatus.CANCELED.value,
                CancellationStatus.ALREADY_INACTIVE.value,
            ):
                reopened = self._cancellations.reopen(
                    session, row.id, "backfill: the membership is still live at Whop"
                )
                return row.id if reopened else None
            return row.id

        cancellation_id = self._database.run(prepare)
        if cancellation_id is None:
            return "skipped"
        self._cancellations.run(cancellation_id)
        with self._database.transaction() as session:
            row = session.get(Cancellation, cancellation_id)
            assert row is not None
            log.info(
                "backfill_cancelled",
                membership_id=membership.membership_id,
                cancellation_id=row.id,
                status=row.status,
            )
            return row.status
