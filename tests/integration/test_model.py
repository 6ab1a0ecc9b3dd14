"""A model-based test of the whole purchase flow (issue 10): a Hypothesis state machine drives the
real service — the checkout API and the webhook endpoint over HTTP, the jobs through huey's own
`execute`, both sweeps, backfill — with the Whop simulator as Whop and a real SMTP server, and
checks after every step what must never happen to a buyer:

1. a membership is cancelled at Whop only if its own payment is a one-time payment of a listed
   plan with cancel = true, its order is delivered with the customer's delivery email accepted by
   the SMTP server before the cancel call (a `none` delivery has no email), and no succeeded
   refund or lost dispute of that payment had reached the service;
2. no order ever changes its payment or its membership once set, and an order's payment and
   membership are those of one purchase (a payment never joins an order bound to another
   membership);
3. no buyer receives another buyer's product: a delivery email of order X goes to the buyer of
   X's payment only, and only for a one-time purchase of a plan delivered by email;
4. nothing is delivered twice: a purchase made before the service started watching was served
   then (by hand), so the service never delivers it again.

At the end of each example the shop settles (SMTP up, claims and echoes delivered, purchase
webhooks still pending dropped, stock added, sweeps and workers run until quiet, the clock well
past every delay), and then every listed one-time purchase that was not refunded or lost in a
dispute, whose buyer's address the service can know, was delivered exactly once to its buyer and
its membership cancelled by exactly one successful call.

Steps: WA_MODEL_STEPS (default 4000) on SQLite, WA_MODEL_SERVER_STEPS (default 300) on PostgreSQL
and MariaDB; WA_MODEL_STEPS_PER_EXAMPLE (default 25: short examples found more) per example;
WA_MODEL_SEED fixes the seed (printed in the summary, with the counts).
"""

from __future__ import annotations

import math
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import pytest
from hypothesis import HealthCheck, note, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from support.harness import STOCK_PLAN, drain
from support.model import (
    BOUNCING,
    BUYERS,
    CANCEL_PLANS,
    DISPUTE_PATHS,
    ENDING,
    LISTED_PLANS,
    PLANS,
    REFUND_PATHS,
    Checkout,
    Claim,
    PendingEvent,
    Purchase,
    RunCounts,
    SinkMessage,
    World,
    claim_body,
    model_world,
    run_backfill,
)
from support.reporting import show
from whop_autocancel.orders.models import Order

RENEWAL_REASONS = ["subscription_create", "subscription_cycle"]
# Whop fails only while cancellations are young: an outage delays them, and only one that lasts
# CANCEL_GIVE_UP_AFTER (24 h) may end them `failed`.
WHOP_FAULTS_UNTIL = timedelta(hours=12)
# A buyer takes a few seconds to pay (Whop's payment is created 2 s before it is paid).
BUYING_SECONDS = 3
CLOCK_STEPS = [1, 6, 31, 61, 301, 601, 3601, 86401]
# The worker runs the Whop sweep every WHOP_SWEEP_INTERVAL; the model runs it when a rule says
# so, and never lets more time than this pass without one (the sweep looks back 3 days).
MAX_SWEEP_GAP = timedelta(days=2)
# The clock steps of the final settling (past CANCEL_DELAY, STUCK_GRACE, MEMBERSHIP_WAIT and the
# jittered retry delays), the steps after which the Whop sweep runs, and how many steps in a row
# must change nothing before it stops early.
SETTLE_CLOCK = [61, 61, 301, 61, 121, 121, 121, 121, 121, 121]
SETTLE_WHOP_SWEEPS = (0, 3)
SETTLE_QUIET_STEPS = 2
STEPS_PER_EXAMPLE = int(os.environ.get("WA_MODEL_STEPS_PER_EXAMPLE", "25"))


class Violation(AssertionError):
    """An invariant of the model does not hold."""


