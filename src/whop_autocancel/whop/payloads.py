"""Both payload shapes (unpinned legacy and pinned versioned) normalised into small facts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar

from whop_autocancel.clock import parse_timestamp
from whop_autocancel.errors import WhopAutocancelError


class PayloadError(WhopAutocancelError):
    """The body is not a webhook envelope at all (answered 400, nothing stored)."""


class EventDataError(WhopAutocancelError):
    """A genuine event whose data lacks what applying it needs (stored `failed`)."""


@dataclass(frozen=True)
class Envelope:
    id: str
    type: str
    data: dict[str, Any]
    api_version_date: str | None

    @property
    def object_id(self) -> str | None:
        """What the event is about: `data.id` (the payment's, the membership's, …), read as
        the facts read it (a string, stripped); None when it is absent or not a string."""
        return _text(self.data.get("id"))


@dataclass(frozen=True)
class PaymentFacts:
    payment_id: str
    status: str | None
    billing_reason: str | None
    membership_id: str | None
    plan_id: str | None
    product_id: str | None
    user_id: str | None
    email: str | None
    checkout_configuration_id: str | None
    metadata: dict[str, Any]
    amount: str | None
    currency: str | None
    created_at: datetime | None
    paid_at: datetime | None
    # How much was refunded so far (legacy float, versioned Money object or null) as exact
    # text; None when nothing was (legacy 0.0, versioned null) or Whop says nothing.
    refunded_amount: str | None = None

    @property
    def order_id(self) -> str | None:
        return _text(self.metadata.get("order_id"))


@dataclass(frozen=True)
class MembershipFacts:
    membership_id: str
    status: str | None
    plan_id: str | None
    product_id: str | None
    user_id: str | None
    email: str | None
    checkout_configuration_id: str | None
    metadata: dict[str, Any]

    @property
    def order_id(self) -> str | None:
        return _text(self.metadata.get("order_id"))


@dataclass(frozen=True)
class ClaimFacts:
    """A refund or a dispute of a payment."""

    kind: str  # "refund" or "dispute"
    claim_id: str
    payment_id: str
    status: str | None
    amount: str | None
    reason: str | None


def claim_facts(event_type: str, data: dict[str, Any]) -> ClaimFacts:
    """Read `refund.*` / `dispute.*` data: the payment as `payment.id` or `payment_id`."""
    claim_id = _text(data.get("id"))
    payment_id = _nested_id(data, "payment")
    if claim_id is None or payment_id is None:
        raise EventDataError(f"{event_type} has no id or no payment id")
    facts = ClaimFacts(
        kind=event_type.partition(".")[0],
        claim_id=claim_id,
        payment_id=payment_id,
        status=_text(data.get("status")),
        amount=_amount(data.get("amount") or data.get("total")),
        reason=_text(data.get("reason")),
    )
    return _within_limits(facts)


def parse_envelope(body: bytes) -> Envelope:
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise PayloadError("body is not JSON") from None
    except RecursionError:
        raise PayloadError("body is nested too deeply") from None
    if not isinstance(document, dict):
        raise PayloadError("body is not a JSON object")
    event_id, event_type, data = document.get("id"), document.get("type"), document.get("data")
    if not isinstance(event_id, str) or not event_id:
        raise PayloadError("body has no string 'id'")
    if not isinstance(event_type, str) or not event_type:
        raise PayloadError("body has no string 'type'")
    if len(event_type) > MAX_TYPE_LENGTH:
        raise PayloadError(f"body's 'type' is longer than {MAX_TYPE_LENGTH} characters")
    if not isinstance(data, dict):
        raise PayloadError("body has no object 'data'")
    version = document.get("api_version_date")
    return Envelope(
        id=event_id,
        type=event_type,
        data=data,
        api_version_date=version if isinstance(version, str) else None,
    )


def payment_facts(data: dict[str, Any]) -> PaymentFacts:
    """Read a payment in either shape (`data.membership.id` / `data.membership_id`, …)."""
    payment_id = _text(data.get("id"))
    if payment_id is None:
        raise EventDataError("payment has no id")
    user = _object(data.get("user"))
    facts = PaymentFacts(
        payment_id=payment_id,
        status=_text(data.get("status")),
        billing_reason=_text(data.get("billing_reason")),
        membership_id=_nested_id(data, "membership"),
        plan_id=_nested_id(data, "plan"),
        product_id=_nested_id(data, "product"),
        user_id=_text(user.get("id")) or _text(data.get("user_id")),
        email=_email(data.get("customer_email")) or _email(user.get("email")),
        checkout_configuration_id=_text(data.get("checkout_configuration_id")),
        metadata=_object(data.get("metadata")),
        amount=_amount(data.get("total")),
        currency=_text(data.get("currency")),
        created_at=_time(data.get("created_at")),
        paid_at=_time(data.get("paid_at")),
        refunded_amount=_refunded(data.get("refunded_amount")),
    )
    return _within_limits(facts)


def membership_facts(data: dict[str, Any]) -> MembershipFacts:
    membership_id = _text(data.get("id"))
    if membership_id is None:
        raise EventDataError("membership has no id")
    user = _object(data.get("user"))
    facts = MembershipFacts(
        membership_id=membership_id,
        status=_text(data.get("status")),
        plan_id=_nested_id(data, "plan"),
        product_id=_nested_id(data, "product"),
        user_id=_text(user.get("id")) or _text(data.get("user_id")),
        email=_email(user.get("email")) or _email(data.get("customer_email")),
        checkout_configuration_id=_text(data.get("checkout_configuration_id")),
        metadata=_object(data.get("metadata")),
    )
    return _within_limits(facts)


# The longest value each fact may have: its database column (a longer one can never be stored,
# so the event is refused for good, not retried, and not answered 500).
MAX_TYPE_LENGTH = 100
FACT_LIMITS = {
    "payment_id": 64,
    "membership_id": 64,
    "plan_id": 64,
    "product_id": 64,
    "user_id": 64,
    "checkout_configuration_id": 64,
    "email": 320,
    "billing_reason": 40,
    "currency": 8,
    "amount": 32,
}
Facts = TypeVar("Facts", PaymentFacts, MembershipFacts, ClaimFacts)


def _within_limits(facts: Facts) -> Facts:
    for name, limit in FACT_LIMITS.items():
        value = getattr(facts, name, None)
        if isinstance(value, str) and len(value) > limit:
            raise EventDataError(f"{name} is longer than {limit} characters ({len(value)})")
    return facts


def _nested_id(data: dict[str, Any], name: str) -> str | None:
    """`data[name].id` (legacy) or `data[name + "_id"]` (versioned)."""
    nested = data.get(name)
    if isinstance(nested, dict):
        found = _text(nested.get("id"))
        if found:
            return found
    elif isinstance(nested, str) and nested:
        return nested  # v2-era payloads carry the bare id
    return _text(data.get(f"{name}_id"))


def _text(value: Any) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _email(value: Any) -> str | None:
    text = _text(value)
    return text.lower() if text and "@" in text else None


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _amount(value: Any) -> str | None:
    """Legacy floats (25.0) and versioned Money objects ({"amount": "25.00"}) as exact text."""
    if isinstance(value, dict):
        value = value.get("amount")
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        return None
    if not number.is_finite():
        return None
    return f"{number:.2f}"


def _refunded(value: Any) -> str | None:
    """A refunded amount above zero as exact text; zero, null or unreadable: None."""
    amount = _amount(value)
    return amount if amount is not None and Decimal(amount) > 0 else None


def _time(value: Any) -> datetime | None:
    try:
        return parse_timestamp(value)
    except (ValueError, OverflowError, OSError):
        raise EventDataError(f"unreadable timestamp {value!r}") from None
