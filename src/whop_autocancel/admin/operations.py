"""Admin recovery operations behind the `orders`, `events list|replay|ignore` and `cancel`
commands (DESIGN §8). Functions of a session or a `Runtime`; nothing here prints."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from whop_autocancel.admin.audit import REFUSED, cli_actor, record
from whop_autocancel.cancellation.models import Cancellation, CancellationStatus
from whop_autocancel.cancellation.service import failed_cancellations, schedule_cancellation
from whop_autocancel.catalog import Catalog
from whop_autocancel.clock import format_utc
from whop_autocancel.delivery.service import Resent
from whop_autocancel.errors import WhopAutocancelError
from whop_autocancel.orders.models import Order, OrderStatus
from whop_autocancel.orders.service import ONE_TIME
from whop_autocancel.runtime import Runtime
from whop_autocancel.webhooks.models import EventStatus, WebhookEvent
from whop_autocancel.whop.payloads import PayloadError, parse_envelope

log = structlog.get_logger(__name__)

DEFAULT_LIMIT = 50
DONE = frozenset({CancellationStatus.CANCELED.value, CancellationStatus.ALREADY_INACTIVE.value})
# Tables an apply writes to that are bookkeeping, not the event's effect.
_BOOKKEEPING_TABLES = frozenset({"webhook_events", "locks"})


class OpsError(WhopAutocancelError):
    """An admin operation that cannot do what was asked; the message says why."""


class UnknownEvent(OpsError):
    """No stored webhook event has this id."""


class CancelRefused(OpsError):
    """The safety rule (DESIGN §1) or the order's state forbids this cancellation."""


# Listing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OrderListing:
    order: Order
    cancellation: Cancellation | None


def _status_value(value: str | None, allowed: type[OrderStatus] | type[EventStatus]) -> str | None:
    if value is None:
        return None
    valid = [member.value for member in allowed]
    if value not in valid:
        raise OpsError(f"unknown status {value!r}; valid statuses: {', '.join(valid)}")
    return value


def _check_limit(limit: int) -> None:
    if limit < 1:
        raise OpsError(f"limit must be at least 1, not {limit}")


def list_orders(
    session: Session,
    *,
    status: str | None = None,
    email: str | None = None,
    limit: int = DEFAULT_LIMIT,
) -> list[OrderListing]:
    """Orders newest first, each with its cancellation row if it has one. The email matches
    whatever its case."""
    wanted = _status_value(status, OrderStatus)
    _check_limit(limit)
    statement = select(Order, Cancellation).outerjoin(
        Cancellation, Cancellation.order_id == Order.id
    )
    if wanted is not None:
        statement = statement.where(Order.status == wanted)
    if email is not None and email.strip():
        statement = statement.where(func.lower(Order.email) == email.strip().lower())
    rows = session.execute(
        statement.order_by(Order.created_at.desc(), Order.id.desc()).limit(limit)
    ).all()
    return [OrderListing(order, cancellation) for order, cancellation in rows]


def list_events(
    session: Session,
    *,
    status: str | None = None,
    event_type: str | None = None,
    limit: int = DEFAULT_LIMIT,
) -> list[WebhookEvent]:
    """Stored webhook events, newest first."""
    wanted = _status_value(status, EventStatus)
    _check_limit(limit)
    statement = select(WebhookEvent)
    if wanted is not None:
        statement = statement.where(WebhookEvent.status == wanted)
    if event_type is not None and event_type.strip():
        statement = statement.where(WebhookEvent.type == event_type.strip())
    return list(
        session.scalars(
            statement.order_by(WebhookEvent.received_at.desc(), WebhookEvent.id.desc()).limit(limit)
        )
    )


# Events -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayResult:
    event_id: str
    event_type: str
    previous_status: str
    status: str
    attempts: int
    last_error: str | None
    changed_tables: tuple[str, ...]  # what applying it wrote (inbox and lock rows not counted)

    @property
    def failed(self) -> bool:
        return self.status == EventStatus.FAILED.value

    @property
    def changed(self) -> bool:
        return bool(self.changed_tables)


