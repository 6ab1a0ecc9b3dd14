"""The endpoints of the simulated `/api/v1` (WHOP.md §0, §2, §6, §7), after auth and faults.

`route` runs under the simulator's lock. A read answers at once; a write comes back as a
callable so that the caller can replay a stored answer for a repeated Idempotency-Key instead.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from whop_autocancel.simulator import listing, plan_shapes, shapes
from whop_autocancel.simulator.listing import BadRequest, Query
from whop_autocancel.simulator.records import TERMINAL_STATUSES, MembershipRecord
from whop_autocancel.simulator.shapes import JSON, error_body
from whop_autocancel.simulator.store import Store

DEFAULT_CANCEL_REASON = "Canceled via the API"

_MEMBERSHIP_PATH = re.compile(r"^/memberships/([^/]+)(/cancel)?/?$")
_PAYMENT_PATH = re.compile(r"^/payments/([^/]+)/?$")
_PLAN_PATH = re.compile(r"^/plans/([^/]+)/?$")
_CHECKOUT_PATH = re.compile(r"^/checkout_configurations/([^/]+)/?$")

#: The permissions an endpoint of ours can need (WHOP.md §1; the checkout ones are the
#: simulator's choice): a key without one is refused with 403 on the endpoints that need it.
PERMISSIONS = frozenset(
    {
        "member:basic:read",
        "membership:cancel",
        "payment:basic:read",
        "plan:basic:read",
        "checkout_configuration:create",
        "checkout_configuration:basic:read",
    }
)


def required_permission(method: str, sub_path: str) -> str | None:
    """The permission `method sub_path` needs (None: an unknown route, answered 404)."""
    path = sub_path.rstrip("/") or "/"
    if (m := _MEMBERSHIP_PATH.match(sub_path)) is not None:
        return "membership:cancel" if m.group(2) else "member:basic:read"
    if path == "/memberships":
        return "member:basic:read"
    if path == "/payments" or _PAYMENT_PATH.match(sub_path):
        return "payment:basic:read"
    if _PLAN_PATH.match(sub_path):
        return "plan:basic:read"
    if path == "/checkout_configurations":
        return "checkout_configuration:create"
    if _CHECKOUT_PATH.match(sub_path):
        return "checkout_configuration:basic:read"
    return None


@dataclass(frozen=True)
class ApiResponse:
    """Status and JSON body to send back; `delay` seconds to wait first (a simulated hang)."""

    status: int
    body: JSON
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


def error(status: int, message: str, code: str | None = None) -> ApiResponse:
    """An answer with Whop's error body."""
    return ApiResponse(status, error_body(status, message, code))


def ok(body: JSON) -> ApiResponse:
    return ApiResponse(200, body)


Routed = ApiResponse | Callable[[], ApiResponse]
R = TypeVar("R")


