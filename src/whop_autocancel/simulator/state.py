"""The simulator's state behind one lock: the Whop API's front door and the control operations.

`Simulator.handle_api` answers `/api/v1` requests: faults first (outage, throttling, the rate
limit), then auth, version and body checks, random errors and timeouts, then the endpoint in
`api.py`, with Idempotency-Key replay for writes; every call is recorded. The control methods
create plans, checkout configurations and purchases and switch faults on and off.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from whop_autocancel.simulator import plan_shapes, shapes
from whop_autocancel.simulator.api import PERMISSIONS, ApiResponse, Endpoints, error
from whop_autocancel.simulator.faults import DEFAULT_SEED, Faults, retry_after_headers
from whop_autocancel.simulator.listing import Query
from whop_autocancel.simulator.records import (
    Company,
    MembershipRecord,
    PaymentRecord,
    PlanType,
    Shape,
    new_id,
)
from whop_autocancel.simulator.shapes import JSON, SUPPORTED_VERSIONS, iso
from whop_autocancel.simulator.store import PurchaseSpec, Store, parse_amount
from whop_autocancel.simulator.webhooks import Event, WebhookOptions, WebhookSender

API_PREFIX = "/api/v1"

__all__ = [
    "API_PREFIX",
    "ApiRequest",
    "ApiResponse",
    "Simulator",
    "UnknownCheckoutConfigurationError",
    "UnknownMembershipError",
    "UnknownPaymentError",
]


class UnknownMembershipError(KeyError):
    """No membership with that id exists in the simulator."""


class UnknownPaymentError(KeyError):
    """No payment with that id exists in the simulator."""


class UnknownCheckoutConfigurationError(KeyError):
    """No checkout configuration with that id exists in the simulator."""


@dataclass(frozen=True)
class ApiRequest:
    """An `/api/v1` request as the HTTP layer saw it; `path` includes the `/api/v1` prefix."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes = b""
    query: str = ""


