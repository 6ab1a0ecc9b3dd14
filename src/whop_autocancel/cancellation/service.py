"""The cancellation state machine (DESIGN §5): lease the row, make one Whop call in the common
case, classify the answer, and record it. The worker never sleeps: it reschedules."""

from __future__ import annotations

import asyncio
import random
import secrets
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Protocol, TypeVar, cast

import structlog
from sqlalchemy import (
    Row,
    Table,
    Update,
    and_,
    bindparam,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from whop_autocancel import metrics
from whop_autocancel.alerts.models import AlertKind
from whop_autocancel.alerts.service import AlertContent, Alerts
from whop_autocancel.cancellation.models import (
    CANCEL_TASK,
    Cancellation,
    CancellationAttempt,
    CancellationStatus,
)
from whop_autocancel.catalog import Catalog
from whop_autocancel.clock import Clock
from whop_autocancel.db import leases
from whop_autocancel.db.base import UTCDateTime, not_searched
from whop_autocancel.db.engine import Database, after_commit, insert_once
from whop_autocancel.errors import WhopAutocancelError
from whop_autocancel.jobs import Jobs
from whop_autocancel.mail.models import DELIVERY_KIND, Email
from whop_autocancel.orders.models import Order, OrderStatus
from whop_autocancel.orders.service import ONE_TIME
from whop_autocancel.whop.client import AsyncWhopClient, WhopReply
from whop_autocancel.whop.outcomes import INACTIVE_STATUSES, Outcome, classify, may_have_acted
from whop_autocancel.whop.pacing import NOT_BEFORE_KEY

log = structlog.get_logger(__name__)

Status = CancellationStatus
# How `last_error` starts while a row waits for its order's delivery email (`_email_hold`);
# `wake_after_email` brings exactly those rows forward when the email is accepted.
WAITING_FOR_EMAIL = "Waiting for the customer's delivery email"
WAITING_FOR_WEBHOOKS = "Waiting for stored webhooks about this purchase to be applied first"
FACTS_WAIT = 1.0  # seconds before a row waiting for them looks again
# Whether a stored webhook not applied yet names one of these ids (a payment, a membership).
UnappliedFacts = Callable[[Session, Sequence[str]], bool]


T = TypeVar("T")


class Offload(Protocol):
    """Runs a piece of blocking (database) work for a coroutine."""

    def __call__(self, work: Callable[[], T]) -> Awaitable[T]: ...


def run_to_end(coroutine: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a coroutine to its end from blocking code: on a new event loop in this thread, or
    in a thread of its own when this thread already runs a loop (a caller inside async code,
    Playwright's sync API)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(coroutine())
        return
    failure: list[BaseException] = []

    def own_loop() -> None:
        try:
            asyncio.run(coroutine())
        except BaseException as error:  # handed to the caller below
            failure.append(error)

    thread = threading.Thread(target=own_loop, name="cancel-attempt")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


async def inline(work: Callable[[], T]) -> T:
    """Offload by not offloading: the work runs in the caller's thread (its own event loop)."""
    return work()


class RetryRefused(WhopAutocancelError):
    """An admin retry that makes no sense for the row's state."""


def new_idempotency_token() -> str:
    """A random token (32 hex characters) for a cancellation's Idempotency-Key: unique across
    databases and installs on one API key, where row ids are not."""
    return secrets.token_hex(16)


# The statements every purchase runs, built once (their parameters bound at each run):
# building and keying a statement costs more than SQLite takes to run it. Those that find
# rows by a key leave the status (or kind) out of their WHERE and check it here: SQLite,
# without statistics, may walk the status index instead of the key's (every scheduled row,
# every delivery email), whichever was created last (tests/integration/test_query_plans.py).
_OF_ORDER = select(Cancellation).where(Cancellation.order_id == bindparam("order_id"))
_OF_ORDER_LOCKED = _OF_ORDER.with_for_update()
_SCHEDULED_OF_ORDER = _OF_ORDER_LOCKED.where(Cancellation.status == Status.SCHEDULED.value)
_OF_MEMBERSHIP_LOCKED = (
    select(Cancellation)
    .where(Cancellation.membership_id == bindparam("membership_id"))
    .with_for_update()
)
_EMAILS_OF_ORDER = select(Email.kind, Email.sent_at, Email.failed_at, Email.next_attempt_at).where(
    Email.order_id == bindparam("order_id")
)
_ROWS = cast(Table, Cancellation.__table__)
_NOW = bindparam("now", type_=UTCDateTime())
# Lease a due row: a table statement, the claim's session holds no row yet.
_CLAIM = (
    update(_ROWS)
    .where(
        _ROWS.c.id == bindparam("cancellation_id"),
        or_(
            and_(_ROWS.c.status == Status.SCHEDULED.value, _ROWS.c.next_attempt_at <= _NOW),
            and_(_ROWS.c.status == Status.RUNNING.value, _ROWS.c.lease_until < _NOW),
        ),
    )
    .values(
        status=Status.RUNNING.value,
        lease_owner=bindparam("owner"),
        lease_until=bindparam("new_lease", type_=UTCDateTime()),
        updated_at=_NOW,
    )
)


_ORDERS = cast(Table, Order.__table__)
_EMAILS = cast(Table, Email.__table__)
# The order's delivery emails (found by its `order_id`: SQLite must not walk the `kind` index,
# every delivery email there is).
_DELIVERY_EMAILS = and_(
    _EMAILS.c.order_id == _ROWS.c.order_id, not_searched(_EMAILS.c.kind) == DELIVERY_KIND
)
# The claimed row with the facts of its order that decide the call, in one read of plain
# columns: 0.06 ms of CPU here, where the ORM's two loads by key took 0.29. An order that no
# longer exists reads as None. With it, what else decides the call (`_claim_as_read`): the
# end of Whop's stop, and whether the order has delivery emails and one was accepted (two
# reads of their own, each costing more than SQLite takes to answer it).
_CLAIMED = (
    select(
        _ROWS.c.id,
        _ROWS.c.order_id,
        _ROWS.c.membership_id,
        _ROWS.c.generation,
        _ROWS.c.attempts,
        _ROWS.c.idempotency_token,
        _ROWS.c.last_error,
        _ORDERS.c.id.label("order_found"),
        _ORDERS.c.status.label("order_status"),
        _ORDERS.c.plan_id,
        _ORDERS.c.billing_reason,
        _ORDERS.c.whop_payment_id,
        _ORDERS.c.whop_membership_id,
        _ORDERS.c.whop_user_id,
        _ORDERS.c.checkout_configuration_id,
        _ORDERS.c.paid_at,
        _ORDERS.c.created_at,
        leases.until_of(NOT_BEFORE_KEY).label("stopped_until"),
        exists().where(_DELIVERY_EMAILS).label("emails_queued"),
        exists().where(_DELIVERY_EMAILS, _EMAILS.c.sent_at.is_not(None)).label("email_accepted"),
    )
    .select_from(_ROWS.outerjoin(_ORDERS, _ORDERS.c.id == _ROWS.c.order_id))
    .where(_ROWS.c.id == bindparam("cancellation_id"))
)


def _ended(status: CancellationStatus) -> Update:
    """Whop's plain success recorded on the row this worker holds, as `_record` would (one
    more attempt, the answer's status, the lease let go): the lease is the condition, so a
    row whose lease was lost matches nothing (and the full path says so)."""
    values: dict[str, Any] = {
        "status": status.value,
        "attempts": _ROWS.c.attempts + 1,
        "last_http_status": bindparam("http_status"),
        "membership_id": func.coalesce(_ROWS.c.membership_id, bindparam("membership_id")),
        "lease_until": None,
        "lease_owner": None,
        "updated_at": _NOW,
    }
    if status is Status.CANCELED:
        values["canceled_at"] = _NOW
    return (
        update(_ROWS)
        .where(
            _ROWS.c.id == bindparam("cancellation_id"),
            _ROWS.c.status == Status.RUNNING.value,
            _ROWS.c.lease_owner == bindparam("owner"),
        )
        .values(**values)
    )


_ENDED = {status: _ended(status) for status in (Status.CANCELED, Status.ALREADY_INACTIVE)}


def idempotency_key(token: str, generation: int) -> str:
    """`cancel-<token>-<generation>`: repeated for a call whose outcome we do not know; a new
    token after a definite refusal, a new generation after an admin retry."""
    return f"cancel-{token}-{generation}"


def ours_may_have_acted(row: Cancellation) -> bool:
    """Whether a cancel call of ours in this generation may have been carried out at Whop: one
    was made, and its answer (the last one recorded) was a success or did not say."""
    return row.attempts > 0 and may_have_acted(row.last_http_status)


def attach_membership(session: Session, jobs: Jobs, order: Order, now: datetime) -> None:
    """The order just learned its membership id: a cancellation row that was waiting for it
    takes it, and runs once the delay it was given is over."""
    if order.whop_membership_id is None:
        return
    cancellation = session.scalars(_OF_ORDER, {"order_id": order.id}).first()
    if cancellation is not None and cancellation.membership_id is None:
        cancellation.membership_id = order.whop_membership_id
        if cancellation.status == "scheduled":
            delay = max(0.0, (cancellation.next_attempt_at - now).total_seconds())
            jobs.defer(session, CANCEL_TASK, cancellation.id, delay=delay)


def schedule_cancellation(
    session: Session, order: Order, at: datetime, now: datetime
) -> Cancellation | None:
    """Create the order's cancellation row, once: None if it exists already. One exception: a
    row that a run `skipped` before the order was delivered (an older `backfill` ran it while
    the order was still pending) is armed again, as a new attempt generation due `at`, and
    returned, so the caller wakes it like a new one."""
    row = Cancellation(
        order_id=order.id,
        membership_id=order.whop_membership_id,
        status=Status.SCHEDULED.value,
        attempts=0,
        generation=1,
        idempotency_token=new_idempotency_token(),
        generation_started_at=now,
        next_attempt_at=at,
        created_at=now,
        updated_at=now,
    )
    if insert_once(session, row):  # (the usual case: one statement, no read before it)
        return row
    existing = session.scalars(_OF_ORDER_LOCKED, {"order_id": order.id}).first()
    if existing is None or existing.status != Status.SKIPPED.value:
        return None
    _arm_again(
        existing,
        at,
        now,
        f"the order is delivered now (an earlier run skipped it: {existing.last_error})",
    )
    return existing


def mark_inactive_from_webhook(session: Session, membership_id: str, now: datetime) -> int:
    """Whop says the membership is canceled (often the echo of our own cancel): a cancellation
    waiting for its next attempt has nothing left to do. The state says who did it: `canceled`
    when a call of ours may have been carried out (its answer was lost: timeout, 5xx),
    `already_inactive` when no call of ours went through. A `running` row is left alone: the
    answer of its call in flight settles it."""
    found = session.scalars(_OF_MEMBERSHIP_LOCKED, {"membership_id": membership_id}).all()
    rows = [row for row in found if row.status == Status.SCHEDULED.value]
    for row in rows:
        if ours_may_have_acted(row):
            row.status = Status.CANCELED.value
            row.canceled_at = now
            row.last_error = (
                "Whop reported the membership canceled after our cancel call whose answer was "
                f"lost (last: {row.last_error or '-'})"
            )
            event = "cancelled"
        else:
            row.status = Status.ALREADY_INACTIVE.value
            row.last_error = (
                "Whop reported the membership inactive before our call"
                if row.attempts == 0
                else "Whop reported the membership inactive; none of our calls had gone through "
                f"(last: {row.last_error or '-'})"
            )
            event = "cancellation_already_inactive"
        row.updated_at = now
        row.lease_until = None
        row.lease_owner = None
        record_end(session, row, now)
        log.info(
            event,
            cancellation_id=row.id,
            order_id=row.order_id,
            membership_id=membership_id,
            source="webhook",
        )
    return len(rows)


def record_end(session: Session, row: Cancellation, now: datetime) -> None:
    """Count a cancellation that ended (its status, the attempts of its generation and, when
    it cancelled the membership, the time since the purchase) once the transaction commits."""
    outcome, attempts = row.status, row.attempts
    seconds = None
    if outcome == Status.CANCELED.value:
        order = session.get(Order, row.order_id)  # (in the session already: no query)
        started = purchase_time(order) if order is not None else None
        seconds = (now - started).total_seconds() if started is not None else None
    after_commit(session, lambda: metrics.observe_cancellation_end(outcome, attempts, seconds))


class _Purchase(Protocol):
    """What a claim reads of an order: an `Order`, or the order's columns in `_CLAIMED`."""

    @property
    def whop_user_id(self) -> str | None: ...
    @property
    def plan_id(self) -> str | None: ...
    @property
    def checkout_configuration_id(self) -> str | None: ...
    @property
    def paid_at(self) -> datetime | None: ...
    @property
    def created_at(self) -> datetime: ...


class _Claimed(Protocol):
    """What a claim reads of its cancellation: a `Cancellation`, or `_CLAIMED`'s row."""

    @property
    def id(self) -> int: ...
    @property
    def order_id(self) -> str: ...
    @property
    def membership_id(self) -> str | None: ...
    @property
    def generation(self) -> int: ...
    @property
    def attempts(self) -> int: ...
    @property
    def idempotency_token(self) -> str | None: ...


def purchase_time(order: _Purchase) -> datetime | None:
    """When the purchase happened as far as the service can tell: its payment, or the first
    webhook that told of it when that came later (a payment found late by the Whop sweep
    counts from when it was found)."""
    return latest(order.paid_at, order.created_at)


def latest(*moments: datetime | None) -> datetime | None:
    """The latest of the moments that are known (None when none is)."""
    known = [moment for moment in moments if moment is not None]
    return max(known) if known else None


def _holds_for_email(queued: bool, accepted: bool) -> bool:
    """The rule of the email gate, for `_email_hold` and the claim's one read alike: an order
    whose delivery sends emails (`queued`) is held until one was `accepted`."""
    return queued and not accepted


def _in_force(until: datetime | None, now: datetime) -> datetime | None:
    """`until`, the end of Whop's stop, while it is still ahead of `now`; else None."""
    return until if until is not None and until > now else None


def _email_hold(
    session: Session, order_id: str, membership_id: str | None, now: datetime, last_interval: float
) -> tuple[float, str] | None:
    """(delay, reason) while the order has delivery emails and none was accepted; None when
    one was, or when the delivery sends none (`none`)."""
    emails = [
        (sent_at, failed_at, due)
        for kind, sent_at, failed_at, due in session.execute(
            _EMAILS_OF_ORDER, {"order_id": order_id}
        )
        if kind == DELIVERY_KIND
    ]
    if not _holds_for_email(bool(emails), any(sent_at is not None for sent_at, _, _ in emails)):
        return None
    retried = [due for _, failed_at, due in emails if failed_at is None and due is not None]
    if not retried:
        return last_interval, (
            f"{WAITING_FOR_EMAIL}, which failed (see the email_failed alert): fix the address "
            f"or SMTP, then resend with `whop-autocancel orders resend {order_id}`; or cancel "
            f"by hand with `whop-autocancel cancel {membership_id or 'MEMBERSHIP'}`"
        )
    # Check again at the email's next try; an email due now (being sent) is looked at again
    # shortly: it wakes this row itself once accepted.
    until = (min(retried) - now).total_seconds()
    floor = min(5.0, last_interval)
    return min(max(until, floor), last_interval), (
        f"{WAITING_FOR_EMAIL}: the SMTP server has not accepted it yet (retried until "
        "EMAIL_GIVE_UP_AFTER)"
    )


def waits_for_email(session: Session, order: Order, now: datetime) -> bool:
    """Whether the order's delivery email is still on its way (queued or being retried, none
    accepted): its cancellation then runs only once `wake_after_email` arms it."""
    hold = _email_hold(session, order.id, order.whop_membership_id, now, 0.0)
    return hold is not None and not hold[1].startswith(f"{WAITING_FOR_EMAIL}, which failed")


def wake_after_email(session: Session, jobs: Jobs, order_id: str, now: datetime) -> int:
    """The order's delivery email was accepted: a cancellation held for it runs now (the
    wait adds no latency), and one not run yet (the delivery arms none while its email is on
    its way: a run would only find the email missing) is armed for its own time, CANCEL_DELAY
    after the delivery. Returns how many it woke or armed."""
    rows = session.scalars(_SCHEDULED_OF_ORDER, {"order_id": order_id}).all()
    for row in rows:
        held = row.last_error is not None and row.last_error.startswith(WAITING_FOR_EMAIL)
        if held:
            row.next_attempt_at = min(row.next_attempt_at, now)
            row.updated_at = now
            jobs.defer(session, CANCEL_TASK, row.id)
            log.info("cancellation_woken_by_email", cancellation_id=row.id, order_id=order_id)
        else:
            delay = max(0.0, (row.next_attempt_at - now).total_seconds())
            jobs.defer(session, CANCEL_TASK, row.id, delay=delay)
    return len(rows)


@dataclass(frozen=True)
class _Claim:
    id: int
    order_id: str
    membership_id: str | None  # None: to be found by listing the customer's memberships
    generation: int
    attempts: int
    idempotency_key: str
    user_id: str | None = None
    plan_id: str | None = None
    checkout_configuration_id: str | None = None
    purchased_at: datetime | None = None  # `purchase_time` of the order, for the metrics

    @classmethod
    def of(cls, row: _Claimed, order: _Purchase) -> _Claim:
        """The claim of `row`, whose idempotency token is set, on its `order`."""
        assert row.idempotency_token is not None
        return cls(
            id=row.id,
            order_id=row.order_id,
            membership_id=row.membership_id,
            generation=row.generation,
            attempts=row.attempts,
            idempotency_key=idempotency_key(row.idempotency_token, row.generation),
            user_id=order.whop_user_id,
            plan_id=order.plan_id,
            checkout_configuration_id=order.checkout_configuration_id,
            purchased_at=purchase_time(order),
        )


MEMBERSHIP_SEARCH_PAGES = 5
CANCEL_REQUEST = "POST /memberships/{id}/cancel"
SEARCH_REQUEST = "GET /memberships (search by user and plan)"


def _record_attempt(
    session: Session,
    claim: _Claim,
    reply: WhopReply,
    check: WhopReply | None,
    request: str,
    now: datetime,
    attempts: int | None,
    result: str,
) -> None:
    """One call to Whop, as answered, for the purchase's timeline."""
    detail = reply.describe()
    if check is not None:
        detail += f"; read back: {check.describe()}"
    # A table statement built once: nothing reads the row back in this transaction, and the
    # ORM's unit of work would cost more than the insert.
    session.execute(
        _INSERT_ATTEMPT,
        {
            "cancellation_id": claim.id,
            "order_id": claim.order_id,
            "at": now,
            "generation": claim.generation,
            "attempt": attempts if attempts is not None else claim.attempts,
            "request": request,
            "membership_id": claim.membership_id,
            "idempotency_key": claim.idempotency_key if request == CANCEL_REQUEST else None,
            "http_status": reply.status,
            "outcome": classify(reply).value,
            "result": result,
            "detail": detail[:2000],
        },
    )


_INSERT_ATTEMPT = insert(cast(Table, CancellationAttempt.__table__))


class CancellationService:
    def __init__(
        self,
        database: Database,
        catalog: Catalog,
        jobs: Jobs,
        alerts: Alerts,
        clock: Clock,
        whop: Callable[[], AsyncWhopClient],
        *,
        owner: str,
        retry_schedule: Sequence[float],
        give_up_after: float,
        lease_seconds: float,
        membership_wait: float,
        version_date: str | None,
        company_id: str | None = None,
        unapplied_facts: UnappliedFacts | None = None,
    ) -> None:
        self._database = database
        self._unapplied_facts = unapplied_facts
        self._catalog = catalog
        self._jobs = jobs
        self._alerts = alerts
        self._clock = clock
        self._whop = whop
        self._owner = owner
        self._schedule = list(retry_schedule)
        self._give_up_after = give_up_after
        self._lease = lease_seconds
        self._membership_wait = membership_wait
        self._version_date = version_date
        self._company_id = company_id

    # The job --------------------------------------------------------------------------------

    def run(self, cancellation_id: int, *, wait_for_email: bool = True) -> None:
        """The `cancellation.run` job, done in this thread now (tests, the `cancel` command, a
        process without a dispatcher): safe to run any number of times, anywhere."""

        async def alone() -> None:
            client = self._whop()
            try:
                await self.attempt(cancellation_id, client, inline, wait_for_email=wait_for_email)
            finally:
                await client.aclose()

        run_to_end(alone)

    async def attempt(
        self,
        cancellation_id: int,
        client: AsyncWhopClient,
        offload: Offload,
        *,
        wait_for_email: bool = True,
    ) -> None:
        """One attempt: lease the row, call Whop (each call waits its turn under the shared
        rate limit, holding no thread), record the answer. `offload` runs the database work
        (a thread pool in the dispatcher, inline when run alone)."""
        claim = await offload(partial(self._claim, cancellation_id, wait_for_email))
        if claim is None:
            return
        log.info(
            "cancel_attempt",
            cancellation_id=claim.id,
            order_id=claim.order_id,
            membership_id=claim.membership_id,
            generation=claim.generation,
            attempt=claim.attempts + 1,
        )
        if claim.membership_id is None:
            found = await self._find_membership(client, claim)
            if isinstance(found, WhopReply):  # listing failed: retry, pause or wait as usual
                await offload(partial(self._record, claim, found, None, request=SEARCH_REQUEST))
                return
            if found is None:
                await offload(partial(self._fail_unresolved, claim))
                return
            claim = replace(claim, membership_id=found)
        assert claim.membership_id is not None
        api = client.api
        reply = await client.send(api.cancel_membership(claim.membership_id, claim.idempotency_key))
        check: WhopReply | None = None
        outcome = classify(reply)
        unreadable = reply.membership_status is None or reply.membership_id is None
        if outcome is Outcome.CONFLICT or (
            outcome is Outcome.SUCCESS
            and unreadable
            and _other_membership(reply, claim.membership_id) is None
        ):
            check = await client.send(api.retrieve_membership(claim.membership_id))
        await offload(partial(self._record, claim, reply, check, request=CANCEL_REQUEST))

    async def _find_membership(
        self, client: AsyncWhopClient, claim: _Claim
    ) -> str | WhopReply | None:
        """The membership of this purchase, from the customer's memberships of the plan: only
        one whose checkout configuration or `metadata.order_id` is this order's counts."""
        if claim.user_id is None or claim.plan_id is None:
            return None
        if self._version_date is None and self._company_id is None:
            return None  # the legacy list needs company_id
        matches: list[str] = []
        cursor: str | None = None
        for _ in range(MEMBERSHIP_SEARCH_PAGES):
            page = await client.send(
                client.api.list_memberships(
                    company_id=self._company_id,
                    first=50,
                    after=cursor,
                    user_id=claim.user_id,
                    plan_id=claim.plan_id,
                )
            )
            if not page.ok:
                return page
            for item in page.items:
                metadata = item.get("metadata") if isinstance(item.get("metadata"), dict) else {}
                same_checkout = (
                    claim.checkout_configuration_id is not None
                    and item.get("checkout_configuration_id") == claim.checkout_configuration_id
                )
                same_order = (metadata or {}).get("order_id") == claim.order_id
                if (same_checkout or same_order) and isinstance(item.get("id"), str):
                    matches.append(item["id"])
            cursor = page.next_cursor
            if cursor is None:
                break
        log.info(
            "membership_search",
            cancellation_id=claim.id,
            order_id=claim.order_id,
            user_id=claim.user_id,
            plan_id=claim.plan_id,
            matches=len(matches),
        )
        return matches[0] if len(set(matches)) == 1 else None

    def _fail_unresolved(self, claim: _Claim) -> None:
        now = self._clock.now()
        with self._database.transaction() as session:
            row = session.get(Cancellation, claim.id, with_for_update=True)
            if row is None or row.status != Status.RUNNING.value or row.lease_owner != self._owner:
                return
            order = session.get(Order, row.order_id)
            assert order is not None
            reason = "no membership of this customer on this plan names its checkout or order"
            if self._version_date is None and self._company_id is None:
                reason = "set WHOP_COMPANY_ID so the customer's memberships can be listed"
            if claim.user_id is None:
                reason = "the payment named no Whop user to search by"
            self._fail(
                session,
                row,
                order,
                now,
                f"Whop never told us the membership id of this purchase ({reason})",
            )

    def _claim(self, cancellation_id: int, wait_for_email: bool = True) -> _Claim | None:
        """Lease a due row and decide whether to call Whop now. `wait_for_email`: hold the row
        while its order's delivery email is not accepted (False: an admin's `cancel`)."""
        now = self._clock.now()
        # Not flushed to disk: lost to a power cut, the row is claimed again and the call made
        # with the same idempotency key (see `Database.transaction`).
        with self._database.transaction(durable=False) as session:
            taken = session.execute(
                _CLAIM,
                {
                    "cancellation_id": cancellation_id,
                    "now": now,
                    "owner": self._owner,
                    "new_lease": now + timedelta(seconds=self._lease),
                },
            )
            if taken.rowcount != 1:  # type: ignore[attr-defined]
                return None  # final, not due yet, or leased by another worker
            seen = session.execute(_CLAIMED, {"cancellation_id": cancellation_id}).one()
            claim = self._claim_as_read(session, seen, now, wait_for_email)
            if claim is not None:
                return claim
            return self._claim_row(session, cancellation_id, now, wait_for_email)

    def _claim_as_read(
        self, session: Session, seen: Row[*tuple[Any, ...]], now: datetime, wait_for_email: bool
    ) -> _Claim | None:
        """The claim of a row that goes to Whop as it is, decided from one read of it and its
        order (`_CLAIMED`): the usual case, with nothing to write. None when `_claim_row` must
        decide, because the row waits, is skipped, has no membership id yet or changes."""
        if seen.order_found is None or seen.membership_id is None:
            return None
        if seen.idempotency_token is None:  # (a row made before tokens existed)
            return None
        if seen.last_error is not None and seen.last_error.startswith(WAITING_FOR_EMAIL):
            return None  # (its wait ends now, and its give-up time counts from here)
        if self._facts_unapplied(
            session, seen.whop_payment_id, seen.membership_id, seen.whop_membership_id
        ):
            return None
        if self._refusal(seen.order_status, seen.plan_id, seen.billing_reason) is not None:
            return None
        if wait_for_email and _holds_for_email(bool(seen.emails_queued), bool(seen.email_accepted)):
            return None  # (`_claim_row` holds it for as long as `_email_hold` says)
        if _in_force(seen.stopped_until, now) is not None:
            return None  # (`_claim_row` reschedules it)
        return _Claim.of(seen, seen)  # (the row and its order's columns, in one)

    def _claim_row(
        self, session: Session, cancellation_id: int, now: datetime, wait_for_email: bool
    ) -> _Claim | None:
        """The claim decided on the row and its order as objects: waits, skips, the membership
        id, a stop. Returns the claim, or None when the row does not go to Whop now."""
        row = session.get(Cancellation, cancellation_id)
        assert row is not None
        order = session.get(Order, row.order_id)
        if order is not None and self._waits_for_facts(session, row, order, now):
            return None
        reason = self._skip_reason(order)
        if reason is not None:
            self._finish(session, row, Status.SKIPPED, now, reason)
            log.info(
                "cancellation_skipped",
                cancellation_id=row.id,
                order_id=row.order_id,
                reason=reason,
            )
            return None
        assert order is not None
        if self._held_for_email(session, row, order, now, wait_for_email):
            return None
        row.membership_id = row.membership_id or order.whop_membership_id
        if row.membership_id is None:
            waited = (now - row.generation_started_at).total_seconds()
            if waited < self._membership_wait:  # membership.activated usually brings it
                self._reschedule(
                    session, row, now, min(self._schedule[-1], self._membership_wait - waited)
                )
                return None
        not_before = _stopped_until(session, now)
        if not_before is not None:
            self._reschedule(session, row, now, (not_before - now).total_seconds(), jitter=0.1)
            return None
        if row.idempotency_token is None:  # a row made before tokens existed
            row.idempotency_token = new_idempotency_token()
        return _Claim.of(row, order)

    def _waits_for_facts(
        self, session: Session, row: Cancellation, order: Order, now: datetime
    ) -> bool:
        """Whop told of this purchase in a webhook that is stored but not applied yet (a refund
        or a dispute, say): apply what Whop said first, then decide. The row waits, spending
        no attempt, and looks again shortly (the apply job is queued with the event)."""
        if not self._facts_unapplied(
            session, order.whop_payment_id, row.membership_id, order.whop_membership_id
        ):
            return False
        if row.last_error != WAITING_FOR_WEBHOOKS:
            log.info(
                "cancellation_waits_for_webhooks", cancellation_id=row.id, order_id=row.order_id
            )
        row.last_error = WAITING_FOR_WEBHOOKS
        self._reschedule(session, row, now, FACTS_WAIT, jitter=0.1)
        return True

    def _facts_unapplied(self, session: Session, *ids: str | None) -> bool:
        """Whether a stored webhook not applied yet names one of these ids (a payment's, a
        membership's) and could change the decision (a refund, a dispute)."""
        named = [i for i in ids if i]
        return (
            self._unapplied_facts is not None
            and bool(named)
            and self._unapplied_facts(session, named)
        )

    def _held_for_email(
        self, session: Session, row: Cancellation, order: Order, now: datetime, wait: bool
    ) -> bool:
        """The product reaches the customer by email: no cancel before the SMTP server has
        accepted one of the order's delivery emails. Held rows stay `scheduled` and spend no
        attempt; they are checked again at the email's next try (woken at once when it is
        sent, see `wake_after_email`) or, when every one failed for good, parked at the last
        retry interval until `orders resend` (or an admin's `cancel`: `wait` False)."""
        hold = (
            _email_hold(session, order.id, order.whop_membership_id, now, self._schedule[-1])
            if wait
            else None
        )
        if hold is None:
            if row.last_error is not None and row.last_error.startswith(WAITING_FOR_EMAIL):
                row.last_error = None
                # Whop's give-up time (and the membership wait) count from here, not from the
                # delivery: the wait for the email was not Whop's.
                row.generation_started_at = now
            return False
        delay, reason = hold
        if reason != row.last_error:
            log.info(
                "cancellation_waits_for_email",
                cancellation_id=row.id,
                order_id=row.order_id,
                reason=reason,
            )
        row.last_error = reason
        self._reschedule(session, row, now, delay, jitter=0.1)
        return True

    def _skip_reason(self, order: Order | None) -> str | None:
        if order is None:
            return "the order no longer exists"
        return self._refusal(order.status, order.plan_id, order.billing_reason)

    def _refusal(self, status: str, plan_id: str | None, billing_reason: str | None) -> str | None:
        """Why an order with these facts must not have its membership cancelled, if it must
        not: refunded or disputed, its plan not listed or delivery-only, not a one-time sale."""
        if status in (OrderStatus.REFUNDED.value, OrderStatus.DISPUTED.value):
            return f"the order is {status}"
        plan = self._catalog.get(plan_id)
        if plan is None:
            return f"plan {plan_id} is no longer listed in the catalog"
        if not plan.cancel:
            return f"plan {plan_id} is delivery-only (cancel = false)"
        if billing_reason != ONE_TIME:
            return f"billing reason '{billing_reason}' is not a one-time purchase"
        return None

    def _record(
        self, claim: _Claim, reply: WhopReply, check: WhopReply | None, *, request: str
    ) -> None:
        now = self._clock.now()
        # Not flushed to disk: an answer lost to a power cut is asked for again, with the same
        # idempotency key, and Whop answers it the same (see `Database.transaction`).
        with self._database.transaction(durable=False) as session:
            if self._end_at_once(session, claim, reply, check, now, request):
                return
            row = session.get(Cancellation, claim.id, with_for_update=True)
            if row is None or row.status != Status.RUNNING.value or row.lease_owner != self._owner:
                log.warning(
                    "cancellation_lease_lost", cancellation_id=claim.id, order_id=claim.order_id
                )
                _record_attempt(session, claim, reply, check, request, now, None, "lease lost")
                return
            order = session.get(Order, row.order_id)
            assert order is not None
            earlier_ours = ours_may_have_acted(row)  # before this answer is counted
            row.membership_id = row.membership_id or claim.membership_id  # found by listing
            outcome = classify(reply)
            if outcome is not Outcome.THROTTLED or row.attempts == 0:
                row.last_http_status = reply.status  # a 429 keeps the last attempt's status
            if outcome is not Outcome.THROTTLED:  # a 429 costs no attempt
                row.attempts += 1
            if outcome in (Outcome.CONFIGURATION, Outcome.CONFLICT, Outcome.PERMANENT):
                # A definite refusal, which Whop may have stored under the key: the next
                # attempt is a new request, so the stored refusal can never block it.
                row.idempotency_token = new_idempotency_token()
            if outcome is Outcome.SUCCESS:
                self._after_success(session, row, order, now, claim, reply, check)
            elif outcome is Outcome.CONFLICT:
                self._after_conflict(session, row, order, now, reply, check, earlier_ours)
            elif outcome is Outcome.PERMANENT:
                self._fail(
                    session,
                    row,
                    order,
                    now,
                    f"Whop has no membership {row.membership_id} for this API key "
                    f"({reply.describe()})",
                )
            elif outcome is Outcome.CONFIGURATION:
                self._pause_for_auth(session, row, now, reply)
            elif outcome is Outcome.THROTTLED:
                self._throttled(session, row, now, reply)
            else:
                self._retry(session, row, order, now, reply.describe())
            _record_attempt(session, claim, reply, check, request, now, row.attempts, row.status)

    def _end_at_once(
        self,
        session: Session,
        claim: _Claim,
        reply: WhopReply,
        check: WhopReply | None,
        now: datetime,
        request: str,
    ) -> bool:
        """Whop's plain success, the usual answer: the 2xx (or its re-read) shows our
        membership ended. Recorded as the full path records it (`_after_success`, `_succeed`)
        with one UPDATE of the row this worker holds, no read of it or its order. False when
        the answer is anything else or the lease was lost: the full path decides."""
        ours = claim.membership_id
        if ours is None or classify(reply) is not Outcome.SUCCESS:
            return False
        other, reading = _success_reading(reply, check, ours)
        if other is not None or reading not in INACTIVE_STATUSES:
            return False
        status = Status.CANCELED if reading == "canceled" else Status.ALREADY_INACTIVE
        ended = session.execute(
            _ENDED[status],
            {
                "cancellation_id": claim.id,
                "owner": self._owner,
                "http_status": reply.status,
                "membership_id": ours,
                "now": now,
            },
        )
        if ended.rowcount != 1:  # type: ignore[attr-defined]
            return False
        attempts = claim.attempts + 1  # (the lease kept anyone else from counting one)
        started = claim.purchased_at if status is Status.CANCELED else None
        seconds = (now - started).total_seconds() if started is not None else None
        after_commit(
            session, lambda: metrics.observe_cancellation_end(status.value, attempts, seconds)
        )
        self._ended_well(session, now, status, claim.id, claim.order_id, ours)
        _record_attempt(session, claim, reply, check, request, now, attempts, status.value)
        return True

    # Outcomes -------------------------------------------------------------------------------

    def _after_success(
        self,
        session: Session,
        row: Cancellation,
        order: Order,
        now: datetime,
        claim: _Claim,
        reply: WhopReply,
        check: WhopReply | None,
    ) -> None:
        """A 2xx: the membership in the body (or the re-read) must be ours, and canceled."""
        ours = claim.membership_id
        assert ours is not None
        other, status = _success_reading(reply, check, ours)
        if other is not None:
            self._fail_for_another(session, row, order, now, *other)
            return
        if status is None:
            self._retry(
                session,
                row,
                order,
                now,
                "Whop answered without a readable membership; will check again",
            )
        elif status == "canceled":
            self._succeed(session, row, now, Status.CANCELED)
        elif status in INACTIVE_STATUSES:
            self._succeed(session, row, now, Status.ALREADY_INACTIVE)
        else:
            period_end = (
                isinstance(reply.body, dict) and reply.body.get("cancel_at_period_end") is True
            )
            self._fail(
                session,
                row,
                order,
                now,
                f"Whop accepted the cancel but the membership is still '{status}'"
                + (" (only flagged to cancel at period end)" if period_end else "")
                + ": the cancel did not take effect",
            )

    def _fail_for_another(
        self,
        session: Session,
        row: Cancellation,
        order: Order,
        now: datetime,
        call: str,
        other: str,
    ) -> None:
        """Whop answered for a membership we did not ask about: nothing is known about ours."""
        self._fail(
            session,
            row,
            order,
            now,
            f"Whop answered our {call} of membership {row.membership_id} for another "
            f"membership ({other}), so whether {row.membership_id} is cancelled is unknown; "
            "check both in the Whop dashboard",
        )

    def _after_conflict(
        self,
        session: Session,
        row: Cancellation,
        order: Order,
        now: datetime,
        reply: WhopReply,
        check: WhopReply | None,
        earlier_ours: bool,
    ) -> None:
        if check is None or classify(check) is not Outcome.SUCCESS:
            detail = check.describe() if check else "no re-read"
            self._retry(
                session,
                row,
                order,
                now,
                f"{reply.describe()}; re-reading the membership failed ({detail})",
            )
            return
        other = _other_membership(check, row.membership_id)
        if other is not None:
            self._fail_for_another(session, row, order, now, "re-read", other)
            return
        status = check.membership_status
        if status == "canceled" and earlier_ours:
            # Whop refuses a second cancel: the first was our earlier call, whose answer we lost.
            row.last_error = (
                "Whop reported the membership canceled after our cancel call whose answer was "
                f"lost (then {reply.describe()})"
            )
            self._succeed(session, row, now, Status.CANCELED)
            return
        if status in INACTIVE_STATUSES:
            self._succeed(session, row, now, Status.ALREADY_INACTIVE)
            return
        self._fail(
            session,
            row,
            order,
            now,
            f"Whop refused the cancel ({reply.describe()}) and the membership is still '{status}'",
        )

    def _succeed(
        self, session: Session, row: Cancellation, now: datetime, status: CancellationStatus
    ) -> None:
        row.canceled_at = now if status is Status.CANCELED else row.canceled_at
        self._finish(session, row, status, now, None)
        self._ended_well(session, now, status, row.id, row.order_id, row.membership_id)

    def _ended_well(
        self,
        session: Session,
        now: datetime,
        status: CancellationStatus,
        cancellation_id: int,
        order_id: str,
        membership_id: str | None,
    ) -> None:
        """Whop answered: the membership is gone. Its incidents of an unreachable or refusing
        Whop end, and the log says so."""
        self._alerts.resolve_incidents(
            session, [AlertKind.WHOP_UNREACHABLE, AlertKind.WHOP_AUTH], now
        )
        log.info(
            "cancelled" if status is Status.CANCELED else "cancellation_already_inactive",
            cancellation_id=cancellation_id,
            order_id=order_id,
            membership_id=membership_id,
        )

    def _retry(
        self, session: Session, row: Cancellation, order: Order, now: datetime, error: str
    ) -> None:
        row.last_error = error
        elapsed = (now - row.generation_started_at).total_seconds()
        if elapsed >= self._give_up_after:
            self._fail(
                session,
                row,
                order,
                now,
                f"Whop could not be reached for {elapsed / 3600:.1f} h; last error: {error}",
            )
            return
        delay = self._schedule[min(row.attempts - 1, len(self._schedule) - 1)]
        log.warning(
            "cancel_retry",
            cancellation_id=row.id,
            order_id=row.order_id,
            membership_id=row.membership_id,
            attempt=row.attempts,
            error=error,
            retry_in=delay,
        )
        if row.attempts >= len(self._schedule):
            self._alerts.open_incident(
                session,
                AlertKind.WHOP_UNREACHABLE,
                AlertContent(
                    subject="Whop cannot be reached: membership cancellations are delayed",
                    summary=(
                        "Cancelling memberships through the Whop API keeps failing "
                        f"({error}). Nothing is lost: every cancellation keeps retrying every "
                        f"{self._schedule[-1]:g} s for up to {self._give_up_after / 3600:g} h. "
                        "You will get one more alert per membership only if it finally fails."
                    ),
                    details=[
                        ("First affected order", order.id),
                        ("Membership", row.membership_id or "-"),
                    ],
                    steps=[
                        "Check https://status.whop.com and this server's network access to "
                        "api.whop.com.",
                        "No action is needed if Whop recovers: the cancellations resume by "
                        "themselves.",
                    ],
                ),
                now,
            )
        self._reschedule(session, row, now, delay, jitter=0.1)

    def _throttled(
        self, session: Session, row: Cancellation, now: datetime, reply: WhopReply
    ) -> None:
        """A 429 costs no attempt: the row waits out `Retry-After` (the client's pacer has
        already stopped every process until then and slowed the shared budget)."""
        wait = reply.retry_after
        if wait is None:
            wait = self._schedule[min(row.attempts, len(self._schedule) - 1)]
        row.last_error = reply.describe()
        log.warning(
            "whop_rate_limited", cancellation_id=row.id, order_id=row.order_id, retry_after=wait
        )
        self._reschedule(session, row, now, wait, jitter=0.1)

    def _pause_for_auth(
        self, session: Session, row: Cancellation, now: datetime, reply: WhopReply
    ) -> None:
        """401/403: nothing fails; the row pauses until the last retry interval. The stuck-work
        sweep raises one `whop_auth` alert listing every paused order (`alert_paused_for_auth`)."""
        permission = "membership:cancel (and member:basic:read, member:email:read)"
        if self._version_date:
            permission = "membership:cancel / member:manage"
        problem = (
            "the API key is invalid or revoked"
            if reply.status == 401
            else f"the API key lacks the {permission} permission"
        )
        row.last_error = f"{reply.describe()} — {problem}"
        log.error(
            "whop_auth_refused", cancellation_id=row.id, order_id=row.order_id, status=reply.status
        )
        self._reschedule(session, row, now, self._schedule[-1], jitter=0.1)

    def _fail(
        self, session: Session, row: Cancellation, order: Order, now: datetime, error: str
    ) -> None:
        self._finish(session, row, Status.FAILED, now, error)
        log.error(
            "cancellation_failed",
            cancellation_id=row.id,
            order_id=order.id,
            payment_id=order.whop_payment_id,
            membership_id=row.membership_id,
            error=error,
        )
        membership = row.membership_id or "(unknown: find it by the customer's email)"
        self._alerts.raise_once(
            session,
            AlertKind.CANCELLATION_FAILED,
            f"cancellation_failed:{row.id}:{row.generation}",
            AlertContent(
                subject=f"Cancel Whop membership {membership} by hand (order {order.id})",
                summary=(
                    "The product was delivered, but the Whop membership could not be "
                    f"cancelled automatically: {error}. Until it is cancelled the customer "
                    "cannot buy again."
                ),
                details=[
                    ("Order", order.id),
                    ("Customer", order.email or "unknown"),
                    ("Membership", membership),
                    ("Payment", order.whop_payment_id or "-"),
                    ("Plan", order.plan_id or "-"),
                    ("Error", error),
                    ("Cancellation", f"#{row.id}, attempt generation {row.generation}"),
                ],
                steps=[
                    "Log in to the Whop dashboard (https://whop.com/dashboard).",
                    f"Open Users → Memberships and search for {membership}"
                    + (f" or {order.email}" if order.email else "")
                    + ".",
                    "Cancel the membership immediately (not at the end of the period).",
                    f"Or, once the cause is fixed, run: whop-autocancel cancellations retry "
                    f"{row.id}",
                ],
            ),
            now,
            order_id=order.id,
        )

    # Helpers --------------------------------------------------------------------------------

    def _finish(
        self,
        session: Session,
        row: Cancellation,
        status: CancellationStatus,
        now: datetime,
        error: str | None,
    ) -> None:
        row.status = status.value
        row.last_error = error if error is not None else row.last_error
        row.lease_until = None
        row.lease_owner = None
        row.updated_at = now
        record_end(session, row, now)

    def _reschedule(
        self, session: Session, row: Cancellation, now: datetime, delay: float, jitter: float = 0.0
    ) -> None:
        if jitter:
            delay *= random.uniform(1 - jitter, 1 + jitter)
        delay = max(delay, 0.0)
        row.status = Status.SCHEDULED.value
        row.next_attempt_at = now + timedelta(seconds=delay)
        row.lease_until = None
        row.lease_owner = None
        row.updated_at = now
        self._jobs.defer(session, CANCEL_TASK, row.id, delay=delay)

    # Admin ----------------------------------------------------------------------------------

    def retry(self, session: Session, cancellation_id: int) -> Cancellation:
        """Schedule a failed (or skipped) cancellation again, as a new attempt generation."""
        row = session.get(Cancellation, cancellation_id, with_for_update=True)
        if row is None:
            raise RetryRefused(f"there is no cancellation #{cancellation_id}")
        if row.status not in (Status.FAILED.value, Status.SKIPPED.value):
            raise RetryRefused(
                f"cancellation #{cancellation_id} is {row.status}; only failed or skipped ones "
                "can be retried"
            )
        self._new_generation(session, row, "retried by an admin")
        return row

    def reopen(self, session: Session, cancellation_id: int, reason: str) -> bool:
        """A membership we believed inactive is live at Whop (the Whop sweep saw it): cancel
        it again, as a new generation. False when the row is not a finished success."""
        row = session.get(Cancellation, cancellation_id, with_for_update=True)
        if row is None or row.status not in (
            Status.CANCELED.value,
            Status.ALREADY_INACTIVE.value,
        ):
            return False
        self._new_generation(session, row, reason)
        return True

    def _new_generation(self, session: Session, row: Cancellation, reason: str) -> None:
        now = self._clock.now()
        _arm_again(row, now, now, reason)
        self._jobs.defer(session, CANCEL_TASK, row.id)


def _arm_again(row: Cancellation, at: datetime, now: datetime, reason: str) -> None:
    """Schedule a finished row again as a new attempt generation (a new Idempotency-Key, so a
    cached answer is never replayed); the caller wakes its job."""
    row.status = Status.SCHEDULED.value
    row.generation += 1
    row.generation_started_at = now
    row.attempts = 0
    row.next_attempt_at = at
    row.lease_until = None
    row.lease_owner = None
    row.last_error = reason
    row.updated_at = now
    log.info(
        "cancellation_scheduled_again",
        cancellation_id=row.id,
        order_id=row.order_id,
        generation=row.generation,
        reason=reason,
    )


def _stopped_until(session: Session, now: datetime) -> datetime | None:
    """When the stop every process keeps after a 429 (or an exhausted budget) ends, while one
    is in force; None when calls may go now."""
    return _in_force(leases.read_until(session, NOT_BEFORE_KEY), now)


def _success_reading(
    reply: WhopReply, check: WhopReply | None, ours: str
) -> tuple[tuple[str, str] | None, str | None]:
    """What a 2xx (and its re-read, if one was made) says: (the call and the membership it
    named, when that is not ours), and our membership's status (None: unreadable)."""
    for answer, call in ((reply, "cancel"), (check, "re-read")):
        other = _other_membership(answer, ours) if answer is not None else None
        if other is not None:
            return (call, other), None
    readings = [
        answer.membership_status
        for answer in (reply, check)
        if answer is not None and answer.ok and answer.membership_id == ours
    ]
    return None, next((value for value in readings if value is not None), None)


def _other_membership(reply: WhopReply, membership_id: str | None) -> str | None:
    """The membership a reply names when it is not the one we asked about (else None)."""
    named = reply.membership_id
    return named if named is not None and named != membership_id else None


def failed_cancellations(session: Session) -> list[tuple[Cancellation, Order]]:
    rows = session.execute(
        select(Cancellation, Order)
        .join(Order, Order.id == Cancellation.order_id)
        .where(Cancellation.status == Status.FAILED.value)
        .order_by(Cancellation.updated_at)
    )
    return [(cancellation, order) for cancellation, order in rows.all()]