class ShopModel(RuleBasedStateMachine):
    world: ClassVar[World]
    counts: ClassVar[RunCounts]
    start: ClassVar[datetime]

    def __init__(self) -> None:
        super().__init__()
        self.world.reset(self.start)
        self.checkouts: list[Checkout] = []
        self.purchases: list[Purchase] = []
        self.by_payment: dict[str, Purchase] = {}
        self.by_membership: dict[str, Purchase] = {}
        self.pending: list[PendingEvent] = []
        self.bindings: dict[str, tuple[str | None, str | None]] = {}
        self.delivered: dict[str, list[SinkMessage]] = {}  # payment id -> its delivery emails
        self.cancelled: Counter[str] = Counter()  # membership id -> successful cancel calls
        self.messages_checked = 0
        self.calls_checked = 0
        self.last_whop_sweep = self.start
        self.smtp_outage = 0.0  # seconds the SMTP server has accepted nothing, so far
        self.trace: list[str] = []
        self.event_trace: list[str] = []
        self.healthy = True

    # ----- bookkeeping -----------------------------------------------------------------------

    def _step(self, name: str, text: str, event: str | None = None) -> None:
        self.counts.steps += 1
        self.counts.rules[name] += 1
        self.trace.append(name)
        self.event_trace.append(f"{name}:{event}" if event else name)
        note(f"[{len(self.trace)}] {text}")

    def _fail(self, message: str) -> NoReturn:
        self.healthy = False
        self.counts.violations.append(message.splitlines()[0])
        raise Violation(message)

    def _take_events(self) -> None:
        """Every webhook the simulator sent since the last look becomes pending for us."""
        for webhook_id, kind, body in self.world.new_events():
            about = "?"
            for purchase in self.purchases:
                if purchase.payment_id.encode() in body or purchase.membership_id.encode() in body:
                    about = purchase.name
                    break
            self.pending.append(PendingEvent(webhook_id, kind, body, about))

    def _post(self, event: PendingEvent) -> None:
        response = self.world.post_event(event.webhook_id, event.body)
        event.delivered += 1
        if response.status_code != 200:
            self._fail(
                f"the webhook endpoint answered {response.status_code} to a correctly signed "
                f"{event.label}: {response.text[:300]}"
            )
        if event.claim is not None:
            purchase, kind, status = event.claim
            if status == ENDING[kind] and purchase.ended_by is None:
                purchase.ended_by = f"{kind} {status}"

    def _purchase(self, bought: dict[str, Any], **facts: Any) -> Purchase:
        purchase = Purchase(
            number=len(self.purchases),
            payment_id=bought["payment_id"],
            membership_id=bought["membership_id"],
            **facts,
        )
        self.purchases.append(purchase)
        self.by_payment[purchase.payment_id] = purchase
        self.by_membership[purchase.membership_id] = purchase
        return purchase

    # ----- the world before the service --------------------------------------------------------

    @initialize(
        sold=st.lists(
            st.tuples(st.sampled_from(list(PLANS)), st.sampled_from(BUYERS)),
            max_size=2,
        )
    )
    def sold_before_install(self, sold: list[tuple[str, str]]) -> None:
        """Purchases made a day before the service started watching, served by hand then."""
        for plan, buyer in sold:
            self.world.clock.set(self.start - timedelta(hours=30))
            reason = "subscription_create" if PLANS[plan].renewal else "one_time"
            bought = self.world.simulator.state.create_purchase(
                plan, email=buyer, billing_reason=reason, send_webhooks=False
            )
            self.world.clock.set(self.start)
            purchase = self._purchase(
                bought,
                plan=plan,
                billing_reason=reason,
                buyer=buyer,
                email_on_payment=True,
                before_install=True,
            )
            note(f"{purchase.name}: {plan} {reason} by {buyer}, sold before install")
        self._step("before_install", f"{len(sold)} purchase(s) sold before install")

    # ----- rules --------------------------------------------------------------------------------

    @rule(
        plan=st.sampled_from(LISTED_PLANS),
        buyer=st.sampled_from(BUYERS),
        with_email=st.booleans(),
        whop_fails=st.booleans(),
    )
    def checkout(self, plan: str, buyer: str, with_email: bool, whop_fails: bool) -> None:
        """POST /api/checkouts; Whop may be down while it runs (then the request fails)."""
        state = self.world.simulator.state
        if whop_fails:
            state.set_outage(True)
        try:
            response = self.world.http.post(
                "/api/checkouts", json={"plan_id": plan, "email": buyer if with_email else None}
            )
        finally:
            if whop_fails:
                state.set_outage(False)
        body = response.json() if response.content else {}
        if not whop_fails and response.status_code != 201:
            self._fail(f"POST /api/checkouts answered {response.status_code}: {response.text}")
        made = Checkout(
            number=len(self.checkouts),
            plan=plan,
            buyer=buyer,
            email=buyer if with_email else None,
            order_id=body.get("order_id"),
            configuration_id=body.get("checkout_configuration_id")
            if response.status_code == 201
            else None,
        )
        self.checkouts.append(made)
        self._step(
            "checkout",
            f"{made.name}: checkout of {plan} by {buyer} (email given: {with_email}) -> "
            f"{response.status_code} order {made.order_id}",
        )

    @rule(
        plan=st.sampled_from(list(PLANS)),
        renewal_reason=st.sampled_from(RENEWAL_REASONS),
        buyer=st.sampled_from(BUYERS),
        with_email=st.booleans(),
        shape=st.sampled_from(["legacy", "pinned"]),
    )
    def buy(self, plan: str, renewal_reason: str, buyer: str, with_email: bool, shape: str) -> None:
        """A purchase on the plan's page at Whop; Whop tells the buyer's email or not."""
        self.world.clock.advance(BUYING_SECONDS)
        reason = renewal_reason if PLANS[plan].renewal else "one_time"
        bought = self.world.simulator.state.create_purchase(
            plan, email=buyer, email_visible=with_email, billing_reason=reason, shape=shape
        )
        self._bought(bought, plan, reason, buyer, with_email, shape, None)

    @precondition(lambda self: any(c.configuration_id for c in self.checkouts))
    @rule(
        data=st.data(),
        renewal_reason=st.sampled_from(RENEWAL_REASONS),
        with_email=st.booleans(),
        shape=st.sampled_from(["legacy", "pinned"]),
    )
    def buy_through_link(
        self, data: st.DataObject, renewal_reason: str, with_email: bool, shape: str
    ) -> None:
        """The buyer of one of our checkouts pays through its link (again, maybe: a buyer
        buying a second time with the same link)."""
        links = [c for c in self.checkouts if c.configuration_id is not None]
        link = links[data.draw(st.integers(0, len(links) - 1), label="checkout link")]
        assert link.configuration_id is not None
        self.world.clock.advance(BUYING_SECONDS)
        reason = renewal_reason if PLANS[link.plan].renewal else "one_time"
        bought = self.world.simulator.state.complete_checkout(
            link.configuration_id,
            email=link.buyer,
            email_visible=with_email,
            billing_reason=reason,
            shape=shape,
        )
        self._bought(bought, link.plan, reason, link.buyer, with_email, shape, link)

    def _bought(
        self,
        bought: dict[str, Any],
        plan: str,
        billing_reason: str,
        buyer: str,
        with_email: bool,
        shape: str,
        link: Checkout | None,
    ) -> None:
        purchase = self._purchase(
            bought,
            plan=plan,
            billing_reason=billing_reason,
            buyer=buyer,
            email_on_payment=with_email,
            checkout=link,
        )
        self._take_events()
        reuse = link is not None and any(
            p.checkout is link for p in self.purchases if p is not purchase
        )
        self._step(
            "buy_link_again" if reuse else ("buy_link" if link else "buy"),
            f"{purchase.name}: {plan} {billing_reason} by {buyer} (email on payment: "
            f"{with_email}, {shape})"
            + (f" through {link.name}" if link else "")
            + (" (reusing the link)" if reuse else "")
            + f" = {purchase.payment_id} / {purchase.membership_id}",
        )

    @precondition(lambda self: bool(self.pending))
    @rule(data=st.data(), again_later=st.booleans())
    def deliver_one(self, data: st.DataObject, again_later: bool) -> None:
        """Whop delivers one pending webhook (and, maybe, again later: a duplicate)."""
        index = data.draw(st.integers(0, len(self.pending) - 1), label="event")
        event = self.pending[index]
        if not again_later:
            self.pending.pop(index)
        self._step(
            "deliver",
            f"deliver {event.label}" + (" (it will come again)" if again_later else ""),
            event.type,
        )
        self._post(event)

    @precondition(lambda self: len(self.pending) > 1)
    @rule(data=st.data())
    def deliver_all(self, data: st.DataObject) -> None:
        """Whop delivers every pending webhook, in an order of Hypothesis's choosing."""
        order = data.draw(st.permutations(range(len(self.pending))), label="order")
        events = [self.pending[i] for i in order]
        self.pending = []
        self._step(
            "deliver_all",
            "deliver " + ", ".join(e.label for e in events),
            "+".join(e.type for e in events),
        )
        for event in events:
            self._post(event)

    @precondition(lambda self: any(e.claim is None for e in self.pending))
    @rule(data=st.data())
    def whop_gives_up(self, data: st.DataObject) -> None:
        """A webhook is never delivered (Whop dropped it after its retries)."""
        droppable = [e for e in self.pending if e.claim is None]
        event = droppable[data.draw(st.integers(0, len(droppable) - 1), label="dropped")]
        self.pending.remove(event)
        self._step("drop", f"Whop gives up on {event.label}", event.type)

    @precondition(lambda self: any(not p.before_install for p in self.purchases))
    @rule(data=st.data(), kind=st.sampled_from(["refund", "dispute"]))
    def claim(self, data: st.DataObject, kind: str) -> None:
        """A refund or dispute of a purchase, with every status it goes through as a webhook."""
        candidates = [p for p in self.purchases if not p.before_install]
        purchase = candidates[data.draw(st.integers(0, len(candidates) - 1), label="purchase")]
        paths = REFUND_PATHS if kind == "refund" else DISPUTE_PATHS
        path = data.draw(st.sampled_from(paths), label="statuses")
        prefix = "rf" if kind == "refund" else "dp"
        made = Claim(kind, f"{prefix}_{uuid.uuid4().hex[:12]}", purchase, path)
        for number, status in enumerate(path):
            webhook_id, body = claim_body(made, status, first=number == 0)
            self.pending.append(
                PendingEvent(
                    webhook_id,
                    f"{kind}.{'created' if number == 0 else 'updated'}",
                    body,
                    f"{purchase.name} {status}",
                    claim=(purchase, kind, status),
                )
            )
        self._step("claim", f"{kind} of {purchase.name}: {' -> '.join(path)}", kind)

    @rule(plan=st.sampled_from(CANCEL_PLANS))
    def backfill(self, plan: str) -> None:
        """The admin runs `backfill --plan` (after its dry run)."""
        statuses = run_backfill(self.world.runtime, plan)
        self._take_events()
        self._step("backfill", f"backfill {plan}: {statuses}")

    @rule()
    def stuck_work_sweep(self) -> None:
        report = self.world.runtime.stuck_sweep.run(force=True)
        self._step("stuck_sweep", f"stuck-work sweep: {report.total} requeued")

    @rule()
    def whop_sweep(self) -> None:
        report = self.world.runtime.whop_sweep.run(force=True)
        if report.stopped is None:
            self.last_whop_sweep = self.world.clock.now()
        self._step(
            "whop_sweep",
            f"Whop sweep: recovered {report.recovered_payments}, "
            f"recancelled {report.recancelled}, stopped {report.stopped}",
        )

    # (The rules without arguments come first in Hypothesis's order, and the first is what
    # shrinking falls back to: a worker run, the most common thing in a real shop.)
    @rule()
    def run_worker(self) -> None:
        """A worker runs what is queued now."""
        executed = drain(self.world.runtime)
        self._take_events()
        self._step("work", f"worker ran {executed} job(s)")

    @rule()
    def run_worker_with_delayed(self) -> None:
        """A worker runs what is queued and what was scheduled for later (each job checks its
        due time by the clock)."""
        executed = drain(self.world.runtime, include_scheduled=True)
        self._take_events()
        self._step("work_all", f"worker ran {executed} job(s), delayed ones too")

    @precondition(lambda self: self.world.clock.now() - self.start < WHOP_FAULTS_UNTIL)
    @rule(fault=st.sampled_from(["outage", "errors", "timeouts", "throttled", "forbidden"]))
    def run_worker_while_whop_fails(self, fault: str) -> None:
        """A worker runs what is due while Whop is down, answers 500, times out after doing
        what it was asked (504), rate-limits the key, or refuses it (403): a passing fault, so
        nothing may be lost."""
        state = self.world.simulator.state
        if fault == "outage":
            state.set_outage(True)
        elif fault == "errors":
            state.set_faults(error_rate=1.0)
        elif fault == "timeouts":
            state.set_faults(timeout_rate=1.0, timeout_seconds=0.0)
        elif fault == "throttled":
            state.throttle(10_000, retry_after=30)
        else:
            state.set_forbidden(True)
        try:
            executed = drain(self.world.runtime, include_scheduled=True)
        finally:
            state.set_outage(False)
            state.set_faults(error_rate=0.0, timeout_rate=0.0)
            state.throttle(0)
            state.set_forbidden(False)
        self._take_events()
        self._step(f"whop_{fault}", f"worker ran {executed} job(s) while Whop was {fault}")

    @rule(seconds=st.sampled_from(CLOCK_STEPS))
    def advance_clock(self, seconds: int) -> None:
        clock = self.world.clock
        room = (self.last_whop_sweep + MAX_SWEEP_GAP - clock.now()).total_seconds()
        seconds = max(0, min(seconds, int(room)))
        clock.advance(seconds)
        sink = self.world.sink
        if sink.refusing or not sink.is_up:
            self.smtp_outage += seconds
            if self.smtp_outage >= self.world.runtime.settings.EMAIL_GIVE_UP_AFTER:
                for purchase in self.purchases:
                    purchase.mail_may_be_given_up = True
        self._step("advance", f"clock +{seconds} s")

    @rule(mode=st.sampled_from(["up", "refusing", "down"]))
    def smtp(self, mode: str) -> None:
        sink = self.world.sink
        sink.refusing = mode == "refusing"
        if mode == "down":
            sink.down()
        else:
            sink.up()
        if mode == "up":
            self.smtp_outage = 0.0
        self._step(f"smtp_{mode}", f"SMTP server {mode}")

    @rule(count=st.integers(1, 3))
    def add_stock(self, count: int) -> None:
        self.world.add_stock(count)
        self._step("add_stock", f"{count} stock item(s) imported")

    # ----- invariants ---------------------------------------------------------------------------

    @invariant()
    def nothing_bad_happened(self) -> None:
        if self.healthy:
            self._check(self.world.orders())

    def _check(self, orders: list[Order]) -> None:
        self._check_bindings(orders)
        by_id = {order.id: order for order in orders}
        self._check_messages(by_id)
        self._check_cancels(orders)

    def _check_bindings(self, orders: list[Order]) -> None:
        for order in orders:
            now = (order.whop_payment_id, order.whop_membership_id)
            before = self.bindings.get(order.id, (None, None))
            for what, old, new in zip(("payment", "membership"), before, now, strict=True):
                if old is not None and new != old:
                    self._fail(f"order {order.id} changed its {what} from {old} to {new}")
            self.bindings[order.id] = (before[0] or now[0], before[1] or now[1])
            paid_by = self.by_payment.get(order.whop_payment_id or "")
            member_of = self.by_membership.get(order.whop_membership_id or "")
            if paid_by is not None and member_of is not None and paid_by is not member_of:
                self._fail(
                    f"order {order.id} holds the payment of {paid_by.name} "
                    f"({paid_by.payment_id}) but the membership of {member_of.name} "
                    f"({member_of.membership_id}): two buyers are cross-wired"
                )

    def _check_messages(self, orders: dict[str, Order]) -> None:
        received = self.world.sink.received
        fresh = received[self.messages_checked :]
        self.messages_checked = len(received)
        rows = self.world.email_rows({m.email_row_id for m in fresh if m.email_row_id})
        for message in fresh:
            recipients = message.email.recipients
            row = rows.get(message.email_row_id or -1)
            if row is None:
                self._fail(f"a message to {recipients} came from no outbox row")
            if row.kind != "delivery":
                self._check_other_mail(message, row.kind, orders.get(row.order_id or ""))
                continue
            order = orders.get(row.order_id or "")
            purchase = self.by_payment.get(order.whop_payment_id or "") if order else None
            if order is None or purchase is None:
                self._fail(
                    f"delivery email of order {row.order_id} to {recipients}, but the order "
                    f"holds no payment of any purchase ({order.whop_payment_id if order else '-'})"
                )
            if recipients != (purchase.buyer,):
                self._fail(
                    f"another buyer's product: order {order.id} holds {purchase.name} "
                    f"(bought by {purchase.buyer}) but its delivery email went to "
                    f"{', '.join(recipients)}"
                )
            if not (purchase.one_time_listed and purchase.facts.emails):
                self._fail(
                    f"{purchase.name} ({purchase.plan}, {purchase.billing_reason}) is recorded "
                    f"only, yet order {order.id} emailed it to {purchase.buyer}"
                )
            if purchase.before_install:
                self._fail(
                    f"delivered twice: {purchase.name} was sold before the service started "
                    f"watching and served then, yet order {order.id} emailed it again to "
                    f"{purchase.buyer}"
                )
            earlier = self.delivered.setdefault(purchase.payment_id, [])
            earlier.append(message)
            if len(earlier) > 1:
                self._fail(f"delivered twice: {purchase.name} got {len(earlier)} delivery emails")

    def _check_other_mail(self, message: SinkMessage, kind: str, order: Order | None) -> None:
        """Mail that is not a delivery goes to the admin, or to the order's own buyer."""
        buyers = [address for address in message.email.recipients if address in BUYERS]
        if not buyers:
            return
        purchase = self.by_payment.get(order.whop_payment_id or "") if order else None
        if purchase is None or buyers != [purchase.buyer]:
            self._fail(
                f"{', '.join(buyers)} got a {kind} email ({message.email.subject.strip()}) of "
                f"order {order.id if order else '-'}, bought by "
                f"{purchase.buyer if purchase else 'nobody we know'}"
            )

    def _check_cancels(self, orders: list[Order]) -> None:
        fresh = self.world.simulator.state.calls(since=self.calls_checked)
        self.calls_checked += len(fresh)
        for call in fresh:
            if call["method"] != "POST" or not call["path"].endswith("/cancel"):
                continue
            membership_id = call["membership_id"]
            # A call that cancelled: answered 2xx, or timed out (504) after Whop did it, which
            # it does unless the membership was cancelled already. A replayed answer did nothing.
            succeeded = 200 <= call["status"] < 300 or (
                call["timed_out"] and not self.cancelled[membership_id]
            )
            if call["replayed"] or not succeeded:
                continue
            self.cancelled[membership_id] += 1
            why = self._why_not_cancellable(membership_id, call["seq"], orders)
            if why:
                purchase = self.by_membership.get(membership_id)
                self._fail(
                    f"membership {membership_id} of {purchase.name if purchase else '?'} was "
                    f"cancelled at Whop (call #{call['seq']}) although {why}"
                )
            if self.cancelled[membership_id] > 1:
                self._fail(f"membership {membership_id} was cancelled by two successful calls")

    def _why_not_cancellable(self, membership_id: str, seq: int, orders: list[Order]) -> str:
        purchase = self.by_membership.get(membership_id)
        if purchase is None:
            return "it is no purchase's membership"
        facts = purchase.facts
        if not facts.listed:
            return f"its plan {purchase.plan} is not listed"
        if not facts.cancel:
            return f"its plan {purchase.plan} is delivery-only (cancel = false)"
        if purchase.billing_reason != "one_time":
            return f"it is a {purchase.billing_reason} payment, not one_time"
        if purchase.ended_by:
            return f"its payment ended in a {purchase.ended_by}"
        if purchase.before_install:
            return ""  # served by hand before the service watched: backfill's to cancel
        order = next((o for o in orders if o.whop_payment_id == purchase.payment_id), None)
        if order is None:
            return f"its payment {purchase.payment_id} is on no order (nothing was delivered)"
        if order.delivered_at is None:
            return f"its order {order.id} is {order.status}, not delivered"
        if facts.emails and not any(
            m.calls_before < seq for m in self.delivered.get(purchase.payment_id, [])
        ):
            return (
                f"the delivery email of order {order.id} to {purchase.buyer} had not been "
                "accepted by the SMTP server"
            )
        return ""

    # ----- the end ------------------------------------------------------------------------------

    def teardown(self) -> None:
        self.counts.examples += 1
        self.counts.rule_sequences.add(tuple(self.trace))
        self.counts.event_sequences.add(tuple(self.event_trace))
        if not self.healthy or sys.exc_info()[0] is not None:
            return  # a step failed: that is the report, not what settling would add
        try:
            self._settle()
            self._final_checks()
            self.counts.settled += 1
        except Violation:
            raise
        except BaseException:
            self.healthy = False
            raise

    def _settle(self) -> None:
        """Everything that will ever happen, happens: SMTP up, claims and echoes delivered,
        purchase webhooks still pending dropped, stock for every stock purchase, and sweeps and
        workers run as the clock passes every delay."""
        world = self.world
        world.sink.refusing = False
        world.sink.up()
        note("settle: SMTP up; claims and echoes delivered; other webhooks dropped")
        for event in self.pending:
            if event.claim is not None or event.echo:
                self._post(event)
        self.pending = []
        world.add_stock(sum(1 for p in self.purchases if p.plan == STOCK_PLAN) + 1)
        progress: tuple[object, ...] = ()
        quiet = 0
        for number, seconds in enumerate(SETTLE_CLOCK):
            world.clock.advance(seconds)
            if number in SETTLE_WHOP_SWEEPS:
                world.runtime.whop_sweep.run(force=True)
            world.runtime.stuck_sweep.run(force=True)
            drain(world.runtime, include_scheduled=True)
            self._take_events()
            echoes, self.pending = self.pending, []
            for event in echoes:
                self._post(event)
            orders = world.orders()
            self._check(orders)
            before, progress = (
                progress,
                (
                    self.messages_checked,
                    sum(self.cancelled.values()),
                    sorted(o.status for o in orders),
                ),
            )
            quiet = quiet + 1 if progress == before else 0
            if number > max(SETTLE_WHOP_SWEEPS) and quiet >= SETTLE_QUIET_STEPS:
                break

    def required(self, purchase: Purchase) -> bool:
        """Must this purchase end delivered (and, for a cancel plan, its membership cancelled)?
        A listed one-time purchase, made after install, not refunded or lost, whose delivery
        needs no email or whose buyer's working address the service can know (from the payment,
        or from the checkout it was bought through when nothing else could take that order) and
        was not refused by SMTP for EMAIL_GIVE_UP_AFTER."""
        facts = purchase.facts
        if purchase.before_install or not purchase.one_time_listed or purchase.ended_by:
            return False
        if not facts.emails:
            return True
        if purchase.buyer in BOUNCING or purchase.mail_may_be_given_up:
            return False
        if purchase.email_on_payment:
            return True
        link = purchase.checkout
        return (
            link is not None
            and link.email is not None
            and not any(
                other is not purchase
                and not other.before_install
                and other.buyer == purchase.buyer
                and other.plan == purchase.plan
                for other in self.purchases
            )
        )

    def _final_checks(self) -> None:
        orders = self.world.orders()
        state = self.world.simulator.state
        for purchase in self.purchases:
            if not self.required(purchase):
                continue
            order = next((o for o in orders if o.whop_payment_id == purchase.payment_id), None)
            where = f"order {order.id} is {order.status}" if order else "it is on no order"
            if purchase.facts.emails:
                emails = len(self.delivered.get(purchase.payment_id, []))
                if emails != 1:
                    self._fail(
                        f"after settling, {purchase.name} ({purchase.plan} by {purchase.buyer}) "
                        f"got {emails} delivery emails, not 1 ({where})"
                    )
            elif order is None or order.delivered_at is None:
                self._fail(
                    f"after settling, {purchase.name} ({purchase.plan}) was not delivered ({where})"
                )
            if purchase.facts.cancel:
                status = state.membership(purchase.membership_id)["status"]
                calls = self.cancelled[purchase.membership_id]
                if status != "canceled" or calls != 1:
                    self._fail(
                        f"after settling, {purchase.name}'s membership {purchase.membership_id} "
                        f"is {status} after {calls} successful cancel call(s), not cancelled "
                        f"once ({where})"
                    )


