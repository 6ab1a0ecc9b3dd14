"""The world of the model-based test (tests/integration/test_model.py): the real service (its
runtime, web app on loopback, database and queue), the Whop simulator over real HTTP whose
record times follow the test's frozen clock, a webhook catcher that keeps every event the
simulator sends (the model decides when, whether and how often each reaches the inbox), and an
SMTP sink that can refuse mail, go down, or bounce one buyer's address for good.

Everything here is built once per test and reset between Hypothesis examples (empty tables, an
empty queue, a reset simulator): building it is what costs, not using it."""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
from aiosmtpd.controller import Controller
from sqlalchemy import select

from support.harness import (
    API_KEY,
    KEEP_PLAN,
    MESSAGE_PLAN,
    NONE_PLAN,
    SECRET,
    STOCK_CATALOG,
    STOCK_PLAN,
    STOCK_POOL,
    UNLISTED_PLAN,
    ServiceServer,
    make_runtime,
    make_settings,
    signed_headers,
    wait_for,
)
from support.receiver import Receiver
from whop_autocancel.admin.stock import import_stock
from whop_autocancel.clock import FrozenClock
from whop_autocancel.db.install import record_watching_since
from whop_autocancel.delivery.stock import items_for
from whop_autocancel.errors import WhopAutocancelError
from whop_autocancel.mail.models import Email
from whop_autocancel.mail.sink import ReceivedEmail, SmtpSink
from whop_autocancel.orders.models import Order
from whop_autocancel.reconcile.backfill import BackfillRefused
from whop_autocancel.runtime import Runtime
from whop_autocancel.schema import Base
from whop_autocancel.simulator import SimulatorServer

COMPANY = "biz_SimStore"


# Two subscription plans: one the merchant listed by mistake (its payments are recorded only,
# DESIGN §1), one not listed.
MONTHLY_PLAN = "plan_MonthlyListed1"
UNLISTED_MONTHLY_PLAN = "plan_MonthlyUnlisted1"
CATALOG = (
    STOCK_CATALOG
    + f"""
[plans.{MONTHLY_PLAN}]
name = "Monthly club"
delivery = "message"
message = "Welcome to the club."
"""
)


@dataclass(frozen=True)
class PlanFacts:
    """What the catalog says about a plan, and what kind of plan it is at Whop."""

    listed: bool
    cancel: bool  # cancel = true in the catalog (meaningless when not listed)
    emails: bool  # the delivery is an email to the customer (message, stock); `none` has none
    renewal: bool = False  # a subscription plan at Whop (its payments are never one_time)


PLANS: dict[str, PlanFacts] = {
    MESSAGE_PLAN: PlanFacts(listed=True, cancel=True, emails=True),
    NONE_PLAN: PlanFacts(listed=True, cancel=True, emails=False),
    KEEP_PLAN: PlanFacts(listed=True, cancel=False, emails=True),
    STOCK_PLAN: PlanFacts(listed=True, cancel=True, emails=True),
    UNLISTED_PLAN: PlanFacts(listed=False, cancel=False, emails=False),
    MONTHLY_PLAN: PlanFacts(listed=True, cancel=True, emails=True, renewal=True),
    UNLISTED_MONTHLY_PLAN: PlanFacts(listed=False, cancel=False, emails=False, renewal=True),
}
LISTED_PLANS = [plan for plan, facts in PLANS.items() if facts.listed]
CANCEL_PLANS = [plan for plan, facts in PLANS.items() if facts.listed and facts.cancel]

# The buyers. The last one's mailbox does not exist: the SMTP server answers 550 for it, always.
BUYERS = ["ann@buyers.test", "bob@buyers.test", "cy@buyers.test", "dee@nowhere.test"]
BOUNCING = frozenset({"dee@nowhere.test"})

# Whop's RefundStatus and DisputeStatus (whop_sdk.types), as the paths one claim can take;
# only a succeeded refund and a lost dispute take the money back.
REFUND_PATHS: list[tuple[str, ...]] = [
    ("pending",),
    ("pending", "succeeded"),
    ("pending", "failed"),
    ("pending", "canceled"),
    ("requires_action",),
    ("requires_action", "succeeded"),
    ("requires_action", "canceled"),
    ("succeeded",),
]
DISPUTE_PATHS: list[tuple[str, ...]] = [
    ("needs_response",),
    ("needs_response", "under_review"),
    ("needs_response", "under_review", "won"),
    ("needs_response", "under_review", "lost"),
    ("warning_needs_response", "warning_under_review", "warning_closed"),
    ("warning_needs_response", "won"),
    ("needs_response", "lost"),
    ("prevented",),
]
ENDING = {"refund": "succeeded", "dispute": "lost"}


# ----- the SMTP sink ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SinkMessage:
    """One message the SMTP server accepted, and how many Whop API calls the simulator had
    recorded when it did (so "accepted before that cancel call" is exact, with no clock)."""

    email: ReceivedEmail
    calls_before: int

    @property
    def email_row_id(self) -> int | None:
        """The outbox row that sent it (its Message-ID is `whop-autocancel.<row id>.<ts>`)."""
        found = re.search(r"whop-autocancel\.(\d+)\.", str(self.email.message["Message-ID"]))
        return int(found.group(1)) if found else None


