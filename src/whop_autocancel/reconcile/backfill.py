"""Onboarding backfill: cancel the live memberships of a listed one-time plan that were sold
before the service started watching Whop. Each is recorded like any other cancellation (an
order marked `backfill` in its metadata, a cancellation row, the same state machine and alerts).

It acts only on a membership that (a) was created before the install time, (b) is of the
requested plan — read from the membership itself, Whop's filter is not trusted — and (c)
belongs to no order we know, whatever its status (a buyer waiting for stock, or a purchase
whose webhook was dropped, has nothing yet). Everything else Whop returns is reported as
skipped, with the reason, and left alone. A membership of an earlier backfill's own order is
still backfill's: one Whop shows live again is cancelled again."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from whop_autocancel.cancellation.models import Cancellation, CancellationStatus
from whop_autocancel.cancellation.service import CancellationService, schedule_cancellation
from whop_autocancel.catalog import Catalog
from whop_autocancel.clock import Clock, parse_timestamp
from whop_autocancel.db.engine import Database
from whop_autocancel.db.install import watching_since
from whop_autocancel.errors import WhopAutocancelError
from whop_autocancel.orders.models import Order, OrderStatus
from whop_autocancel.orders.service import ONE_TIME, new_order_id
from whop_autocancel.reconcile.whop_pages import PAGE_SIZE, ListingStopped, whop_items
from whop_autocancel.whop.client import WhopClient, WhopReply
from whop_autocancel.whop.outcomes import INACTIVE_STATUSES
from whop_autocancel.whop.payloads import EventDataError, membership_facts

log = structlog.get_logger(__name__)
MAX_PAGES = 200


class BackfillRefused(WhopAutocancelError):
    """The plan must not be backfilled (not listed, delivery-only, or a subscription), or the
    service has not started watching yet."""


@dataclass(frozen=True)
class LiveMembership:
    membership_id: str
    status: str
    email: str | None
    user_id: str | None
    created_at: str | None
    plan_id: str | None

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> LiveMembership | None:
        """A membership from Whop's list, in either shape; None unless it still grants access."""
        membership_id, status = item.get("id"), item.get("status")
        if not isinstance(membership_id, str) or not membership_id or status in INACTIVE_STATUSES:
            return None
        try:
            facts = membership_facts(item)
        except EventDataError:
            return None
        created = item.get("created_at")
        return cls(
            membership_id=membership_id,
            status=str(status),
            email=facts.email,
            user_id=facts.user_id,
            created_at=None if created is None else str(created),
            plan_id=facts.plan_id,
        )


@dataclass(frozen=True)
class SkippedMembership:
    membership: LiveMembership
    reason: str


@dataclass
class BackfillSurvey:
    """What Whop returned for a plan, split into what backfill will cancel and what not."""

    plan_id: str
    watching_since: datetime
    to_cancel: list[LiveMembership] = field(default_factory=list)
    skipped: list[SkippedMembership] = field(default_factory=list)


def whop_side_reason(membership: LiveMembership, plan_id: str, since: datetime) -> str | None:
    """Why backfill must leave this membership alone, judging by what Whop says of it alone
    (its plan and creation time); None if it may go on to the check against our orders."""
    if membership.plan_id is None:
        return "the membership names no plan"
    if membership.plan_id != plan_id:
        return f"of plan {membership.plan_id}, not {plan_id} (Whop's list ignored the filter)"
    if membership.created_at is None:
        return "no created_at: cannot tell whether it was sold before the service"
    try:
        created = parse_timestamp(membership.created_at)
    except (ValueError, OverflowError, OSError):
        created = None
    if created is None:
        return f"unreadable created_at {membership.created_at!r}"
    if created >= since:
        return (
            f"created after the service started watching ({since.isoformat()}): the service "
            "handles its purchase"
        )
    return None


class Backfill:
    def __init__(
        self,
        database: Database,
        catalog: Catalog,
        cancellations: CancellationService,
        clock: Clock,
        whop: Callable[[], WhopClient],
        *,
        owner: str,
        company_id: str | None,
        versioned: bool,
    ) -> None:
        self._database = database
        self._catalog = catalog
        self._cancellations = cancellations
        self._clock = clock
        self._whop = whop
        self._owner = owner
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

    def survey(self, plan_id: str, since: datetime | None) -> BackfillSurvey:
        """Every membership of the plan that still grants access at Whop (created after
        `since`, if given), each judged: to cancel, or skipped with its reason."""
        installed = self._database.run(watching_since)
        if installed is None:
            raise BackfillRefused(
                "the service has not started watching Whop yet: run `whop-autocancel migrate` "
                "(or start it) first, so backfill knows which memberships predate it"
            )
        survey = BackfillSurvey(plan_id=plan_id, watching_since=installed)
        for membership in self._live(plan_id, since):
            reason = whop_side_reason(membership, plan_id, installed) or self._database.run(
                partial(_order_reason, membership_id=membership.membership_id)
            )
            if reason is None:
                survey.to_cancel.append(membership)
            else:
                survey.skipped.append(SkippedMembership(membership, reason))
                log.info(
                    "backfill_skipped",
                    membership_id=membership.membership_id,
                    plan_id=membership.plan_id,
                    reason=reason,
                )
        return survey

    def _live(self, plan_id: str, since: datetime | None) -> Iterator[LiveMembership]:
        def page(client: WhopClient, after: str | None) -> WhopReply:
            return client.list_memberships(
                company_id=self._company_id,
                first=PAGE_SIZE,
                after=after,
                plan_id=plan_id,
                created_after=since,
            )

        try:
            for item in whop_items(
                self._database,
                self._clock,
                self._whop(),
                page,
                max_pages=MAX_PAGES,
            ):
                membership = LiveMembership.from_item(item)
                if membership is not None:
                    yield membership
        except ListingStopped as stop:
            hint = ": use --since" if str(stop).startswith("more than") else ""
            raise WhopAutocancelError(f"listing memberships stopped: {stop}{hint}") from None

    def cancel(self, plan_id: str, membership: LiveMembership) -> str:
        """Record and cancel one membership the survey put `to_cancel`; returns the
        cancellation's status (`skipped` if an order of ours took the membership meanwhile)."""
        now = self._clock.now()

        def prepare(session: Session) -> int | None:
            if _order_reason(session, membership.membership_id) is not None:
                return None  # a purchase of ours since the survey: it is not backfill's
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
                order_id=row.order_id,
                status=row.status,
            )
            return row.status


def _order_reason(session: Session, membership_id: str) -> str | None:
    """Why an order we know keeps backfill off this membership: any order of it, whatever its
    status, except an earlier backfill's own."""
    for order in session.scalars(
        select(Order).where(Order.whop_membership_id == membership_id).order_by(Order.created_at)
    ):
        if (order.order_metadata or {}).get("backfill"):
            continue
        pool = order.waiting_for_stock
        waiting = f", waiting for stock {pool}" if pool else ""
        return (
            f"belongs to order {order.id} ({order.status}{waiting}): the service cancels the "
            "membership of its own orders after delivery"
        )
    return None
