"""The simulator's records: what Whop stores, before any JSON shape is applied (WHOP.md §2, §5, §6).

Plain dataclasses without behaviour; `Store` owns them and `shapes` renders them. Every record
carries `seq`, a store-wide creation counter that breaks ties between equal timestamps.
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

Shape = Literal["legacy", "pinned"]
PlanType = Literal["one_time", "renewal"]
PLAN_TYPES: tuple[PlanType, ...] = ("one_time", "renewal")
#: Statuses that no longer grant access: a cancel of these answers 409.
TERMINAL_STATUSES = frozenset({"canceled", "expired"})
#: The billing period of the simulator's renewal plans, in days.
RENEWAL_PERIOD_DAYS = 30

_ALPHANUM = string.ascii_letters + string.digits


def new_id(prefix: str, length: int = 14) -> str:
    """A Whop-style id: prefix + random alphanumerics."""
    return prefix + "".join(secrets.choice(_ALPHANUM) for _ in range(length))


def now(clock: Callable[[], datetime] | None = None) -> datetime:
    """UTC from `clock` (default: the wall clock), truncated to milliseconds like Whop's
    timestamps."""
    moment = clock() if clock is not None else datetime.now(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


@dataclass(frozen=True)
class Company:
    """The business that sells (`biz_…`)."""

    id: str
    title: str = "Sim Store"
    route: str = "sim-store"


@dataclass(frozen=True)
class UserRecord:
    """The buyer."""

    id: str
    username: str
    name: str
    email: str
    # False: Whop does not tell this buyer's email (an API key without member:email:read).
    email_visible: bool = True


@dataclass
class PlanRecord:
    """A plan ("variant") of a product: one-time or renewal, with its price."""

    seq: int
    id: str
    plan_type: PlanType
    product_id: str
    product_title: str
    title: str
    amount: Decimal
    currency: str
    company: Company
    created_at: datetime
    updated_at: datetime

    @property
    def billing_period_days(self) -> int | None:
        """Days between renewals; None for a one-time plan."""
        return RENEWAL_PERIOD_DAYS if self.plan_type == "renewal" else None


@dataclass
class CheckoutConfigurationRecord:
    """A checkout configuration (`ch_…`): a plan plus metadata copied to what it sells."""

    seq: int
    id: str
    plan: PlanRecord
    metadata: dict[str, Any]
    redirect_url: str | None
    mode: str
    purchase_url: str
    company: Company
    created_at: datetime
    updated_at: datetime


@dataclass
class MembershipRecord:
    """One membership and the purchase facts both shapes render from."""

    id: str
    status: str
    shape: Shape
    user: UserRecord
    member_id: str
    company: Company
    plan_id: str
    product_id: str
    product_title: str
    product_route: str
    amount: Decimal
    currency: str
    billing_reason: str
    metadata: dict[str, Any]
    checkout_configuration_id: str | None
    created_at: datetime
    updated_at: datetime
    billing_period_days: int | None = None
    period_end: datetime | None = None
    cancel_at_period_end: bool = False
    canceled_at: datetime | None = None
    cancellation_reason: str | None = None
    cancelation_status: str | None = None
    most_recent_action: str | None = None
    most_recent_action_at: datetime | None = None
    plan_title: str = "Lifetime"
    seq: int = 0


@dataclass
class PaymentRecord:
    """One paid payment, linked to the membership it created. A refund keeps it `paid` and
    sets `refunded_amount` (substatus `refunded` or `partially_refunded`), as Whop does."""

    id: str
    membership: MembershipRecord
    created_at: datetime
    paid_at: datetime
    updated_at: datetime
    fee: Decimal
    line_item_id: str
    hide_membership_id: bool = False
    seq: int = 0
    refunded_amount: Decimal = Decimal("0")
    refunded_at: datetime | None = None

    @property
    def substatus(self) -> str:
        if not self.refunded_amount:
            return "succeeded"
        full = self.refunded_amount >= self.membership.amount
        return "refunded" if full else "partially_refunded"