def run_model(world: World, label: str, steps: int) -> None:
    """Run the state machine until at least `steps` steps ran; print what was covered."""
    counts = RunCounts()
    base_seed = int(os.environ.get("WA_MODEL_SEED") or random.randrange(2**32))
    start = world.clock.now().replace(microsecond=0)
    began = time.monotonic()
    failure: BaseException | None = None
    try:
        rounds = 0
        while counts.steps < steps:
            missing, ran = steps - counts.steps, counts.steps
            machine = type(
                "ShopModel",
                (ShopModel,),
                {"world": world, "counts": counts, "start": start},
            )
            seed(base_seed + rounds)(machine)
            run_state_machine_as_test(
                machine,
                settings=settings(
                    max_examples=max(1, math.ceil(missing / STEPS_PER_EXAMPLE)),
                    stateful_step_count=STEPS_PER_EXAMPLE,
                    deadline=None,
                    database=None,
                    suppress_health_check=list(HealthCheck),
                ),
            )
            rounds += 1
            assert counts.steps > ran, "Hypothesis ran no step: nothing was tested"
    except BaseException as error:
        failure = error
        raise
    finally:
        seconds = time.monotonic() - began
        show(
            f"model ({label}): {counts.steps} steps in {counts.examples} examples "
            f"({counts.settled} settled and checked at the end), "
            f"{seconds:.1f} s ({1000 * seconds / max(counts.steps, 1):.1f} s per 1,000 steps), "
            f"seed {base_seed} (WA_MODEL_SEED); distinct interleavings: "
            f"{len(counts.rule_sequences)} rule sequences, {len(counts.event_sequences)} "
            "(rule, event type) sequences"
            + (f"; FAILED: {type(failure).__name__}" if failure else "")
        )
        show(f"model ({label}) rules run: {dict(counts.rules.most_common())}")
        for violation in dict.fromkeys(counts.violations):
            show(f"model ({label}) violation seen: {violation}")


def test_the_model_holds(request: pytest.FixtureRequest, tmp_path: Path, database_url: str) -> None:
    kind = request.node.callspec.params["database_url"]
    steps = int(
        os.environ.get("WA_MODEL_STEPS", "4000")
        if kind == "sqlite"
        else os.environ.get("WA_MODEL_SERVER_STEPS", "300")
    )
    start = datetime.now(UTC).replace(microsecond=0)
    # SQLite files (the database on SQLite, the job queue always) on a RAM disk when there is
    # one: the same engine, without waiting for a disk it does not need.
    shm = Path("/dev/shm")
    work = Path(tempfile.mkdtemp(prefix="wa-model-", dir=shm if shm.is_dir() else tmp_path))
    try:
        if kind == "sqlite":
            database_url = f"sqlite:///{work / 'service.db'}"
        with model_world(tmp_path, database_url, work, start) as world:
            run_model(world, kind, steps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