@dataclass
class Endpoints:
    """The API over one store. `forbidden` and `rejection` are faults that only cancel has;
    `read_rejection` refuses the reads of a membership, `answer_as` names the membership whose
    object answers a cancel or read of another (nothing changes), `plan_filter_ignored` one
    that only the membership list has; `missing_permission` tells whether the key lacks a
    permission (every endpoint that needs it answers 403, before looking at the ids)."""

    store: Store
    echo_cancel: Callable[[MembershipRecord, str], None]
    forbidden: Callable[[], bool]
    rejection: Callable[[str], int | None]
    read_rejection: Callable[[str], int | None] = lambda _membership_id: None
    answer_as: Callable[[str], str | None] = lambda _membership_id: None
    plan_filter_ignored: Callable[[], bool] = lambda: False
    missing_permission: Callable[[str], bool] = lambda _permission: False

    def route(
        self, method: str, sub_path: str, query: Query, body: Any, *, versioned: bool
    ) -> Routed:
        """The endpoint for `method sub_path`, or a 4xx answer."""
        try:
            return self._route(method, sub_path, query, body, versioned=versioned)
        except BadRequest as exc:
            return error(400, exc.message)

    def _route(
        self, method: str, sub_path: str, query: Query, body: Any, *, versioned: bool
    ) -> Routed:
        permission = required_permission(method, sub_path)
        if permission is not None and self.missing_permission(permission):
            return error(403, f"The API key lacks the {permission} permission")
        path = sub_path.rstrip("/") or "/"
        if method == "GET" and path == "/memberships":
            return self._list_memberships(query, versioned)
        if method == "GET" and path == "/payments":
            return self._list_payments(query, versioned)
        if method == "POST" and path == "/checkout_configurations":
            return self._checkout_request(body or {}, versioned)
        if (m := _MEMBERSHIP_PATH.match(sub_path)) is not None:
            mem_id, is_cancel = m.group(1), m.group(2) is not None
            if method == "GET" and not is_cancel:
                return self._retrieve_membership(mem_id, versioned)
            if method == "POST" and is_cancel:
                if self.forbidden():
                    return error(403, "The API key lacks the membership:cancel permission")
                immediate, reason = cancel_mode(body or {}, versioned=versioned)
                return functools.partial(self._cancel, mem_id, versioned, immediate, reason)
        if (p := _PAYMENT_PATH.match(sub_path)) is not None and method == "GET":
            pay = self.store.payments.get(p.group(1))
            if pay is None:
                return error(404, f"Payment {p.group(1)} not found")
            return ok(shapes.payment(pay, versioned=versioned))
        if (p := _PLAN_PATH.match(sub_path)) is not None and method == "GET":
            return self._retrieve_plan(p.group(1), versioned)
        if (c := _CHECKOUT_PATH.match(sub_path)) is not None and method == "GET":
            config = self.store.checkout_configurations.get(c.group(1))
            if config is None:
                return error(404, f"Checkout configuration {c.group(1)} not found")
            return ok(plan_shapes.checkout_configuration(config, versioned=versioned))
        return error(404, f"No route for {method} /api/v1{sub_path}")

    # ----- memberships -----------------------------------------------------------------------

    def _retrieve_membership(self, membership_id: str, versioned: bool) -> ApiResponse:
        mem = self.store.memberships.get(membership_id)
        if mem is None:
            return error(404, f"Membership {membership_id} not found")
        rejection = self.read_rejection(membership_id)
        if rejection is not None:
            return error(rejection, "This membership cannot be read right now")
        return ok(shapes.membership(self._answered_as(mem), versioned=versioned))

    def _answered_as(self, mem: MembershipRecord) -> MembershipRecord:
        """The membership whose object answers for `mem` (itself unless `answer_as` is set)."""
        other = self.answer_as(mem.id)
        return self.store.memberships[other] if other is not None else mem

    def _list_memberships(self, query: Query, versioned: bool) -> ApiResponse:
        if self.plan_filter_ignored():
            plan_keys = {"plan_id", "plan_ids", "plan_id[]", "plan_ids[]"}
            query = Query(tuple(pair for pair in query.pairs if pair[0] not in plan_keys))
        return self._list(
            query,
            versioned,
            self.store.memberships.values(),
            orders=listing.MEMBERSHIP_ORDERS,
            order=functools.partial(listing.membership_order, versioned=versioned),
            matches=functools.partial(listing.membership_filter, versioned=versioned),
            render=functools.partial(shapes.membership, versioned=versioned),
        )

    def _cancel(
        self, membership_id: str, versioned: bool, immediate: bool, reason: str | None
    ) -> ApiResponse:
        mem = self.store.memberships.get(membership_id)
        if mem is None:
            return error(404, f"Membership {membership_id} not found")
        rejection = self.rejection(membership_id)
        if rejection is not None:
            return error(rejection, "This membership cannot be canceled")
        if self.answer_as(membership_id) is not None:  # answered for another; nothing changes
            return ok(shapes.membership(self._answered_as(mem), versioned=versioned))
        if mem.status in TERMINAL_STATUSES:
            return error(409, "Membership is already canceled")
        moment = self.store.now()
        mem.updated_at = moment
        if not immediate:
            mem.cancel_at_period_end = True
            mem.cancelation_status = "canceling"
            return ok(shapes.membership(mem, versioned=versioned))
        old_status = mem.status
        mem.status = "canceled"
        mem.canceled_at = moment
        mem.cancellation_reason = reason or DEFAULT_CANCEL_REASON
        mem.cancel_at_period_end = False
        mem.cancelation_status = "left"
        mem.most_recent_action, mem.most_recent_action_at = "canceled_on", moment
        self.echo_cancel(mem, old_status)
        return ok(shapes.membership(mem, versioned=versioned))

    # ----- payments --------------------------------------------------------------------------

    def _list_payments(self, query: Query, versioned: bool) -> ApiResponse:
        return self._list(
            query,
            versioned,
            self.store.payments.values(),
            orders=listing.PAYMENT_ORDERS,
            order=listing.payment_order,
            matches=listing.payment_filter,
            render=functools.partial(shapes.payment, versioned=versioned),
        )

    # ----- plans and checkout configurations -------------------------------------------------

    def _retrieve_plan(self, plan_id: str, versioned: bool) -> ApiResponse:
        plan = self.store.plans.get(plan_id)
        if plan is None:
            return error(404, f"Plan {plan_id} not found")
        return ok(
            plan_shapes.plan(
                plan,
                versioned=versioned,
                purchase_url=self.store.purchase_url(plan.id),
                member_count=self.store.member_count(plan.id),
            )
        )

    def _checkout_request(self, body: Mapping[str, Any], versioned: bool) -> Routed:
        plan_id = body.get("plan_id")
        if body.get("plan") is not None:
            raise BadRequest("The simulator needs plan_id (inline plans are not simulated)")
        if not isinstance(plan_id, str) or not plan_id:
            raise BadRequest("plan_id is required")
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise BadRequest("metadata must be an object")
        redirect_url = body.get("redirect_url")
        if redirect_url is not None and not isinstance(redirect_url, str):
            raise BadRequest("redirect_url must be a string")
        mode = body.get("mode") or "payment"
        if mode != "payment":
            raise BadRequest("mode must be payment (setup mode is not simulated)")
        owner = body.get("account_id" if versioned else "company_id") or body.get(
            "company_id" if versioned else "account_id"
        )
        if owner is not None and owner != self.store.company.id:
            return error(403, f"The API key cannot act for {owner}")
        plan = self.store.plans.get(plan_id)
        if plan is None:
            return error(404, f"Plan {plan_id} not found")

        def create() -> ApiResponse:
            config = self.store.create_checkout_configuration(
                plan, metadata=metadata, redirect_url=redirect_url, mode=mode
            )
            return ok(plan_shapes.checkout_configuration(config, versioned=versioned))

        return create

    # ----- helpers ---------------------------------------------------------------------------

    def _list(
        self,
        query: Query,
        versioned: bool,
        records: Iterable[R],
        *,
        orders: Mapping[str, Callable[[R], listing.SortKey]],
        order: Callable[[Query], str],
        matches: Callable[[Query], Callable[[R], bool]],
        render: Callable[[R], JSON],
    ) -> ApiResponse:
        """A list endpoint: the owner check, then the query's order, filters and page of
        `records` (each read from the query by `order` and `matches`)."""
        owned = self._owner(query, versioned)
        if isinstance(owned, ApiResponse):
            return owned
        chosen = order(query)
        predicate = matches(query)
        page = listing.page_arguments(query, chosen)
        items = [r for r in records if owned and predicate(r)]
        return ok(
            listing.paginate(
                items,
                orders[chosen],
                order=chosen,
                descending=listing.direction(query),
                page=page,
                render=render,
            )
        )

    def _owner(self, query: Query, versioned: bool) -> bool | ApiResponse:
        """Whether the list may show anything: the legacy `company_id` is required and must be
        ours (403 otherwise); a foreign versioned `account_id` just narrows to nothing."""
        company = self.store.company.id
        if versioned:
            account = query.one("account_id")
            return account is None or account == company
        given = query.one("company_id")
        if given is None:
            return error(400, "company_id is required when authenticating with an API key")
        if given != company:
            return error(403, f"The API key cannot read company {given}")
        return True


def cancel_mode(body: Mapping[str, Any], *, versioned: bool) -> tuple[bool, str | None]:
    """(immediate?, reason) from a cancel body; the default differs by model (WHOP.md §0.2)."""
    reason = body.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise BadRequest("reason must be a string")
    if versioned:
        flag = body.get("cancel_at_period_end")
        if flag is not None and not isinstance(flag, bool):
            raise BadRequest("cancel_at_period_end must be a boolean")
        return not flag, reason
    mode = body.get("cancellation_mode")
    if mode is None:
        mode = "at_period_end"
    if mode not in ("at_period_end", "immediate"):
        raise BadRequest("cancellation_mode must be one of: at_period_end, immediate")
    return mode == "immediate", reason