@contextmanager
def _written_tables(session: Session) -> Iterator[set[str]]:
    """Collect the tables whose rows a unit of work really inserted, changed or deleted (an
    attribute set to the value it already had is no change)."""
    tables: set[str] = set()

    def record(flushing: Session, _context: Any) -> None:
        # After a flush the session still lists what it flushed, with its history.
        touched = [
            *flushing.new,
            *flushing.deleted,
            *(row for row in flushing.dirty if flushing.is_modified(row)),
        ]
        tables.update(
            str(getattr(type(row), "__tablename__", type(row).__name__)) for row in touched
        )

    event.listen(session, "after_flush", record)
    try:
        yield tables
        session.flush()  # what is still pending counts too
    finally:
        event.remove(session, "after_flush", record)


def _locked_event(session: Session, event_id: str) -> WebhookEvent:
    stored = session.get(WebhookEvent, event_id, with_for_update=True)
    if stored is None:
        raise UnknownEvent(f"no event {event_id} (see `whop-autocancel events list`)")
    return stored


def replay_event(runtime: Runtime, event_id: str, *, actor: str | None = None) -> ReplayResult:
    """Apply a stored event again now, as if it had just arrived, whatever its status: the
    event row is locked, its stored body applied in one transaction, follow-up jobs enqueued
    after commit. Applying is idempotent, so replaying a handled event changes nothing."""

    def replay(session: Session) -> ReplayResult:
        now = runtime.clock.now()
        stored = _locked_event(session, event_id)
        previous = stored.status
        try:
            envelope = parse_envelope(stored.payload.encode("utf-8"))
        except PayloadError as error:
            raise OpsError(f"event {event_id}: its stored body cannot be read: {error}") from None
        with _written_tables(session) as tables:
            # The inbox's own apply-with-recording step, called on purpose although it is
            # protected: a replay must record exactly what ingest and the sweep record
            # (attempts, status, error, backoff, the keeps-failing alert).
            order_id = runtime.inbox._apply_recording(session, stored, envelope, now)
        failed = stored.status == EventStatus.FAILED.value
        record(
            session,
            at=now,
            actor=actor or cli_actor(),
            action="event.replay",
            target=stored.id,
            order_id=stored.order_id,
            detail=f"{stored.type}: {previous} -> {stored.status}",
        )
        log.info(
            "webhook_replayed",
            event_id=stored.id,
            type=stored.type,
            previous_status=previous,
            status=stored.status,
            attempt=stored.attempts,
            order_id=order_id,
        )
        return ReplayResult(
            event_id=stored.id,
            event_type=stored.type,
            previous_status=previous,
            status=stored.status,
            attempts=stored.attempts,
            last_error=stored.last_error,
            # A failed apply rolled back its savepoint: whatever it had flushed is gone.
            changed_tables=() if failed else tuple(sorted(tables - _BOOKKEEPING_TABLES)),
        )

    with refusals_audited(runtime, actor, "event.replay", event_id):
        return runtime.database.run(replay)


@dataclass(frozen=True)
class IgnoreResult:
    event_id: str
    event_type: str
    previous_status: str
    changed: bool  # False: it was ignored already


