"""`whop-autocancel recover`: purchases made before the service started watching Whop are
delivered only on an admin's word, dry run first (DESIGN §5, "Install time").

The survey lists every payment created between `--since` and the install time that we do not
know, and says what would happen to it: a paid, unrefunded, one-time payment of a listed plan
would be applied exactly as the Whop sweep applies one (`OrderService.apply_payment`: delivery,
then cancellation); anything else is skipped with its reason. Applying it changes only those.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from whop_autocancel.catalog import Catalog
from whop_autocancel.clock import Clock, format_utc
from whop_autocancel.db.engine import Database
from whop_autocancel.db.install import watching_since
from whop_autocancel.errors import WhopAutocancelError
from whop_autocancel.orders.models import Order
from whop_autocancel.orders.service import ONE_TIME, OrderService, order_of_recorded_payment
from whop_autocancel.reconcile.whop_pages import PAGE_SIZE, ListingStopped, whop_items
from whop_autocancel.reconcile.whop_sweep import SkippedPayment, payment_refusal
from whop_autocancel.whop.client import WhopClient, WhopReply
from whop_autocancel.whop.payloads import EventDataError, PaymentFacts, payment_facts

log = structlog.get_logger(__name__)
MAX_PAGES = 100


class RecoverRefused(WhopAutocancelError):
    """Nothing to recover from: the window is empty or the service is not configured for it."""


@dataclass(frozen=True)
class RecoverablePayment:
    """A purchase the survey would apply: its facts, and what applying it would do."""

    facts: PaymentFacts
    plan_name: str
    delivery: str  # the plan's delivery method: message, stock:<pool>, none
    cancels: bool  # whether the membership is cancelled after delivery
    note: str | None = None  # e.g. "record only": an earlier backfill cancelled its membership


@dataclass
class RecoverySurvey:
    since: datetime
    until: datetime  # the install time
    payments_seen: int = 0
    recoverable: list[RecoverablePayment] = field(default_factory=list)
    skipped: list[SkippedPayment] = field(default_factory=list)


class Recovery:
    def __init__(
        self,
        database: Database,
        catalog: Catalog,
        orders: OrderService,
        clock: Clock,
        whop: Callable[[], WhopClient],
        *,
        owner: str,
        company_id: str | None,
        versioned: bool,
    ) -> None:
        self._database = database
        self._catalog = catalog
        self._orders = orders
        self._clock = clock
        self._whop = whop
        self._owner = owner
        self._company_id = company_id
        self._versioned = versioned

    def survey(self, since: datetime) -> RecoverySurvey:
        """What `apply` would do with the payments created from `since` to the install time.
        Changes nothing."""
        until = self._database.run(watching_since)
        if until is None:
            raise RecoverRefused(
                "the service has not started watching Whop yet (`whop-autocancel migrate` or "
                "the first start records it): there is no install time to recover up to"
            )
        if since >= until:
            raise RecoverRefused(
                f"--since {format_utc(since)} is not before the service started watching "
                f"({format_utc(until)}): purchases since then are the Whop sweep's"
            )
        if not self._versioned and self._company_id is None:
            raise RecoverRefused("set WHOP_COMPANY_ID: Whop's payment list needs it")
        survey = RecoverySurvey(since=since, until=until)

        def page(client: WhopClient, after: str | None) -> WhopReply:
            return client.list_payments(
                company_id=self._company_id,
                first=PAGE_SIZE,
                after=after,
                created_after=since,
                created_before=until,
            )

        try:
            for item in whop_items(
                self._database,
                self._clock,
                self._whop(),
                page,
                max_pages=MAX_PAGES,
            ):
                survey.payments_seen += 1
                try:
                    facts = payment_facts(item)
                except EventDataError as error:
                    survey.skipped.append(
                        SkippedPayment(str(item.get("id") or "?"), f"unreadable: {error}")
                    )
                    continue
                if not _created_within(facts, since, until):
                    continue  # outside the window whatever Whop's filter did
                verdict = payment_refusal(item, facts) or self._database.run(
                    partial(self._judge, facts=facts)
                )
                if isinstance(verdict, RecoverablePayment):
                    survey.recoverable.append(verdict)
                else:
                    survey.skipped.append(SkippedPayment(facts.payment_id, verdict))
        except ListingStopped as stop:
            hint = ": use a later --since" if str(stop).startswith("more than") else ""
            raise WhopAutocancelError(f"listing payments stopped: {stop}{hint}") from None
        return survey

    def _judge(self, session: Session, *, facts: PaymentFacts) -> RecoverablePayment | str:
        """What recovering this payment would do, or why it is not recovered."""
        known = order_of_recorded_payment(session, facts.payment_id)
        if known is not None:
            return f"already recorded (order {known})"
        plan = self._catalog.get(facts.plan_id)
        if plan is None:
            return f"plan {facts.plan_id} is not listed in the catalog"
        if facts.billing_reason != ONE_TIME:
            return f"billing reason {facts.billing_reason!r} is not a one-time purchase"
        note = None
        if facts.membership_id is not None:
            for order in session.scalars(
                select(Order).where(Order.whop_membership_id == facts.membership_id)
            ):
                if (order.order_metadata or {}).get("backfill"):
                    note = (
                        f"record only: backfill cancelled its membership (order {order.id}); "
                        "not delivered"
                    )
        return RecoverablePayment(
            facts=facts, plan_name=plan.name, delivery=plan.delivery, cancels=plan.cancel, note=note
        )

    def apply(self, survey: RecoverySurvey) -> list[str]:
        """Apply the survey's recoverable payments as the Whop sweep would; returns the ids
        of those applied now (one recorded since the survey is left alone)."""
        now = self._clock.now()
        applied: list[str] = []
        for payment in survey.recoverable:
            facts = payment.facts
            order_id = self._database.run(partial(self._apply, facts=facts, now=now))
            if order_id is not None:
                applied.append(facts.payment_id)
                log.warning(
                    "purchase_recovered",
                    order_id=order_id,
                    payment_id=facts.payment_id,
                    membership_id=facts.membership_id,
                    plan_id=facts.plan_id,
                    created_at=facts.created_at.isoformat() if facts.created_at else None,
                )
        return applied

    def _apply(self, session: Session, *, facts: PaymentFacts, now: datetime) -> str | None:
        """The id of the order the payment was applied to; None: it was recorded already."""
        if order_of_recorded_payment(session, facts.payment_id) is not None:
            return None
        return self._orders.apply_payment(session, facts, now).id


def _created_within(facts: PaymentFacts, since: datetime, until: datetime) -> bool:
    return facts.created_at is not None and since <= facts.created_at < until
