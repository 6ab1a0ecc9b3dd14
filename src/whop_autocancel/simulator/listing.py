"""List endpoints: query parameters, filters and Relay cursor pagination (WHOP.md §2, §7).

Pure functions over records; the caller holds the simulator's lock. Invalid input raises
`BadRequest`, which the API answers as a 400 with Whop's error body.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar
from urllib.parse import parse_qsl

from whop_autocancel.simulator.records import MembershipRecord, PaymentRecord
from whop_autocancel.simulator.shapes import JSON

T = TypeVar("T")
SortKey = tuple[int, float | str, int]

DEFAULT_PAGE_SIZE = 10
MAX_PAGE_SIZE = 100

MEMBERSHIP_STATUSES = frozenset(
    {
        "trialing",
        "active",
        "past_due",
        "completed",
        "canceled",
        "expired",
        "unresolved",
        "drafted",
        "canceling",
    }
)
#: Versioned-only derived buckets (SDK 2.6 `ListMembershipsRequestStatus`).
MEMBERSHIP_BUCKETS = frozenset(
    {"canceling", "paused", "expiring", "one_time", "unclaimed", "banned"}
)
PAYMENT_STATUSES = frozenset(
    {"draft", "open", "authorized", "paid", "pending", "uncollectible", "unresolved", "void"}
)
BILLING_REASONS = frozenset(
    {
        "one_time",
        "subscription_create",
        "subscription_cycle",
        "subscription_update",
        "subscription",
        "manual",
    }
)
_LIVE_GRANTING = frozenset({"active", "trialing", "past_due"})


class BadRequest(Exception):
    """The request is invalid; `message` is what the 400 says."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Query:
    """A parsed query string; array parameters repeat the key, as `name` or `name[]`."""

    pairs: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, raw: str) -> Query:
        return cls(tuple(parse_qsl(raw, keep_blank_values=True)))

    def values(self, *names: str) -> list[str]:
        """Every value given for any of `names` (each also in its `name[]` spelling)."""
        wanted = set(names) | {f"{name}[]" for name in names}
        return [value for key, value in self.pairs if key in wanted and value != ""]

    def one(self, name: str) -> str | None:
        """The last value given for `name`, or None."""
        found = self.values(name)
        return found[-1] if found else None

    def as_dict(self) -> dict[str, list[str]]:
        """Every parameter with all its values (for the call log)."""
        result: dict[str, list[str]] = {}
        for key, value in self.pairs:
            result.setdefault(key, []).append(value)
        return result


# ----- pagination ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Page:
    """Relay pagination arguments: `first`/`after` or `last`/`before`."""

    first: int | None
    after: SortKey | None
    last: int | None
    before: SortKey | None


def _size(query: Query, name: str) -> int | None:
    text = query.one(name)
    if text is None:
        return None
    try:
        size = int(text)
    except ValueError:
        raise BadRequest(f"{name} must be an integer") from None
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise BadRequest(f"{name} must be between 1 and {MAX_PAGE_SIZE}")
    return size