def ignore_event(runtime: Runtime, event_id: str, *, actor: str | None = None) -> IgnoreResult:
    """Mark a `failed` (or `received`) event `ignored`, so the sweep stops retrying it. A
    `handled` event was applied: ignoring it would hide that, so it is refused."""

    def ignore(session: Session) -> IgnoreResult:
        now = runtime.clock.now()
        stored = _locked_event(session, event_id)
        previous = stored.status
        if previous == EventStatus.HANDLED.value:
            raise OpsError(
                f"event {event_id} ({stored.type}) was handled"
                + (f" at {format_time(stored.handled_at)}" if stored.handled_at else "")
                + ": it was applied, so there is nothing to stop retrying"
            )
        if previous == EventStatus.IGNORED.value:
            return IgnoreResult(stored.id, stored.type, previous, changed=False)
        note = f"ignored by an admin at {format_time(now)} (it was {previous}"
        note += f": {stored.last_error})" if stored.last_error else ")"
        stored.status = EventStatus.IGNORED.value
        stored.last_error = note[:2000]
        stored.next_attempt_at = None
        record(
            session,
            at=now,
            actor=actor or cli_actor(),
            action="event.ignore",
            target=stored.id,
            order_id=stored.order_id,
            detail=f"{stored.type}: {previous} -> ignored",
        )
        log.warning("webhook_ignored_by_admin", event_id=stored.id, previous_status=previous)
        return IgnoreResult(stored.id, stored.type, previous, changed=True)

    with refusals_audited(runtime, actor, "event.ignore", event_id):
        return runtime.database.run(ignore)


# Manual cancellation ------------------------------------------------------------------------


@dataclass(frozen=True)
class CancelTarget:
    """What `cancel MEMBERSHIP` is about to act on (shown before asking for confirmation)."""

    membership_id: str
    order_id: str
    order_status: str
    plan_id: str | None
    plan_name: str | None
    email: str | None
    cancellation_id: int | None
    cancellation_status: str | None

    @property
    def already_done(self) -> bool:
        return self.cancellation_status in DONE


@dataclass(frozen=True)
class CancelResult:
    membership_id: str
    order_id: str
    cancellation_id: int
    action: str  # none | created | retried | brought_forward | running
    status: str
    generation: int
    attempts: int
    last_error: str | None
    last_http_status: int | None
    next_attempt_at: datetime

    @property
    def ok(self) -> bool:
        """Cancelled, already inactive, or still on its way (scheduled or running)."""
        return self.status in DONE or self.status in (
            CancellationStatus.SCHEDULED.value,
            CancellationStatus.RUNNING.value,
        )


def order_for_membership(session: Session, membership_id: str) -> Order | None:
    """The order of this Whop membership: the paid one (newest) if several name it; else the
    order whose cancellation found the membership by listing the customer's memberships."""
    orders = list(session.scalars(select(Order).where(Order.whop_membership_id == membership_id)))
    if orders:
        return max(orders, key=lambda o: (o.whop_payment_id is not None, o.created_at, o.id))
    return session.scalars(
        select(Order)
        .join(Cancellation, Cancellation.order_id == Order.id)
        .where(Cancellation.membership_id == membership_id)
        .order_by(Order.created_at.desc())
        .limit(1)
    ).first()


def refusal_reason(catalog: Catalog, order: Order) -> str | None:
    """Why the safety rule (DESIGN §1) forbids cancelling this order's membership, if it does:
    only one-time purchases of plans listed in the catalog (and not `cancel = false`)."""
    if order.status in (OrderStatus.REFUNDED.value, OrderStatus.DISPUTED.value):
        return f"the order is {order.status} (cancel it in the Whop dashboard if needed)"
    if order.status == OrderStatus.PENDING.value or order.whop_payment_id is None:
        return "the order has no recorded payment yet (it is pending)"
    plan = catalog.get(order.plan_id)
    if plan is None:
        return (
            f"plan {order.plan_id or '(unknown)'} is not listed in the catalog, and "
            "whop-autocancel never cancels memberships of unlisted plans"
        )
    if not plan.cancel:
        return f"plan {plan.plan_id} is delivery-only (cancel = false in the catalog)"
    if order.billing_reason != ONE_TIME:
        return (
            f"its payment's billing reason is '{order.billing_reason or 'unknown'}', not "
            f"'{ONE_TIME}': subscriptions are never cancelled"
        )
    return None


