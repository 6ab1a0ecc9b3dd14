"""The Whop sweep (DESIGN §5): Whop gives up on a webhook after three retries, so the service
asks Whop itself, on a schedule, under a database lease:

(a) missed webhooks — payments created since the last sweep (with an overlap) that we do not
    know are applied exactly as their webhook would have been. Known: an order records it, or
    its `payment.succeeded` webhook is stored, applied or not (under a backlog the worker
    applies it minutes after it came: it was not missed, and no alert says so);
(b) live memberships — memberships of listed one-time plans that Whop still shows live (any
    status but `canceled`/`expired`; a live one-time membership is `completed`) although our
    cancellation finished are cancelled again; a delivered order with no cancellation gets one.

Install time: the sweep never reaches back before the service started watching (less the
overlap, for a payment created just before and paid just after it), and never applies a
payment paid before it: those are `recover`'s, on an admin's word. Nor does it apply a payment
that is not `paid` or has any refunded amount: it is skipped, logged and reported.

Every call respects the API key's shared "not before" time after a 429 (`whop_pages`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from whop_autocancel.alerts.models import AlertKind
from whop_autocancel.alerts.service import AlertContent, Alerts
from whop_autocancel.cancellation.models import CANCEL_TASK, Cancellation
from whop_autocancel.cancellation.service import CancellationService, schedule_cancellation
from whop_autocancel.catalog import Catalog
from whop_autocancel.clock import Clock
from whop_autocancel.db import leases
from whop_autocancel.db.engine import Database
from whop_autocancel.db.install import record_watching_since, watching_since
from whop_autocancel.jobs import Jobs
from whop_autocancel.orders.models import Order, OrderStatus
from whop_autocancel.orders.service import ONE_TIME, OrderService, recorded_payments
from whop_autocancel.reconcile.whop_pages import (
    PAGE_SIZE,
    ListingStopped,
    PageFetch,
    whop_items,
    whop_pages,
)
from whop_autocancel.webhooks.inbox import stored_payment_webhooks
from whop_autocancel.whop.client import WhopClient, WhopReply
from whop_autocancel.whop.outcomes import INACTIVE_STATUSES
from whop_autocancel.whop.payloads import EventDataError, PaymentFacts, payment_facts

log = structlog.get_logger(__name__)

WHOP_SWEEP_LEASE = "sweep:whop"
PAYMENTS_WATERMARK = "sweep:whop:payments"
MAX_PAGES = 100
# Substatuses (Whop's FriendlyReceiptStatus) of a payment whose money went back, in part or all.
REFUNDED_SUBSTATUSES = frozenset({"refunded", "partially_refunded", "auto_refunded"})


@dataclass(frozen=True)
class SkippedPayment:
    """A payment the sweep (or `recover`) listed and did not apply, and why."""

    payment_id: str
    reason: str


@dataclass
class WhopSweepReport:
    ran: bool
    dry_run: bool = False
    payments_seen: int = 0
    recovered_payments: list[str] = field(default_factory=list)
    skipped_payments: list[SkippedPayment] = field(default_factory=list)
    memberships_seen: int = 0
    recancelled: list[str] = field(default_factory=list)
    stopped: str | None = None
    watching_since: datetime | None = None


def payment_refusal(item: dict[str, Any], facts: PaymentFacts) -> str | None:
    """Why a listed payment must not be delivered whatever else holds: it is not `paid`, or
    any of it was refunded (a refunded payment keeps `status = paid` at Whop)."""
    if item.get("status") != "paid":
        return f"status {item.get('status')!r}, not paid"
    if facts.refunded_amount is not None:
        return f"refunded {facts.refunded_amount} {facts.currency or ''}".rstrip()
    substatus = item.get("substatus")
    if substatus in REFUNDED_SUBSTATUSES:
        return f"substatus {substatus}"
    return None


class WhopSweep:
    def __init__(
        self,
        database: Database,
        catalog: Catalog,
        orders: OrderService,
        cancellations: CancellationService,
        jobs: Jobs,
        alerts: Alerts,
        clock: Clock,
        whop: Callable[[], WhopClient],
        *,
        owner: str,
        interval: float,
        lookback: float,
        overlap: float,
        company_id: str | None,
        versioned: bool,
    ) -> None:
        self._database = database
        self._catalog = catalog
        self._orders = orders
        self._cancellations = cancellations
        self._jobs = jobs
        self._alerts = alerts
        self._clock = clock
        self._whop = whop
        self._owner = owner
        self._interval = interval
        self._lookback = lookback
        self._overlap = overlap
        self._company_id = company_id
        self._versioned = versioned

    def run(self, *, force: bool = False, dry_run: bool = False) -> WhopSweepReport:
        """One sweep; skipped when another worker holds this interval's lease (unless `force`).
        `dry_run` reports what it would do and changes nothing."""
        now = self._clock.now()
        if not (force or dry_run) and not self._database.run(
            lambda s: leases.try_acquire(
                s, WHOP_SWEEP_LEASE, self._owner, now, self._interval * 0.9
            )
        ):
            return WhopSweepReport(ran=False)
        report = WhopSweepReport(ran=True, dry_run=dry_run)
        if not self._versioned and self._company_id is None:
            report.stopped = "WHOP_COMPANY_ID is not set: Whop's lists need it"
            log.error("whop_sweep_not_configured", reason=report.stopped)
            return report
        report.watching_since = self._watching_since(now, dry_run)
        try:
            self._missed_payments(now, report)
            self._live_memberships(now, report)
        except ListingStopped as stop:
            report.stopped = str(stop)
            log.warning("whop_sweep_stopped", reason=report.stopped)
        log.info(
            "whop_sweep",
            dry_run=dry_run,
            payments_seen=report.payments_seen,
            recovered=len(report.recovered_payments),
            skipped=len(report.skipped_payments),
            memberships_seen=report.memberships_seen,
            recancelled=len(report.recancelled),
        )
        return report

    def _watching_since(self, now: datetime, dry_run: bool) -> datetime:
        """The install time. A database older than it has none: the first sweep records now
        (a dry run only assumes it), so an upgrade does not deliver the past either."""
        found = self._database.run(watching_since)
        if found is not None:
            return found
        if dry_run:
            return now
        kept = self._database.run(lambda session: record_watching_since(session, now))
        log.warning("watching_since_recorded", at=kept.isoformat(), by="whop_sweep")
        return kept

    def _floor(self, report: WhopSweepReport) -> datetime:
        """The earliest creation time any listing of this sweep asks for."""
        assert report.watching_since is not None
        return report.watching_since - timedelta(seconds=self._overlap)

    # (a) payments whose webhook never came -----------------------------------------------------

    def _missed_payments(self, now: datetime, report: WhopSweepReport) -> None:
        watermark = self._database.run(lambda s: leases.read_until(s, PAYMENTS_WATERMARK))
        since = max(
            (watermark or now - timedelta(seconds=self._lookback))
            - timedelta(seconds=self._overlap),
            self._floor(report),
        )
        for page in self._page_lists(
            lambda client, after: client.list_payments(
                company_id=self._company_id, first=PAGE_SIZE, after=after, created_after=since
            )
        ):
            readable: list[tuple[dict[str, Any], PaymentFacts]] = []
            for item in page:
                report.payments_seen += 1
                try:
                    readable.append((item, payment_facts(item)))
                except EventDataError as error:
                    log.warning("whop_sweep_unreadable_payment", error=str(error))
                    report.skipped_payments.append(
                        SkippedPayment(str(item.get("id") or "?"), f"unreadable: {error}")
                    )
            known = self._known_payments([facts.payment_id for _, facts in readable])
            for item, facts in readable:
                if facts.payment_id in known:
                    continue
                known.add(facts.payment_id)  # (listed twice, it is handled once)
                self._missed_payment(item, facts, now, report)
        if report.dry_run:
            return
        self._database.run(lambda s: leases.extend_until(s, PAYMENTS_WATERMARK, self._owner, now))
        if report.recovered_payments:
            self._alert_recovered(now, report.recovered_payments)

    def _missed_payment(
        self, item: dict[str, Any], facts: PaymentFacts, now: datetime, report: WhopSweepReport
    ) -> None:
        """A listed payment the service does not know: skipped with its reason, or applied."""
        reason = payment_refusal(item, facts) or self._before_watching(facts, report)
        if reason is not None:
            report.skipped_payments.append(SkippedPayment(facts.payment_id, reason))
            # An unpaid one (an abandoned checkout) is routine; a refund or the past is not.
            (log.info if item.get("status") != "paid" else log.warning)(
                "whop_sweep_payment_skipped",
                payment_id=facts.payment_id,
                plan_id=facts.plan_id,
                reason=reason,
                dry_run=report.dry_run,
            )
            return
        report.recovered_payments.append(facts.payment_id)
        if not report.dry_run:
            order_id = self._database.run(partial(self._apply, facts=facts, now=now))
            log.warning(
                "missed_webhook_recovered",
                order_id=order_id,
                payment_id=facts.payment_id,
                membership_id=facts.membership_id,
                plan_id=facts.plan_id,
            )

    @staticmethod
    def _before_watching(facts: PaymentFacts, report: WhopSweepReport) -> str | None:
        """A payment paid before the install is not the sweep's (a payment created just before
        it but paid after it is: its buyer bought while the service watched)."""
        assert report.watching_since is not None
        paid = facts.paid_at or facts.created_at
        if paid is not None and paid >= report.watching_since:
            return None
        when = paid.isoformat() if paid is not None else "at an unknown time"
        return (
            f"paid {when}, before the service started watching "
            f"({report.watching_since.isoformat()}): `whop-autocancel recover` can deliver it"
        )

    def _apply(self, session: Session, *, facts: PaymentFacts, now: datetime) -> str:
        return self._orders.apply_payment(session, facts, now).id

    def _known_payments(self, payment_ids: list[str]) -> set[str]:
        """Those of a page's payments that an order records, or whose `payment.succeeded`
        webhook is stored (applied or not: under a backlog the worker applies it minutes after
        it came, and it was not missed). One read for the page (after a flash sale every sweep
        lists thousands), which on SQLite does not wait for the write turn that a sale's
        webhooks keep busy."""

        def known(session: Session) -> set[str]:
            recorded = recorded_payments(session, payment_ids)
            rest = [payment_id for payment_id in payment_ids if payment_id not in recorded]
            return recorded | stored_payment_webhooks(session, rest)

        return self._database.read(known)

    def _alert_recovered(self, now: datetime, payment_ids: list[str]) -> None:
        shown = ", ".join(payment_ids[:20]) + (" …" if len(payment_ids) > 20 else "")

        def raise_alert(session: Any) -> None:
            self._alerts.raise_once(
                session,
                AlertKind.MISSED_WEBHOOKS_RECOVERED,
                f"missed_webhooks_recovered:{now.isoformat()}",
                AlertContent(
                    subject=f"{len(payment_ids)} purchase(s) recovered whose webhook never came",
                    summary=(
                        "Whop did not deliver the payment webhook of these purchases (it gives up "
                        "after three retries). The sweep found them through Whop's API and "
                        "handled them as usual: delivery and cancellation follow."
                    ),
                    details=[("Payments", shown)],
                    steps=[
                        "Nothing to do for these purchases.",
                        "If this repeats, check that Whop can reach /webhooks/whop (Whop "
                        "disables a webhook whose deliveries fail for three days).",
                    ],
                ),
                now,
            )

        self._database.run(raise_alert)

    # (b) memberships that are still live ------------------------------------------------------

    def _live_memberships(self, now: datetime, report: WhopSweepReport) -> None:
        since = max(now - timedelta(seconds=self._lookback), self._floor(report))
        for plan in self._catalog.plans.values():
            if not plan.cancel:
                continue
            listed_from = self._clock.now()  # every page below is read after this
            for item in self._pages(
                partial(self._membership_page, plan_id=plan.plan_id, since=since)
            ):
                report.memberships_seen += 1
                membership_id, status = item.get("id"), item.get("status")
                if not isinstance(membership_id, str) or status in INACTIVE_STATUSES:
                    continue
                if self._cancel_again(
                    membership_id, str(status), now, report.dry_run, listed_from=listed_from
                ):
                    report.recancelled.append(membership_id)

    def _membership_page(
        self, client: WhopClient, after: str | None, *, plan_id: str, since: datetime
    ) -> WhopReply:
        return client.list_memberships(
            company_id=self._company_id,
            first=PAGE_SIZE,
            after=after,
            plan_id=plan_id,
            created_after=since,
        )

    def _cancel_again(
        self,
        membership_id: str,
        status: str,
        now: datetime,
        dry_run: bool,
        *,
        listed_from: datetime,
    ) -> bool:
        """Whether our delivered one-time order of this live membership needs cancelling. A
        cancellation that ended while the listing was being read is left alone: the page may
        be older than our cancel (the next sweep looks again)."""

        def decide(session: Any) -> bool:
            order = session.scalars(
                select(Order).where(
                    Order.whop_membership_id == membership_id,
                    Order.status == OrderStatus.DELIVERED.value,
                    Order.billing_reason == ONE_TIME,
                )
            ).first()
            if order is None:
                return False  # not ours (or not delivered): `backfill` is for those
            row = session.scalars(
                select(Cancellation).where(Cancellation.order_id == order.id)
            ).first()
            if row is None:
                if not dry_run:
                    created = schedule_cancellation(session, order, now, now)
                    if created is not None:
                        self._jobs.defer(session, CANCEL_TASK, created.id)
                return True
            if row.status not in ("canceled", "already_inactive"):
                return False  # still in progress, or failed and already alerted
            if row.updated_at >= listed_from:
                return False  # ended after the listing began: "live" may predate it
            if dry_run:
                return True
            return self._cancellations.reopen(
                session, row.id, f"Whop still shows the membership '{status}'; cancelling again"
            )

        return self._database.run(decide)

    # Paging -----------------------------------------------------------------------------------

    def _pages(self, fetch: PageFetch) -> Iterator[dict[str, Any]]:
        """Raises ListingStopped (the sweep ends, keeping what it did; the next one goes on)."""
        return whop_items(self._database, self._clock, self._whop(), fetch, max_pages=MAX_PAGES)

    def _page_lists(self, fetch: PageFetch) -> Iterator[list[dict[str, Any]]]:
        """`_pages`, a page at a time."""
        return whop_pages(self._database, self._clock, self._whop(), fetch, max_pages=MAX_PAGES)