class _Handler:
    def __init__(self, sink: ModelSink) -> None:
        self._sink = sink

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if address.lower() in BOUNCING:
            return "550 5.1.1 <" + address + ">: no such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self._sink.refusing:
            return "451 4.3.0 mail server busy, try again later"
        message = message_from_bytes(envelope.content, policy=policy.default)
        assert isinstance(message, EmailMessage)
        received = ReceivedEmail(
            sender=envelope.mail_from, recipients=tuple(envelope.rcpt_tos), message=message
        )
        self._sink.record(received)
        return "250 OK"


class ModelSink(SmtpSink):
    """The SMTP sink with three failure modes: `refusing` (451 to every message), `down()`
    (nothing listens), and BOUNCING addresses (550, permanent). What it accepted is in
    `received`."""

    def __init__(self, calls_seen: Callable[[], int]) -> None:
        super().__init__()
        self._calls_seen = calls_seen
        self._received: list[SinkMessage] = []
        self._record_lock = threading.Lock()
        self._controller = self._new_controller()
        self.is_up = False

    def _new_controller(self) -> Controller:
        return Controller(_Handler(self), hostname=self.host, port=self.port)

    def record(self, received: ReceivedEmail) -> None:
        with self._record_lock:
            self._received.append(SinkMessage(received, self._calls_seen()))

    @property
    def received(self) -> list[SinkMessage]:
        with self._record_lock:
            return list(self._received)

    def clear(self) -> None:
        with self._record_lock:
            self._received.clear()

    def up(self) -> None:
        if not self.is_up:
            self._controller = self._new_controller()  # aiosmtpd cannot restart a stopped one
            self._controller.start()
            self.is_up = True

    def down(self) -> None:
        if self.is_up:
            self._controller.stop()
            self.is_up = False

    def start(self) -> ModelSink:
        self.up()
        return self

    def stop(self) -> None:
        self.down()


# ----- the world --------------------------------------------------------------------------------


@dataclass
class World:
    runtime: Runtime
    clock: FrozenClock
    simulator: SimulatorServer
    sink: ModelSink
    catcher: Receiver
    http: httpx.Client
    caught: int = 0  # catcher requests already taken into the model
    stock_added: int = 0

    def reset(self, start: datetime) -> None:
        """A fresh shop for the next example: empty tables and queue, a reset simulator, an
        empty mailbox, the clock at `start`, and the install time recorded at `start`."""
        self.clock.set(start)
        self.sink.refusing = False
        self.sink.up()
        self.sink.clear()
        wait_for(lambda: self.simulator.state.pending_webhooks() == 0, what="the last webhooks")
        self.simulator.state.reset()
        self.caught = len(self.catcher.snapshot())
        self.runtime.jobs.huey.flush()
        with self.runtime.database.engine.begin() as connection:
            for table in reversed(Base.metadata.sorted_tables):
                connection.execute(table.delete())
        with self.runtime.database.transaction() as session:
            record_watching_since(session, start)

    # Webhooks ---------------------------------------------------------------------------------

    def new_events(self) -> list[tuple[str, str, bytes]]:
        """The events the simulator sent since the last call: (webhook id, type, body)."""
        wait_for(
            lambda: self.simulator.state.pending_webhooks() == 0,
            what="the simulator's webhooks",
            every=0.001,
        )
        requests = self.catcher.snapshot()
        fresh, self.caught = requests[self.caught :], len(requests)
        events = []
        for headers, body in fresh:
            document = json.loads(body)
            webhook_id = {k.lower(): v for k, v in headers.items()}["webhook-id"]
            events.append((webhook_id, str(document["type"]), body))
        return events

    def post_event(self, webhook_id: str, body: bytes) -> httpx.Response:
        """POST a webhook to the service as Whop would, signed now (by the test's clock)."""
        headers = signed_headers(body, at=self.clock.now(), webhook_id=webhook_id)
        return self.http.post("/webhooks/whop", content=body, headers=headers)

    # Reading state ---------------------------------------------------------------------------

    def orders(self) -> list[Order]:
        with self.runtime.database.transaction() as session:
            return list(session.scalars(select(Order)))

    def email_rows(self, ids: set[int]) -> dict[int, Email]:
        if not ids:
            return {}
        with self.runtime.database.transaction() as session:
            return {row.id: row for row in session.scalars(select(Email).where(Email.id.in_(ids)))}

    def add_stock(self, count: int) -> None:
        items = [f"account-{self.stock_added + n}:secret" for n in range(count)]
        self.stock_added += count
        import_stock(self.runtime, STOCK_POOL, items_for(items))