def _find(session: Session, catalog: Catalog, membership_id: str) -> tuple[Order, str | None]:
    """The order and, if the safety rule forbids the cancel, why."""
    order = order_for_membership(session, membership_id)
    if order is None:
        raise CancelRefused(
            f"no order has membership {membership_id}; whop-autocancel only cancels "
            "memberships of orders it knows (see `whop-autocancel orders`)"
        )
    return order, refusal_reason(catalog, order)


def _refused(membership_id: str, order: Order, reason: str) -> CancelRefused:
    return CancelRefused(
        f"membership {membership_id} (order {order.id}) not cancelled: {reason}; Whop was not "
        "called"
    )


def _cancellation_of(session: Session, order_id: str, *, lock: bool = False) -> Cancellation | None:
    statement = select(Cancellation).where(Cancellation.order_id == order_id)
    if lock:
        statement = statement.with_for_update()
    return session.scalars(statement).first()


def _names_another(membership_id: str, order: Order, row: Cancellation | None) -> str | None:
    """Why `cancel membership_id` must not act on this order: its cancellation row or the order
    itself names a different membership (acting would cancel, or report, that one)."""
    if row is not None and row.membership_id not in (None, membership_id):
        named = f"its cancellation #{row.id} names membership {row.membership_id}"
    elif order.whop_membership_id not in (None, membership_id):
        named = f"the order names membership {order.whop_membership_id}"
    else:
        return None
    hint = f" --email {order.email}" if order.email else ""
    return (
        f"{named}, not {membership_id}; find out which one is this buyer's "
        f"(`whop-autocancel orders{hint}`, the Whop dashboard) and cancel it in the dashboard"
    )


def cancel_target(runtime: Runtime, membership_id: str) -> CancelTarget:
    """Find what `cancel` would act on, and refuse now (before any confirmation) when the
    safety rule forbids it. Changes nothing."""
    membership_id = membership_id.strip()
    with runtime.database.transaction() as session:
        order, reason = _find(session, runtime.catalog, membership_id)
        row = _cancellation_of(session, order.id)
        other = _names_another(membership_id, order, row)
        if other is not None:
            raise _refused(membership_id, order, other)
        if reason is not None and not (row is not None and row.status in DONE):
            raise _refused(membership_id, order, reason)
        plan = runtime.catalog.get(order.plan_id)
        return CancelTarget(
            membership_id=membership_id,
            order_id=order.id,
            order_status=order.status,
            plan_id=order.plan_id,
            plan_name=plan.name if plan else None,
            email=order.email,
            cancellation_id=row.id if row else None,
            cancellation_status=row.status if row else None,
        )


def cancel_membership(
    runtime: Runtime, membership_id: str, *, actor: str | None = None
) -> CancelResult:
    """Cancel the membership of a known order now, recorded like any other cancellation: a
    new row, a retry (new generation) of a failed or skipped one, or a scheduled one brought
    forward; then run it in this process (the Whop call) and report the row's state. A
    membership already cancelled is reported without calling Whop."""
    membership_id = membership_id.strip()
    runtime.settings.require("WHOP_API_KEY")  # before anything changes
    with refusals_audited(runtime, actor, "membership.cancel", membership_id):
        cancellation_id, action = _cancel_now(runtime, membership_id, actor or cli_actor())
    # The admin's decision: no wait for the delivery email (e.g. it failed and the customer
    # got the product another way).
    if action != "none":
        runtime.cancellations.run(cancellation_id, wait_for_email=False)
    with runtime.database.transaction() as session:
        final = session.get(Cancellation, cancellation_id)
        assert final is not None
        return _result(membership_id, final, action)