class Simulator:
    """Thread-safe in-memory Whop: records, calls, faults and the webhook sender."""

    def __init__(
        self,
        *,
        api_key: str,
        webhook_secret: str,
        webhook_url: str | None = None,
        time_scale: float = 1.0,
        company_id: str = "biz_SimStore",
        seed: int = DEFAULT_SEED,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._lock = threading.RLock()
        self.api_key = api_key
        self.webhook_secret = webhook_secret
        self.time_scale = time_scale
        self.company = Company(id=company_id)
        self._sender = WebhookSender(
            webhook_secret,
            lock=self._lock,
            time_scale=time_scale,
            webhook_url=webhook_url,
            seed=seed,
        )
        # `clock`: where record times come from (a test's frozen clock); the wall clock if None.
        self._store = Store(self.company, clock)
        self._calls: list[dict[str, Any]] = []
        self._idempotent: dict[tuple[str, str], ApiResponse] = {}
        self._faults = Faults(seed=seed)
        self._holding = False
        self._held = 0
        self._endpoints = Endpoints(
            store=self._store,
            echo_cancel=self._echo_cancel,
            forbidden=lambda: self._faults.forbidden,
            rejection=self._faults_rejection,
            read_rejection=lambda membership_id: self._faults.read_rejections.get(membership_id),
            answer_as=lambda membership_id: self._faults.answer_as.get(membership_id),
            plan_filter_ignored=lambda: self._faults.plan_filter_ignored,
            missing_permission=lambda permission: permission in self._faults.missing_permissions,
        )

    # ----- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the webhook sender thread."""
        self._sender.start()

    def close(self) -> None:
        """Stop the webhook sender thread."""
        self._sender.stop()

    @property
    def public_url(self) -> str:
        """The base of purchase URLs (`<public_url>/checkout/<id>`); the server sets its own."""
        with self._lock:
            return self._store.public_url

    @public_url.setter
    def public_url(self, url: str) -> None:
        with self._lock:
            self._store.public_url = url.rstrip("/")

    # ----- plans and checkout configurations -------------------------------------------------

    def create_plan(
        self,
        plan_id: str,
        plan_type: PlanType = "one_time",
        product_id: str | None = None,
        title: str | None = None,
        *,
        amount: str | None = None,
        currency: str | None = None,
    ) -> dict[str, Any]:
        """Create (or redefine) a plan; returns it in the versioned shape."""
        price = parse_amount(amount) if amount is not None else None
        with self._lock:
            record = self._store.create_plan(
                plan_id,
                plan_type,
                product_id=product_id,
                title=title,
                amount=price,
                currency=currency,
            )
            return self._plan_view(record.id)

    def plan(self, plan_id: str) -> dict[str, Any] | None:
        """The plan in the versioned shape, or None if the simulator does not know it."""
        with self._lock:
            return self._plan_view(plan_id) if plan_id in self._store.plans else None

    def create_checkout_configuration(
        self,
        plan_id: str,
        *,
        metadata: dict[str, Any] | None = None,
        redirect_url: str | None = None,
    ) -> dict[str, Any]:
        """What `POST /checkout_configurations` creates, in the versioned shape; the plan must
        exist (KeyError otherwise)."""
        with self._lock:
            plan = self._store.plans.get(plan_id)
            if plan is None:
                raise KeyError(plan_id)
            config = self._store.create_checkout_configuration(
                plan, metadata=metadata or {}, redirect_url=redirect_url
            )
            return plan_shapes.checkout_configuration(config, versioned=True)

    def checkout_configuration(self, checkout_configuration_id: str) -> dict[str, Any] | None:
        """The checkout configuration in the versioned shape, or None if unknown."""
        with self._lock:
            config = self._store.checkout_configurations.get(checkout_configuration_id)
            if config is None:
                return None
            return plan_shapes.checkout_configuration(config, versioned=True)

    def complete_checkout(
        self,
        checkout_configuration_id: str,
        *,
        email: str | None = None,
        shape: Shape = "legacy",
        **options: Any,
    ) -> dict[str, Any]:
        """A buyer completes this checkout: `create_purchase` of its plan, with its id and its
        metadata copied onto the payment and the membership (WHOP.md §6)."""
        for name in ("plan_id", "checkout_configuration_id"):
            if name in options:
                raise TypeError(f"complete_checkout() takes no {name} (the checkout decides it)")
        with self._lock:
            config = self._store.checkout_configurations.get(checkout_configuration_id)
            if config is None:
                raise UnknownCheckoutConfigurationError(checkout_configuration_id)
            plan = config.plan
        options.setdefault(
            "billing_reason", "one_time" if plan.plan_type == "one_time" else "subscription_create"
        )
        return self.create_purchase(
            plan.id,
            email=email,
            shape=shape,
            checkout_configuration_id=checkout_configuration_id,
            **options,
        )

    # ----- purchases -------------------------------------------------------------------------

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
        amount: str | None = None,
        currency: str | None = None,
        send_webhooks: bool = True,
        send_activation: bool = True,
        activation_first: bool = False,
        duplicate_payment_webhook: bool = False,
        payment_has_membership_id: bool = True,
        at: datetime | None = None,
        email_visible: bool = True,
    ) -> dict[str, Any]:
        """Simulate a buyer paying: user, member, membership, payment, then the webhooks.
        `at` backdates the purchase (a sale made before the service was installed): the
        payment is created 2 s before it, the membership 30 ms before.

        An unknown plan is created (one-time for a `one_time` billing reason, else renewal);
        a known plan supplies the product, price and currency unless given. A known
        checkout configuration must sell this plan, and its metadata is copied (keys given in
        `metadata` win)."""
        if shape not in ("legacy", "pinned"):
            raise ValueError(f"shape must be 'legacy' or 'pinned', not {shape!r}")
        price = parse_amount(amount) if amount is not None else None
        with self._lock:
            copied: dict[str, Any] = {}
            config = self._store.checkout_configurations.get(checkout_configuration_id or "")
            if config is not None:
                if config.plan.id != plan_id:
                    raise ValueError(
                        f"checkout configuration {config.id} sells {config.plan.id}, not {plan_id}"
                    )
                copied = dict(config.metadata)
            plan = self._store.plan_for_purchase(
                plan_id, billing_reason, product_id=product_id, amount=price, currency=currency
            )
            spec = PurchaseSpec(
                plan=plan,
                product_id=product_id or plan.product_id,
                email=email,
                billing_reason=billing_reason,
                shape=shape,
                metadata={**copied, **(metadata or {})},
                checkout_configuration_id=checkout_configuration_id,
                amount=price if price is not None else plan.amount,
                currency=(currency or plan.currency).lower(),
                payment_has_membership_id=payment_has_membership_id,
                at=_utc_millis(at) if at is not None else None,
                email_visible=email_visible,
            )
            pay = self._store.purchase(spec)
            webhook_ids = self._purchase_webhooks(
                pay,
                send=send_webhooks,
                activation=send_activation,
                activation_first=activation_first,
                duplicate_payment=duplicate_payment_webhook,
            )
        mem = pay.membership
        return {
            "payment_id": pay.id,
            "membership_id": mem.id,
            "user_id": mem.user.id,
            "member_id": mem.member_id,
            "plan_id": mem.plan_id,
            "product_id": mem.product_id,
            "checkout_configuration_id": mem.checkout_configuration_id,
            "webhook_ids": webhook_ids,
        }

    def refund_payment(self, payment_id: str, amount: str | None = None) -> dict[str, Any]:
        """Refund `amount` (None: the rest) of a payment. It stays `paid`, as at Whop; its
        `refunded_amount` and substatus (`refunded`/`partially_refunded`) say it. No webhook.
        Raises UnknownPaymentError, or ValueError past the total."""
        price = parse_amount(amount) if amount is not None else None
        with self._lock:
            try:
                pay = self._store.refund(payment_id, price)
            except KeyError:
                raise UnknownPaymentError(payment_id) from None
            return {
                "payment_id": pay.id,
                "refunded_amount": f"{pay.refunded_amount:.2f}",
                "substatus": pay.substatus,
            }

    # ----- inspection ------------------------------------------------------------------------

    def membership(self, membership_id: str) -> dict[str, Any]:
        """The legacy-shape membership plus `plan_id`; raises UnknownMembershipError."""
        with self._lock:
            mem = self._get(membership_id)
            view = shapes.legacy_membership(mem)
            view["plan_id"] = mem.plan_id
            return view

    def calls(self, membership_id: str | None = None, *, since: int = 0) -> list[dict[str, Any]]:
        """Recorded `/api/v1` calls, oldest first, optionally only those for one membership;
        `since`: only the calls after the first `since` (those whose `seq` is greater)."""
        with self._lock:
            return [
                copy.deepcopy(c)
                for c in self._calls[since:]
                if membership_id is None or c["membership_id"] == membership_id
            ]

    def call_count(self) -> int:
        """How many `/api/v1` calls were recorded (the `seq` of the last one)."""
        with self._lock:
            return len(self._calls)

    def deliveries(self) -> list[dict[str, Any]]:
        """Every webhook delivery attempt (and dropped event), oldest first."""
        return self._sender.deliveries()

    def pending_webhooks(self) -> int:
        """Webhook events still queued (including scheduled redeliveries) or in flight."""
        return self._sender.pending()

    # ----- faults ----------------------------------------------------------------------------

    def reject(
        self, membership_id: str, status: int = 422, *, read_status: int | None = None
    ) -> None:
        """Make every cancel of this membership answer `status` (a permanent rejection), and
        with `read_status` every read of it (`GET /memberships/{id}`) answer that."""
        for value in (status, read_status):
            if value is not None and not 400 <= value <= 599:
                raise ValueError(f"status must be 4xx or 5xx, not {value}")
        with self._lock:
            self._get(membership_id)
            self._faults.rejections[membership_id] = status
            if read_status is None:
                self._faults.read_rejections.pop(membership_id, None)
            else:
                self._faults.read_rejections[membership_id] = read_status

    def unreject(self, membership_id: str) -> None:
        """Undo `reject`."""
        with self._lock:
            self._get(membership_id)
            self._faults.rejections.pop(membership_id, None)
            self._faults.read_rejections.pop(membership_id, None)

    def answer_as(self, membership_id: str, other_id: str | None) -> None:
        """Make every cancel and read of `membership_id` answer 200 with `other_id`'s object
        as it is, changing nothing (a misrouted answer); None undoes it."""
        with self._lock:
            self._get(membership_id)
            if other_id is None:
                self._faults.answer_as.pop(membership_id, None)
                return
            self._get(other_id)
            self._faults.answer_as[membership_id] = other_id

    def forget_idempotency_keys(self) -> None:
        """Forget every stored Idempotency-Key answer, as when Whop's retention window has
        passed: a repeated key is a new request from now on."""
        with self._lock:
            self._idempotent.clear()

    def set_outage(self, enabled: bool, for_seconds: float | None = None) -> None:
        """While on, every `/api/v1` request answers 503. With `for_seconds` the outage ends
        by itself after `for_seconds * time_scale` seconds."""
        scaled = None if for_seconds is None else for_seconds * self.time_scale
        with self._lock:
            self._faults.set_outage(enabled, scaled)

    def throttle(self, requests: int, retry_after: float = 1.0) -> None:
        """Answer the next `requests` API requests 429 with `Retry-After: retry_after`."""
        if requests < 0 or retry_after < 0:
            raise ValueError("requests and retry_after must not be negative")
        with self._lock:
            self._faults.throttled_requests = requests
            self._faults.retry_after = retry_after

    def set_rate_limit(self, capacity: int | None, refill_per_second: float = 1.0) -> None:
        """A token bucket per API key: `capacity` requests at once, refilled at
        `refill_per_second` (real time, not scaled). None turns the limit off."""
        with self._lock:
            self._faults.rate_limit.configure(capacity, refill_per_second)

    def set_faults(
        self,
        *,
        error_rate: float | None = None,
        timeout_rate: float | None = None,
        timeout_seconds: float | None = None,
        seed: int | None = None,
        plan_filter_ignored: bool | None = None,
    ) -> dict[str, Any]:
        """Random faults: `error_rate` of requests answer 500 (nothing happens);
        `timeout_rate` of requests are carried out but answer 504 after `timeout_seconds`
        (real seconds). `seed` restarts the dice (also the webhook sender's).
        `plan_filter_ignored`: `GET /memberships` ignores its plan filter (a Whop that drops a
        parameter it does not know answers every plan). None keeps a setting; returns the
        settings now in force."""
        with self._lock:
            if plan_filter_ignored is not None:
                self._faults.plan_filter_ignored = plan_filter_ignored
            self._faults.set_random(
                error_rate=error_rate,
                timeout_rate=timeout_rate,
                timeout_seconds=timeout_seconds,
                seed=seed,
            )
            if seed is not None:
                self._sender.seed(seed)
            return self._faults.describe()

    def faults(self) -> dict[str, Any]:
        """The fault settings now in force."""
        with self._lock:
            return self._faults.describe()

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

    def hold(self, enabled: bool) -> None:
        """While enabled every `/api/v1` request waits at the door (before it is answered or
        counted against the rate limit) until `hold(False)`: `held` says how many are waiting,
        so a test can see how many calls a client has in flight at once."""
        with self._lock:
            self._holding = enabled

    @property
    def holding(self) -> bool:
        with self._lock:
            return self._holding

    @property
    def held(self) -> int:
        with self._lock:
            return self._held

    def count_held(self, change: int) -> None:
        with self._lock:
            self._held += change

    def set_forbidden(self, enabled: bool) -> None:
        """While enabled every cancel answers 403 (the key lacks `membership:cancel`)."""
        with self._lock:
            self._faults.forbidden = enabled

    def set_missing_permissions(self, permissions: Iterable[str]) -> list[str]:
        """The API key lacks these permissions from now on (and has every other): each endpoint
        that needs one answers 403 naming it. An empty list gives every permission back."""
        missing = frozenset(permissions)
        unknown = sorted(missing - PERMISSIONS)
        if unknown:
            raise ValueError(
                f"unknown permission(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(PERMISSIONS))}"
            )
        with self._lock:
            self._faults.missing_permissions = missing
        return sorted(missing)

    # ----- webhooks and reset ----------------------------------------------------------------

    def set_webhook_url(self, url: str | None) -> None:
        """Where webhooks go from now on (None: record them as undeliverable)."""
        self._sender.set_webhook_url(url)

    @property
    def webhook_url(self) -> str | None:
        """The current webhook destination."""
        return self._sender.webhook_url

    def set_webhook_options(
        self, duplicate_rate: float = 0.0, reorder: bool = False, drop: bool = False
    ) -> dict[str, Any]:
        """From now on: send `duplicate_rate` of events twice (same webhook id); hold each
        event a random 0-2 s (times time_scale) before its first attempt (`reorder`); or record
        every event as dropped without sending it (`drop`)."""
        options = WebhookOptions(duplicate_rate=duplicate_rate, reorder=reorder, drop=drop)
        self._sender.set_options(options)
        return self.webhook_options()

    def set_webhook_concurrency(self, in_flight: int) -> None:
        """Let the webhook sender have up to `in_flight` deliveries under way at once (1, one
        at a time, by default); one membership's events still go one at a time, in order.
        Raises ValueError outside 1 to MAX_CONCURRENCY."""
        self._sender.set_concurrency(in_flight)

    @property
    def webhook_concurrency(self) -> int:
        return self._sender.concurrency

    def webhook_options(self) -> dict[str, Any]:
        options = self._sender.options
        return {
            "duplicate_rate": options.duplicate_rate,
            "reorder": options.reorder,
            "drop": options.drop,
        }

    def reset(self) -> None:
        """Forget memberships, payments, checkout configurations, calls, stored idempotent
        answers, webhook deliveries and queue, and switch every fault off. Plans and the
        configuration (key, secret, webhook URL, time scale, seed, webhook concurrency)
        stay."""
        with self._lock:
            self._store.clear()
            self._calls.clear()
            self._idempotent.clear()
            seed = self._faults.seed
            self._faults = Faults(seed=seed)
            self._holding = False
            self._sender.reset()
            self._sender.seed(seed)

    # ----- the Whop API ----------------------------------------------------------------------

    def handle_api(self, request: ApiRequest) -> ApiResponse:
        """Answer one `/api/v1` request with Whop's semantics and record it as a call.

        A simulated timeout comes back as a 504 whose `delay` the HTTP layer waits first."""
        headers = {k.lower(): v for k, v in request.headers.items()}
        key = headers.get("idempotency-key")
        version = headers.get("api-version-date")
        sub_path = request.path.removeprefix(API_PREFIX) or "/"
        query = Query.parse(request.query)
        body, body_ok = _parse_body(request.body)
        parts = sub_path.strip("/").split("/")
        call: dict[str, Any] = {
            "method": request.method.upper(),
            "path": request.path,
            "query": query.as_dict(),
            "membership_id": parts[1] if len(parts) >= 2 and parts[0] == "memberships" else None,
            "idempotency_key": key,
            "api_version_date": version,
            "body": body,
        }
        with self._lock:
            response = self._admit(headers, body_ok)
            replayed = timed_out = False
            if response is None and self._faults.roll(self._faults.error_rate):
                response = error(500, "Internal server error (simulated)")
            if response is None:
                timed_out = self._faults.roll(self._faults.timeout_rate)
                routed = self._endpoints.route(
                    call["method"], sub_path, query, body, versioned=version is not None
                )
                if isinstance(routed, ApiResponse):
                    response = routed
                elif key is not None and (key, request.path) in self._idempotent:
                    response, replayed = self._idempotent[(key, request.path)], True
                else:
                    response = routed()
                    if key is not None and response.status < 500:
                        self._idempotent[(key, request.path)] = response
            if timed_out:
                gateway = error(504, "The request timed out (simulated)")
                response = ApiResponse(504, gateway.body, delay=self._faults.timeout_seconds)
            self._record(call, response.status, replayed=replayed, timed_out=timed_out)
            return ApiResponse(
                response.status,
                copy.deepcopy(response.body),
                dict(response.headers),
                response.delay,
            )

    def _admit(self, headers: Mapping[str, str], body_ok: bool) -> ApiResponse | None:
        """The checks before any endpoint runs; None lets the request through."""
        faults = self._faults
        if faults.outage():
            return error(503, "Service temporarily unavailable")
        if faults.throttled_requests > 0:
            faults.throttled_requests -= 1
            wait = faults.retry_after  # sent as given, not rounded
            return _rate_limited(
                {"Retry-After": f"{wait:g}", "retry-after-ms": str(int(wait * 1000))}
            )
        wait_for_token = faults.rate_limit.wait(headers.get("authorization", ""), time.monotonic())
        if wait_for_token is not None:
            return _rate_limited(retry_after_headers(wait_for_token))
        if headers.get("authorization", "") != f"Bearer {self.api_key}":
            return error(401, "Invalid or missing API key")
        version = headers.get("api-version-date")
        if version is not None and version not in SUPPORTED_VERSIONS:
            message = (
                f"Unsupported Api-Version-Date {version!r}. "
                f"Supported versions: {', '.join(SUPPORTED_VERSIONS)}"
            )
            return error(400, message, "unsupported_api_version")
        key = headers.get("idempotency-key")
        if key is not None and not 0 < len(key) <= 255:
            return error(400, "Idempotency-Key must be 1 to 255 characters")
        if not body_ok:
            return error(400, "The request body must be a JSON object")
        return None

    # ----- internals -------------------------------------------------------------------------

    def _get(self, membership_id: str) -> MembershipRecord:
        mem = self._store.memberships.get(membership_id)
        if mem is None:
            raise UnknownMembershipError(membership_id)
        return mem

    def _faults_rejection(self, membership_id: str) -> int | None:
        return self._faults.rejections.get(membership_id)

    def _plan_view(self, plan_id: str) -> dict[str, Any]:
        record = self._store.plans[plan_id]
        return plan_shapes.plan(
            record,
            versioned=True,
            purchase_url=self._store.purchase_url(plan_id),
            member_count=self._store.member_count(plan_id),
        )

    def _record(
        self, call: dict[str, Any], status: int, *, replayed: bool, timed_out: bool
    ) -> None:
        self._calls.append(
            {
                "seq": len(self._calls) + 1,
                "at": iso(self._store.now()),
                **call,
                "status": status,
                "replayed": replayed,
                "timed_out": timed_out,
            }
        )

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
            timestamp=self._store.now(),
            data=data,
            previous_attributes=previous_attributes,
        )
        body = json.dumps(envelope, ensure_ascii=False).encode()
        return Event(id=msg_id, type=event_type, body=body, key=mem.id)

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


def _utc_millis(moment: datetime) -> datetime:
    """Aware UTC (a naive time is taken as UTC), truncated to milliseconds like Whop's."""
    aware = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return aware.replace(microsecond=aware.microsecond // 1000 * 1000)


def _rate_limited(headers: dict[str, str]) -> ApiResponse:
    limited = error(429, "You are being rate limited", "rate_limited")
    return ApiResponse(limited.status, limited.body, headers)


def _parse_body(raw: bytes) -> tuple[Any, bool]:
    """The parsed JSON body (None when empty) and whether it is acceptable (an object)."""
    if not raw.strip():
        return None, True
    try:
        parsed = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None, False
    return parsed, isinstance(parsed, dict)