def encode_cursor(order: str, key: SortKey) -> str:
    """An opaque cursor: the sort order and the item's position in it."""
    raw = json.dumps([order, *key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(order: str, cursor: str | None) -> SortKey | None:
    """The position a cursor names; a cursor from another order or garbage is a 400."""
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError):
        raise BadRequest("Invalid cursor") from None
    if not isinstance(value, list) or len(value) != 4 or value[0] != order:
        raise BadRequest("Invalid cursor (it belongs to another list or order)")
    flag, sort_value, seq = value[1:]
    if (
        not isinstance(flag, int)
        or not isinstance(sort_value, int | float | str)
        or not isinstance(seq, int)
    ):
        raise BadRequest("Invalid cursor")
    return (flag, sort_value, seq)


def page_arguments(query: Query, order: str) -> Page:
    first, last = _size(query, "first"), _size(query, "last")
    if first is not None and last is not None:
        raise BadRequest("Pass either first or last, not both")
    if first is None and last is None:
        first = DEFAULT_PAGE_SIZE
    return Page(
        first=first,
        after=decode_cursor(order, query.one("after")),
        last=last,
        before=decode_cursor(order, query.one("before")),
    )


def _comes_before(a: SortKey, b: SortKey, descending: bool) -> bool:
    try:
        return a > b if descending else a < b
    except TypeError:
        raise BadRequest("Invalid cursor") from None


def paginate(
    items: Sequence[T],
    key: Callable[[T], SortKey],
    *,
    order: str,
    descending: bool,
    page: Page,
    render: Callable[[T], JSON],
) -> JSON:
    """`{"data": [...], "page_info": {...}}` for one page of `items` in the given order."""
    ordered = sorted(items, key=key, reverse=descending)
    keys = [key(item) for item in ordered]
    start, end = 0, len(ordered)
    if page.after is not None:
        after = page.after
        start = next(
            (i for i, k in enumerate(keys) if _comes_before(after, k, descending)), len(keys)
        )
    if page.before is not None:
        before = page.before
        end = next(
            (i for i, k in enumerate(keys) if not _comes_before(k, before, descending)), len(keys)
        )
        end = max(end, start)
    if page.last is not None:
        lo = max(start, end - page.last)
        has_previous, has_next = lo > start, end < len(ordered)
        start = lo
    else:
        size = page.first or DEFAULT_PAGE_SIZE
        hi = min(end, start + size)
        has_previous, has_next = start > 0, hi < end
        end = hi
    window = ordered[start:end]
    window_keys = keys[start:end]
    return {
        "data": [render(item) for item in window],
        "page_info": {
            "start_cursor": encode_cursor(order, window_keys[0]) if window else None,
            "end_cursor": encode_cursor(order, window_keys[-1]) if window else None,
            "has_next_page": has_next,
            "has_previous_page": has_previous,
        },
    }


def direction(query: Query) -> bool:
    """True for descending (the default, newest first)."""
    value = query.one("direction") or "desc"
    if value not in ("asc", "desc"):
        raise BadRequest("direction must be one of: asc, desc")
    return value == "desc"


def _time_key(moment: datetime | None, seq: int) -> SortKey:
    if moment is None:
        return (1, 0.0, seq)
    return (0, moment.timestamp(), seq)


def parse_time(name: str, text: str | None) -> datetime | None:
    """An ISO 8601 timestamp (naive means UTC) or Unix seconds; anything else is a 400."""
    if text is None:
        return None
    try:
        if text.lstrip("-").replace(".", "", 1).isdigit():
            return datetime.fromtimestamp(float(text), UTC)
        moment = datetime.fromisoformat(text)
    except (ValueError, OverflowError, OSError):
        raise BadRequest(f"{name} must be an ISO 8601 timestamp") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def created_window(query: Query) -> Callable[[datetime], bool]:
    """A predicate for `created_after` / `created_before` (both exclusive)."""
    after = parse_time("created_after", query.one("created_after"))
    before = parse_time("created_before", query.one("created_before"))

    def within(moment: datetime) -> bool:
        return (after is None or moment > after) and (before is None or moment < before)

    return within


def _checked(values: list[str], allowed: frozenset[str], name: str) -> set[str]:
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise BadRequest(
            f"Unknown {name} {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )
    return set(values)


# ----- memberships ---------------------------------------------------------------------------

MEMBERSHIP_ORDERS: dict[str, Callable[[MembershipRecord], SortKey]] = {
    "created_at": lambda m: _time_key(m.created_at, m.seq),
    "date_joined": lambda m: _time_key(m.created_at, m.seq),
    "canceled_at": lambda m: _time_key(m.canceled_at, m.seq),
    "id": lambda m: (0, m.id, m.seq),
    "status": lambda m: (0, m.status, m.seq),
    "total_spend": lambda m: (0, float(m.amount), m.seq),
}


def _membership_in_bucket(m: MembershipRecord, bucket: str) -> bool:
    """Versioned status semantics: live statuses exclude period-end cancels; buckets derive."""
    if bucket in _LIVE_GRANTING:
        return m.status == bucket and not m.cancel_at_period_end
    if bucket == "canceling":
        return m.cancel_at_period_end and m.status not in ("canceled", "expired")
    if bucket == "one_time":
        # A one-time purchase that never expires and still grants access.
        return m.status == "completed"
    if bucket in MEMBERSHIP_BUCKETS:  # paused, expiring, unclaimed, banned: none simulated
        return False
    return m.status == bucket


def membership_filter(query: Query, *, versioned: bool) -> Callable[[MembershipRecord], bool]:
    """A predicate for the filters of `GET /memberships` in the request's model."""
    allowed = MEMBERSHIP_STATUSES | MEMBERSHIP_BUCKETS if versioned else MEMBERSHIP_STATUSES
    statuses = _checked(query.values("status", "statuses"), allowed, "status")
    plans = set(query.values("plan_id", "plan_ids"))
    products = set(query.values("product_id", "product_ids"))
    users = set(query.values("user_id", "user_ids"))
    members = set(query.values("member_id", "member_ids"))
    promo_codes = query.values("promo_code_ids")
    cancel_options = query.values("cancel_options")
    within = created_window(query)

    def matches(m: MembershipRecord) -> bool:
        if promo_codes or cancel_options:  # the simulator applies no promo codes or options
            return False
        if statuses:
            if versioned and not any(_membership_in_bucket(m, s) for s in statuses):
                return False
            if not versioned and m.status not in statuses:
                return False
        return (
            (not plans or m.plan_id in plans)
            and (not products or m.product_id in products)
            and (not users or m.user.id in users)
            and (not members or m.member_id in members)
            and within(m.created_at)
        )

    return matches


def membership_order(query: Query, *, versioned: bool) -> str:
    order = query.one("order") or "created_at"
    allowed = ["created_at"] if versioned else sorted(MEMBERSHIP_ORDERS)
    if order not in allowed:
        raise BadRequest(f"order must be one of: {', '.join(allowed)}")
    return order


# ----- payments ------------------------------------------------------------------------------

PAYMENT_ORDERS: dict[str, Callable[[PaymentRecord], SortKey]] = {
    "created_at": lambda p: _time_key(p.created_at, p.seq),
    "paid_at": lambda p: _time_key(p.paid_at, p.seq),
    "id": lambda p: (0, p.id, p.seq),
}


def _billing_reason_matches(actual: str, wanted: set[str]) -> bool:
    if actual in wanted:
        return True
    if "subscription" in wanted and actual.startswith("subscription_"):
        return True
    # `subscription_cycle` also matches renewals recorded as `subscription_update`.
    return "subscription_cycle" in wanted and actual == "subscription_update"


def payment_filter(query: Query) -> Callable[[PaymentRecord], bool]:
    """A predicate for the filters of `GET /payments` (the same in both models)."""
    statuses = _checked(query.values("status", "statuses"), PAYMENT_STATUSES, "status")
    reasons = _checked(
        query.values("billing_reason", "billing_reasons"), BILLING_REASONS, "billing_reason"
    )
    plans = set(query.values("plan_id", "plan_ids"))
    products = set(query.values("product_id", "product_ids"))
    memberships = set(query.values("membership_id", "membership_ids"))
    users = set(query.values("user_id", "user_ids"))
    members = set(query.values("member_id", "member_ids"))
    currencies = {c.lower() for c in query.values("currency", "currencies")}
    within = created_window(query)

    def matches(p: PaymentRecord) -> bool:
        m = p.membership
        return (
            (not statuses or "paid" in statuses)  # every simulated payment is paid
            and (not reasons or _billing_reason_matches(m.billing_reason, reasons))
            and (not plans or m.plan_id in plans)
            and (not products or m.product_id in products)
            and (not memberships or m.id in memberships)
            and (not users or m.user.id in users)
            and (not members or m.member_id in members)
            and (not currencies or m.currency in currencies)
            and within(p.created_at)
        )

    return matches


def payment_order(query: Query) -> str:
    order = query.one("order") or "created_at"
    if order not in PAYMENT_ORDERS:
        raise BadRequest(f"order must be one of: {', '.join(sorted(PAYMENT_ORDERS))}")
    return order