def _cancel_now(runtime: Runtime, membership_id: str, actor: str) -> tuple[int, str]:
    now = runtime.clock.now()
    with runtime.database.transaction() as session:
        order, reason = _find(session, runtime.catalog, membership_id)
        row = _cancellation_of(session, order.id, lock=True)
        other = _names_another(membership_id, order, row)
        if other is not None:
            raise _refused(membership_id, order, other)
        if row is not None and row.status in DONE:
            return row.id, "none"
        if reason is not None:
            raise _refused(membership_id, order, reason)
        if row is None:
            row = schedule_cancellation(session, order, now, now) or _cancellation_of(
                session, order.id
            )
            assert row is not None
            action = "created"
        elif row.status in (CancellationStatus.FAILED.value, CancellationStatus.SKIPPED.value):
            row = runtime.cancellations.retry(session, row.id)
            action = "retried"
        elif row.status == CancellationStatus.SCHEDULED.value:
            row.next_attempt_at = now
            row.updated_at = now
            action = "brought_forward"
        else:  # running: a worker holds it; `run` takes it over only if its lease expired
            action = "running"
        cancellation_id = row.id
        log.info(
            "manual_cancel",
            cancellation_id=cancellation_id,
            order_id=order.id,
            membership_id=membership_id,
            action=action,
        )
        record(
            session,
            at=now,
            actor=actor,
            action="membership.cancel",
            target=membership_id,
            order_id=order.id,
            detail=f"cancellation #{cancellation_id}: {action}",
        )
    return cancellation_id, action


def _result(membership_id: str, row: Cancellation, action: str) -> CancelResult:
    return CancelResult(
        membership_id=row.membership_id or membership_id,
        order_id=row.order_id,
        cancellation_id=row.id,
        action=action,
        status=row.status,
        generation=row.generation,
        attempts=row.attempts,
        last_error=row.last_error,
        last_http_status=row.last_http_status,
        next_attempt_at=row.next_attempt_at,
    )


# Retry and resend ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryResult:
    cancellation_id: int
    order_id: str
    membership_id: str | None
    generation: int


def retry_cancellation(
    runtime: Runtime, cancellation_id: int, *, actor: str | None = None
) -> RetryResult:
    """Schedule a failed (or skipped) cancellation again as a new attempt generation; a
    worker runs it at once."""
    target = f"#{cancellation_id}"
    with (
        refusals_audited(runtime, actor, "cancellation.retry", target),
        runtime.database.transaction() as session,
    ):
        row = runtime.cancellations.retry(session, cancellation_id)
        record(
            session,
            at=runtime.clock.now(),
            actor=actor or cli_actor(),
            action="cancellation.retry",
            target=target,
            order_id=row.order_id,
            detail=f"generation {row.generation}, membership {row.membership_id}",
        )
        return RetryResult(row.id, row.order_id, row.membership_id, row.generation)


def failed_cancellation_ids(runtime: Runtime) -> list[int]:
    with runtime.database.transaction() as session:
        return [row.id for row, _ in failed_cancellations(session)]


def resend_delivery(runtime: Runtime, order_id: str, *, actor: str | None = None) -> Resent:
    """Queue the customer's delivery email again, with the same item or message."""
    with refusals_audited(runtime, actor, "delivery.resend", order_id):
        resent = runtime.delivery.resend(order_id)
    with runtime.database.transaction() as session:
        record(
            session,
            at=runtime.clock.now(),
            actor=actor or cli_actor(),
            action="delivery.resend",
            target=order_id,
            order_id=order_id,
            detail=f"{resent.summary} to {resent.to}",
        )
    return resent


@contextmanager
def refusals_audited(
    runtime: Runtime, actor: str | None, action: str, target: str
) -> Iterator[None]:
    """An operation refused (it raised a clear error and changed nothing) is audited too, in a
    transaction of its own."""
    try:
        yield
    except WhopAutocancelError as error:
        with runtime.database.transaction() as session:
            record(
                session,
                at=runtime.clock.now(),
                actor=actor or cli_actor(),
                action=action,
                target=target,
                order_id=None,
                outcome=REFUSED,
                detail=str(error),
            )
        raise


def format_time(moment: datetime | None) -> str:
    """A stored time as admins read it everywhere (`2026-12-05T06:12:03Z`); `-` when there is
    none."""
    return format_utc(moment) if moment else "-"
