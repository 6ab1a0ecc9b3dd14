"""The simulator's in-memory state and its Whop API semantics (WHOP.md §0-§3), behind one lock.

`Simulator.handle_api` answers `/api/v1` requests (auth, versions, faults, idempotency, cancel
semantics) and records every call; the control methods create purchases and inject faults.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import secrets
import string
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from whop_autocancel.simulator import shapes
from whop_autocancel.simulator.shapes import JSON, SUPPORTED_VERSIONS, error_body, iso
from whop_autocancel.simulator.webhooks import Event, WebhookSender

Shape = Literal["legacy", "pinned"]
TERMINAL_STATUSES = frozenset({"canceled", "expired"})
DEFAULT_CANCEL_REASON = "Canceled via the API"
API_PREFIX = "/api/v1"
_ALPHANUM = string.ascii_letters + string.digits
_MEMBERSHIP_PATH = re.compile(r"^/memberships/([^/]+)(/cancel)?/?$")
_PAYMENT_PATH = re.compile(r"^/payments/([^/]+)/?$")


def new_id(prefix: str, length: int = 14) -> str:
    """A Whop-style id: prefix + random alphanumerics."""
    return prefix + "".join(secrets.choice(_ALPHANUM) for _ in range(length))


def _now() -> datetime:
    """Wall-clock UTC, truncated to milliseconds like Whop's timestamps."""
    moment = datetime.now(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


class UnknownMembershipError(KeyError):
    """No membership with that id exists in the simulator."""


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


@dataclass
class PaymentRecord:
    """One paid payment, linked to the membership it created."""

    id: str
    membership: MembershipRecord
    created_at: datetime
    paid_at: datetime
    updated_at: datetime
    fee: Decimal
    line_item_id: str
    hide_membership_id: bool = False


@dataclass(frozen=True)
class ApiRequest:
    """An `/api/v1` request as the HTTP layer saw it; `path` includes the `/api/v1` prefix."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes = b""


@dataclass(frozen=True)
class ApiResponse:
    """Status and JSON body to send back."""

    status: int
    body: JSON
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Faults:
    outage: bool = False
    forbidden: bool = False
    latency: float = 0.0
    throttled_requests: int = 0
    retry_after: float = 1.0
    rejections: dict[str, int] = field(default_factory=dict)


class _BadRequest(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Simulator:
    """Thread-safe in-memory Whop: memberships, payments, calls, faults and the webhook sender."""

    def __init__(
        self,
        *,
        api_key: str,
        webhook_secret: str,
        webhook_url: str | None = None,
        time_scale: float = 1.0,
        company_id: str = "biz_SimStore",
    ) -> None:
        self._lock = threading.RLock()
        self.api_key = api_key
        self.webhook_secret = webhook_secret
        self.time_scale = time_scale
        self.company = Company(id=company_id)
        self._sender = WebhookSender(
            webhook_secret, lock=self._lock, time_scale=time_scale, webhook_url=webhook_url
        )
        self._memberships: dict[str, MembershipRecord] = {}
        self._payments: dict[str, PaymentRecord] = {}
        self._calls: list[dict[str, Any]] = []
        self._idempotent: dict[tuple[str, str], ApiResponse] = {}
        self._faults = _Faults()

    # ----- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the webhook sender thread."""
        self._sender.start()

    def close(self) -> None:
        """Stop the webhook sender thread."""
        self._sender.stop()

    # ----- control operations ----------------------------------------------------------------

    def create_purchase(
        self,
        plan_id: str,
        *,
        product_id: str | None = None,
        email: str | None = None,
        billing_reason: str = "one_time",
        shape: Shape = "legacy",
        metadata: dict[str, Any] | None = None,
        checkout_configuration_id: str | None = None,
        amount: str = "25.00",
        currency: str = "usd",
        send_webhooks: bool = True,
        send_activation: bool = True,
        activation_first: bool = False,
        duplicate_payment_webhook: bool = False,
        payment_has_membership_id: bool = True,
    ) -> dict[str, Any]:
        """Simulate a buyer paying: user, member, membership, payment, then the webhooks."""
        if shape not in ("legacy", "pinned"):
            raise ValueError(f"shape must be 'legacy' or 'pinned', not {shape!r}")
        try:
            price = Decimal(amount).quantize(Decimal("0.01"))
        except InvalidOperation as exc:
            raise ValueError(f"amount must be a decimal string, not {amount!r}") from exc
        now = _now()
        local = (email or "buyer@example.com").split("@", 1)[0]
        user_id = new_id("user_")
        user = UserRecord(
            id=user_id,
            username=f"{local.lower()}{user_id[-4:].lower()}",
            name=local.replace(".", " ").title(),
            email=email or f"buyer-{user_id[5:].lower()}@example.com",
        )
        one_time = billing_reason == "one_time"
        product_title = "Sim Product"
        mem = MembershipRecord(
            id=new_id("mem_"),
            status="completed" if one_time else "active",
            shape=shape,
            user=user,
            member_id=new_id("mber_", 12),
            company=self.company,
            plan_id=plan_id,
            product_id=product_id or new_id("prod_", 13),
            product_title=product_title,
            product_route="sim-product",
            amount=price,
            currency=currency.lower(),
            billing_reason=billing_reason,
            metadata=dict(metadata or {}),
            checkout_configuration_id=checkout_configuration_id,
            created_at=now - timedelta(milliseconds=30),
            updated_at=now,
            billing_period_days=None if one_time else 30,
            period_end=None if one_time else now + timedelta(days=30),
        )
        pay = PaymentRecord(
            id=new_id("pay_"),
            membership=mem,
            created_at=now - timedelta(seconds=2),
            paid_at=now - timedelta(milliseconds=50),
            updated_at=now,
            fee=(price * Decimal("0.0488") + Decimal("0.30")).quantize(Decimal("0.01")),
            line_item_id=new_id("li_", 13),
            hide_membership_id=not payment_has_membership_id,
        )
        with self._lock:
            self._memberships[mem.id] = mem
            self._payments[pay.id] = pay
            webhook_ids = self._purchase_webhooks(
                pay,
                send=send_webhooks,
                activation=send_activation,
                activation_first=activation_first,
                duplicate_payment=duplicate_payment_webhook,
            )
        return {
            "payment_id": pay.id,
            "membership_id": mem.id,
            "user_id": user.id,
            "member_id": mem.member_id,
            "webhook_ids": webhook_ids,
        }

    def membership(self, membership_id: str) -> dict[str, Any]:
        """The legacy-shape membership plus `plan_id`; raises UnknownMembershipError."""
        with self._lock:
            mem = self._get(membership_id)
            view = shapes.legacy_membership(mem)
            view["plan_id"] = mem.plan_id
            return view

    def calls(self, membership_id: str | None = None) -> list[dict[str, Any]]:
        """Recorded `/api/v1` calls, oldest first, optionally only those for one membership."""
        with self._lock:
            return [
                copy.deepcopy(c)
                for c in self._calls
                if membership_id is None or c["membership_id"] == membership_id
            ]

    def deliveries(self) -> list[dict[str, Any]]:
        """Every webhook delivery attempt, oldest first."""
        return self._sender.deliveries()

    def pending_webhooks(self) -> int:
        """Webhook events still queued (including scheduled redeliveries) or in flight."""
        return self._sender.pending()

    def reject(self, membership_id: str, status: int = 422) -> None:
        """Make every cancel of this membership answer `status` (a permanent rejection)."""
        if not 400 <= status <= 599:
            raise ValueError(f"status must be 4xx or 5xx, not {status}")
        with self._lock:
            self._get(membership_id)
            self._faults.rejections[membership_id] = status

    def unreject(self, membership_id: str) -> None:
        """Undo `reject`."""
        with self._lock:
            self._get(membership_id)
            self._faults.rejections.pop(membership_id, None)

    def set_outage(self, enabled: bool) -> None:
        """While enabled every `/api/v1` request answers 503."""
        with self._lock:
            self._faults.outage = enabled

    def throttle(self, requests: int, retry_after: float = 1.0) -> None:
        """Answer the next `requests` API requests 429 with `Retry-After: retry_after`."""
        if requests < 0 or retry_after < 0:
            raise ValueError("requests and retry_after must not be negative")
        with self._lock:
            self._faults.throttled_requests = requests
            self._faults.retry_after = retry_after

    def set_latency(self, seconds: float) -> None:
        """Delay every `/api/v1` answer by `seconds` (applied by the HTTP layer, off the lock)."""
        if seconds < 0:
            raise ValueError("latency must not be negative")
        with self._lock:
            self._faults.latency = seconds

    @property
    def latency(self) -> float:
        with self._lock:
            return self._faults.latency

    def set_forbidden(self, enabled: bool) -> None:
        """While enabled every cancel answers 403 (the key lacks `membership:cancel`)."""
        with self._lock:
            self._faults.forbidden = enabled

    def set_webhook_url(self, url: str | None) -> None:
        """Where webhooks go from now on (None: record them as undeliverable)."""
        self._sender.set_webhook_url(url)

    @property
    def webhook_url(self) -> str | None:
        """The current webhook destination."""
        return self._sender.webhook_url

    # ----- the Whop API ----------------------------------------------------------------------

    def handle_api(self, request: ApiRequest) -> ApiResponse:
        """Answer one `/api/v1` request with Whop's semantics and record it as a call."""
        headers = {k.lower(): v for k, v in request.headers.items()}
        key = headers.get("idempotency-key")
        version = headers.get("api-version-date")
        sub_path = request.path.removeprefix(API_PREFIX) or "/"
        mem_match = _MEMBERSHIP_PATH.match(sub_path)
        body, body_ok = _parse_body(request.body)
        call: dict[str, Any] = {
            "method": request.method.upper(),
            "path": request.path,
            "membership_id": mem_match.group(1) if mem_match else None,
            "idempotency_key": key,
            "api_version_date": version,
            "body": body,
        }
        with self._lock:
            outcome = self._dispatch(request, headers, sub_path, body, body_ok)
            replayed = False
            if isinstance(outcome, ApiResponse):
                response = outcome
            elif key is not None and (key, request.path) in self._idempotent:
                response, replayed = self._idempotent[(key, request.path)], True
            else:
                response = outcome()
                if key is not None and response.status < 500:
                    self._idempotent[(key, request.path)] = response
            self._record(call, response.status, replayed)
            return ApiResponse(
                response.status, copy.deepcopy(response.body), dict(response.headers)
            )

    def _dispatch(
        self,
        request: ApiRequest,
        headers: Mapping[str, str],
        sub_path: str,
        body: Any,
        body_ok: bool,
    ) -> ApiResponse | Callable[[], ApiResponse]:
        """The checks that come before an endpoint runs, then the endpoint itself.

        A write endpoint comes back as a callable to run only when no response is stored for
        its Idempotency-Key; rejected requests (outage, auth, validation) are never stored.
        """
        if self._faults.outage:
            return _error(503, "Service temporarily unavailable")
        if self._faults.throttled_requests > 0:
            self._faults.throttled_requests -= 1
            wait = self._faults.retry_after
            limited = _error(429, "You are being rate limited", "rate_limited")
            limited.headers["Retry-After"] = f"{wait:g}"
            limited.headers["retry-after-ms"] = str(int(wait * 1000))
            return limited
        if headers.get("authorization", "") != f"Bearer {self.api_key}":
            return _error(401, "Invalid or missing API key")
        version = headers.get("api-version-date")
        if version is not None and version not in SUPPORTED_VERSIONS:
            message = (
                f"Unsupported Api-Version-Date {version!r}. "
                f"Supported versions: {', '.join(SUPPORTED_VERSIONS)}"
            )
            return _error(400, message, "unsupported_api_version")
        key = headers.get("idempotency-key")
        if key is not None and not 0 < len(key) <= 255:
            return _error(400, "Idempotency-Key must be 1 to 255 characters")
        if not body_ok:
            return _error(400, "The request body must be a JSON object")
        versioned = version is not None
        method = request.method.upper()
        if (m := _MEMBERSHIP_PATH.match(sub_path)) is not None:
            mem_id, is_cancel = m.group(1), m.group(2) is not None
            if method == "GET" and not is_cancel:
                return self._retrieve_membership(mem_id, versioned)
            if method == "POST" and is_cancel:
                if self._faults.forbidden:
                    msg = "The API key lacks the membership:cancel permission"
                    return _error(403, msg)
                try:
                    immediate, reason = _cancel_mode(body or {}, versioned=versioned)
                except _BadRequest as exc:
                    return _error(400, exc.message)
                return functools.partial(self._cancel, mem_id, versioned, immediate, reason)
        if (p := _PAYMENT_PATH.match(sub_path)) is not None and method == "GET":
            pay = self._payments.get(p.group(1))
            if pay is None:
                return _error(404, f"Payment {p.group(1)} not found")
            return ApiResponse(200, shapes.payment(pay, versioned=versioned))
        return _error(404, f"No route for {method} {request.path}")

    def _retrieve_membership(self, membership_id: str, versioned: bool) -> ApiResponse:
        mem = self._memberships.get(membership_id)
        if mem is None:
            return _error(404, f"Membership {membership_id} not found")
        return ApiResponse(200, shapes.membership(mem, versioned=versioned))

    def _cancel(
        self, membership_id: str, versioned: bool, immediate: bool, reason: str | None
    ) -> ApiResponse:
        mem = self._memberships.get(membership_id)
        if mem is None:
            return _error(404, f"Membership {membership_id} not found")
        rejection = self._faults.rejections.get(membership_id)
        if rejection is not None:
            return _error(rejection, "This membership cannot be canceled")
        if mem.status in TERMINAL_STATUSES:
            return _error(409, "Membership is already canceled")
        now = _now()
        mem.updated_at = now
        if not immediate:
            mem.cancel_at_period_end = True
            mem.cancelation_status = "canceling"
            return ApiResponse(200, shapes.membership(mem, versioned=versioned))
        old_status = mem.status
        mem.status = "canceled"
        mem.canceled_at = now
        mem.cancellation_reason = reason or DEFAULT_CANCEL_REASON
        mem.cancel_at_period_end = False
        mem.cancelation_status = "left"
        mem.most_recent_action, mem.most_recent_action_at = "canceled_on", now
        self._echo_cancel(mem, old_status)
        return ApiResponse(200, shapes.membership(mem, versioned=versioned))

    # ----- internals -------------------------------------------------------------------------

    def _get(self, membership_id: str) -> MembershipRecord:
        mem = self._memberships.get(membership_id)
        if mem is None:
            raise UnknownMembershipError(membership_id)
        return mem

    def _record(self, call: dict[str, Any], status: int, replayed: bool) -> None:
        call = {
            "seq": len(self._calls) + 1,
            "at": iso(_now()),
            **call,
            "status": status,
            "replayed": replayed,
        }
        self._calls.append(call)

    def _event(
        self,
        event_type: str,
        mem: MembershipRecord,
        data: JSON,
        previous_attributes: JSON | None = None,
    ) -> Event:
        """Build and serialise an event once: redeliveries and duplicates reuse these bytes."""
        msg_id = new_id("msg_", 24)
        envelope = shapes.envelope(
            msg_id=msg_id,
            event_type=event_type,
            pinned=mem.shape == "pinned",
            company_id=mem.company.id,
            timestamp=_now(),
            data=data,
            previous_attributes=previous_attributes,
        )
        body = json.dumps(envelope, ensure_ascii=False).encode()
        return Event(id=msg_id, type=event_type, body=body)

    def _purchase_webhooks(
        self,
        pay: PaymentRecord,
        *,
        send: bool,
        activation: bool,
        activation_first: bool,
        duplicate_payment: bool,
    ) -> list[str]:
        if not send:
            return []
        mem = pay.membership
        pinned = mem.shape == "pinned"
        paid = self._event("payment.succeeded", mem, shapes.payment(pay, versioned=pinned))
        events = [paid]
        if activation:
            activated = self._event(
                "membership.activated", mem, shapes.membership(mem, versioned=pinned)
            )
            events.insert(0 if activation_first else 1, activated)
        if duplicate_payment:
            events.append(paid)
        for event in events:
            self._sender.enqueue(event)
        return [event.id for event in events]

    def _echo_cancel(self, mem: MembershipRecord, old_status: str) -> None:
        if mem.shape == "pinned":
            previous = {"status": old_status, "canceled_at": None, "cancellation_reason": None}
            data = shapes.versioned_membership(mem)
            event = self._event("membership.updated", mem, data, previous)
        else:
            event = self._event("membership.deactivated", mem, shapes.legacy_membership(mem))
        self._sender.enqueue(event)


def _error(status: int, message: str, code: str | None = None) -> ApiResponse:
    return ApiResponse(status, error_body(status, message, code))


def _parse_body(raw: bytes) -> tuple[Any, bool]:
    """The parsed JSON body (None when empty) and whether it is acceptable (an object)."""
    if not raw.strip():
        return None, True
    try:
        parsed = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None, False
    return parsed, isinstance(parsed, dict)


def _cancel_mode(body: Mapping[str, Any], *, versioned: bool) -> tuple[bool, str | None]:
    """(immediate?, reason) from a cancel body; the default differs by model (WHOP.md §0.2)."""
    reason = body.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise _BadRequest("reason must be a string")
    if versioned:
        flag = body.get("cancel_at_period_end")
        if flag is not None and not isinstance(flag, bool):
            raise _BadRequest("cancel_at_period_end must be a boolean")
        return not flag, reason
    mode = body.get("cancellation_mode")
    if mode is None:
        mode = "at_period_end"
    if mode not in ("at_period_end", "immediate"):
        raise _BadRequest("cancellation_mode must be one of: at_period_end, immediate")
    return mode == "immediate", reason