@contextmanager
def model_world(
    tmp_path: Path, database_url: str, queue_dir: Path, start: datetime
) -> Iterator[World]:
    """The shop (stock catalog), the simulator as Whop, the catcher and the sink, on
    `database_url`, with the SQLite job queue in `queue_dir`."""
    clock = FrozenClock(start)
    (tmp_path / "catalog.toml").write_text(CATALOG)
    simulator = SimulatorServer(
        api_key=API_KEY, webhook_secret=SECRET, time_scale=0.01, clock=clock.now
    )
    simulator.start()
    catcher = Receiver()
    simulator.state.set_webhook_url(catcher.url)
    for plan, facts in PLANS.items():
        simulator.state.create_plan(plan, "renewal" if facts.renewal else "one_time")
    sink = ModelSink(simulator.state.call_count)
    sink.up()
    runtime = make_runtime(
        make_settings(
            tmp_path,
            DATABASE_URL=database_url,
            QUEUE_URL=f"sqlite:///{queue_dir / 'queue.db'}",
            WHOP_API_URL=simulator.api_url,
            WHOP_COMPANY_ID=COMPANY,
            SMTP_URL=sink.url,
            SMTP_TIMEOUT=5,
            CHECKOUT_RATE_LIMIT="off",
            LOG_LEVEL="WARNING",
        ),
        clock,
    )
    server = ServiceServer(runtime)
    try:
        with server.running(), httpx.Client(base_url=server.url, timeout=30) as http:
            yield World(runtime, clock, simulator, sink, catcher, http)
    finally:
        runtime.close()
        sink.down()
        catcher.close()
        simulator.stop()


# ----- what the model knows ---------------------------------------------------------------------


@dataclass
class Checkout:
    number: int
    plan: str
    buyer: str
    email: str | None  # the email given to POST /api/checkouts
    order_id: str | None
    configuration_id: str | None  # None: Whop did not create it (the request failed)

    @property
    def name(self) -> str:
        return f"C{self.number}"


@dataclass
class Purchase:
    number: int
    plan: str
    billing_reason: str
    buyer: str
    email_on_payment: bool  # Whop tells us the buyer's email (else no payload or answer does)
    payment_id: str
    membership_id: str
    checkout: Checkout | None = None
    before_install: bool = False  # sold before the service watched; served by hand then
    ended_by: str | None = None  # "refund rf_…" / "dispute dp_…": the money went back
    # SMTP accepted nothing for EMAIL_GIVE_UP_AFTER while this purchase existed: its delivery
    # email may rightly have been given up (failed, the admin told, the membership kept).
    mail_may_be_given_up: bool = False

    @property
    def name(self) -> str:
        return f"P{self.number}"

    @property
    def facts(self) -> PlanFacts:
        return PLANS[self.plan]

    @property
    def one_time_listed(self) -> bool:
        return self.facts.listed and self.billing_reason == "one_time"


@dataclass
class PendingEvent:
    """A webhook Whop has for us and has not given up on."""

    webhook_id: str
    type: str
    body: bytes
    about: str  # the purchase (or claim) it belongs to, for the notes
    claim: tuple[Purchase, str, str] | None = None  # (purchase, kind, status) of a claim
    delivered: int = 0

    @property
    def label(self) -> str:
        return f"{self.type}[{self.about}]"

    @property
    def echo(self) -> bool:
        """Whop telling us a membership ended (the echo of a cancel), not a purchase event."""
        return self.type in ("membership.deactivated", "membership.updated")


@dataclass
class Claim:
    kind: str  # refund | dispute
    claim_id: str
    purchase: Purchase
    path: tuple[str, ...]


def claim_body(claim: Claim, status: str, first: bool) -> tuple[str, bytes]:
    """A signed-to-be refund.* / dispute.* event (Whop's refund and dispute data, legacy)."""
    webhook_id = f"msg_{claim.claim_id}_{status}"
    data = {
        "id": claim.claim_id,
        "status": status,
        "amount": 25.0,
        "currency": "usd",
        "reason": "requested_by_customer" if claim.kind == "refund" else "fraudulent",
        "payment": {"id": claim.purchase.payment_id},
    }
    document = {
        "id": webhook_id,
        "api_version": "v1",
        "type": f"{claim.kind}.{'created' if first else 'updated'}",
        "data": data,
        "company_id": COMPANY,
        "api_version_date": None,
    }
    return webhook_id, json.dumps(document).encode()


def run_backfill(runtime: Runtime, plan: str) -> list[str]:
    """`whop-autocancel backfill --plan PLAN --yes`, in process: the statuses it ended with."""
    job = runtime.backfill()
    try:
        job.check_plan(plan)
        survey = job.survey(plan, None)
    except BackfillRefused as refused:
        return [f"refused: {refused}"]
    except WhopAutocancelError as stopped:  # Whop asked everyone to wait (a 429): none done
        if "listing memberships stopped" not in str(stopped):
            raise
        return [f"stopped: {stopped}"]
    return [job.cancel(plan, live) for live in survey.to_cancel]


@dataclass
class RunCounts:
    """What the runs covered, for the summary line."""

    steps: int = 0
    examples: int = 0
    settled: int = 0  # examples that ran to the end, settled and passed the final checks
    rule_sequences: set[tuple[str, ...]] = field(default_factory=set)
    event_sequences: set[tuple[str, ...]] = field(default_factory=set)
    violations: list[str] = field(default_factory=list)
    rules: Counter[str] = field(default_factory=Counter)
