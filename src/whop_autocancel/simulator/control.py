"""The simulator's control API under `/_sim`: purchases, plans, checkouts, faults, webhooks.

Every route calls one `Simulator` method; docs/simulator.md lists them with examples.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from whop_autocancel.simulator.shapes import error_body
from whop_autocancel.simulator.state import (
    Simulator,
    UnknownCheckoutConfigurationError,
    UnknownMembershipError,
    UnknownPaymentError,
)
from whop_autocancel.simulator.webhooks import MAX_CONCURRENCY


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PurchaseOptions(_Strict):
    """The purchase options shared by `/_sim/purchases` and checkout completion."""

    email: str | None = None
    billing_reason: str | None = None
    shape: Literal["legacy", "pinned"] = "legacy"
    metadata: dict[str, Any] = Field(default_factory=dict)
    amount: str | None = None
    currency: str | None = None
    send_webhooks: bool = True
    send_activation: bool = True
    activation_first: bool = False
    duplicate_payment_webhook: bool = False
    payment_has_membership_id: bool = True
    at: datetime | None = None
    email_visible: bool = True


class PurchaseBody(PurchaseOptions):
    """`POST /_sim/purchases`: the same fields as `Simulator.create_purchase`."""

    plan_id: str
    product_id: str | None = None
    billing_reason: str | None = "one_time"
    checkout_configuration_id: str | None = None


class PlanBody(_Strict):
    """`POST /_sim/plans`."""

    plan_id: str = Field(min_length=1)
    plan_type: Literal["one_time", "renewal"] = "one_time"
    product_id: str | None = None
    title: str | None = None
    amount: str | None = None
    currency: str | None = None


class RefundBody(_Strict):
    """`POST /_sim/payments/{id}/refund`: `amount` more refunded (omitted: the rest)."""

    amount: str | None = None


class RejectBody(_Strict):
    """`POST /_sim/memberships/{id}/reject`."""

    status: int = Field(default=422, ge=400, le=599)
    read_status: int | None = Field(default=None, ge=400, le=599)


class ToggleBody(_Strict):
    """`POST /_sim/forbidden`."""

    enabled: bool


class PermissionsBody(_Strict):
    """`POST /_sim/permissions`: the permissions the API key lacks (`[]`: none)."""

    missing: list[str]


class OutageBody(_Strict):
    """`POST /_sim/outage`: on (for `for_seconds` x time_scale, or until switched off) or off."""

    enabled: bool
    for_seconds: float | None = Field(default=None, ge=0)


class ThrottleBody(_Strict):
    """`POST /_sim/throttle`: the next `requests` API requests answer 429."""

    requests: int = Field(ge=0)
    retry_after: float = Field(default=1.0, ge=0)


class RateLimitBody(_Strict):
    """`POST /_sim/rate_limit`: a token bucket per API key; `capacity: null` turns it off."""

    capacity: int | None = Field(ge=1)
    refill_per_second: float = Field(default=1.0, gt=0)


class FaultsBody(_Strict):
    """`POST /_sim/faults`: random 500s and timeouts; omitted fields stay as they are."""

    error_rate: float | None = Field(default=None, ge=0, le=1)
    timeout_rate: float | None = Field(default=None, ge=0, le=1)
    timeout_seconds: float | None = Field(default=None, ge=0)
    seed: int | None = None
    plan_filter_ignored: bool | None = None


class LatencyBody(_Strict):
    """`POST /_sim/latency`: every API answer waits this long."""

    seconds: float = Field(ge=0)


class HoldBody(_Strict):
    """`POST /_sim/hold`: API requests wait at the door while `on`."""

    on: bool


class WebhookOptionsBody(_Strict):
    """`POST /_sim/webhooks/options`."""

    duplicate_rate: float = Field(default=0.0, ge=0, le=1)
    reorder: bool = False
    drop: bool = False


class ConcurrencyBody(_Strict):
    """`POST /_sim/webhooks/concurrency`: deliveries in flight at once."""

    in_flight: int = Field(ge=1, le=MAX_CONCURRENCY)


class ConfigBody(_Strict):
    """`POST /_sim/config`."""

    webhook_url: str | None


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(error_body(status, message), status_code=status)


def _not_found(membership_id: str) -> JSONResponse:
    return _error(404, f"Membership {membership_id} not found")


def control_router(sim: Simulator) -> APIRouter:
    """The `/_sim` routes over `sim`."""
    router = APIRouter(prefix="/_sim")

    @router.post("/purchases", status_code=201, response_model=None)
    def create_purchase(body: PurchaseBody) -> dict[str, Any] | JSONResponse:
        fields = body.model_dump()
        fields["billing_reason"] = fields["billing_reason"] or "one_time"
        try:
            return sim.create_purchase(**fields)
        except ValueError as exc:
            return _error(422, str(exc))

    @router.post("/plans", status_code=201, response_model=None)
    def create_plan(body: PlanBody) -> dict[str, Any] | JSONResponse:
        try:
            return sim.create_plan(**body.model_dump())
        except ValueError as exc:
            return _error(422, str(exc))

    @router.post(
        "/checkout_configurations/{config_id}/complete", status_code=201, response_model=None
    )
    def complete_checkout(
        config_id: str, body: PurchaseOptions | None = None
    ) -> dict[str, Any] | JSONResponse:
        options = (body or PurchaseOptions()).model_dump()
        if options["billing_reason"] is None:
            del options["billing_reason"]
        try:
            return sim.complete_checkout(config_id, **options)
        except UnknownCheckoutConfigurationError:
            return _error(404, f"Checkout configuration {config_id} not found")
        except ValueError as exc:
            return _error(422, str(exc))

    @router.post("/payments/{payment_id}/refund", response_model=None)
    def refund(payment_id: str, body: RefundBody | None = None) -> dict[str, Any] | JSONResponse:
        try:
            return sim.refund_payment(payment_id, (body or RefundBody()).amount)
        except UnknownPaymentError:
            return _error(404, f"Payment {payment_id} not found")
        except ValueError as exc:
            return _error(422, str(exc))

    @router.get("/memberships/{membership_id}", response_model=None)
    def membership(membership_id: str) -> dict[str, Any] | JSONResponse:
        try:
            view = sim.membership(membership_id)
        except UnknownMembershipError:
            return _not_found(membership_id)
        return {"membership": view, "calls": sim.calls(membership_id)}

    @router.post("/memberships/{membership_id}/reject", response_model=None)
    def reject(membership_id: str, body: RejectBody | None = None) -> dict[str, Any] | JSONResponse:
        body = body or RejectBody()
        try:
            sim.reject(membership_id, body.status, read_status=body.read_status)
        except UnknownMembershipError:
            return _not_found(membership_id)
        return {
            "membership_id": membership_id,
            "status": body.status,
            "read_status": body.read_status,
        }

    @router.delete("/memberships/{membership_id}/reject", response_model=None)
    def unreject(membership_id: str) -> dict[str, Any] | JSONResponse:
        try:
            sim.unreject(membership_id)
        except UnknownMembershipError:
            return _not_found(membership_id)
        return {"membership_id": membership_id, "status": None, "read_status": None}

    @router.get("/calls")
    def calls(membership_id: str | None = None) -> dict[str, Any]:
        return {"calls": sim.calls(membership_id)}

    @router.get("/webhooks")
    def webhooks() -> dict[str, Any]:
        return {"deliveries": sim.deliveries(), "pending": sim.pending_webhooks()}

    @router.post("/webhooks/options")
    def webhook_options(body: WebhookOptionsBody) -> dict[str, Any]:
        return sim.set_webhook_options(**body.model_dump())

    @router.post("/webhooks/concurrency")
    def webhook_concurrency(body: ConcurrencyBody) -> dict[str, Any]:
        sim.set_webhook_concurrency(body.in_flight)
        return {"in_flight": sim.webhook_concurrency}

    @router.post("/outage")
    def outage(body: OutageBody) -> dict[str, Any]:
        sim.set_outage(body.enabled, body.for_seconds)
        return {"enabled": body.enabled, "for_seconds": body.for_seconds}

    @router.post("/forbidden")
    def forbidden(body: ToggleBody) -> dict[str, Any]:
        sim.set_forbidden(body.enabled)
        return {"enabled": body.enabled}

    @router.post("/permissions", response_model=None)
    def permissions(body: PermissionsBody) -> dict[str, Any] | JSONResponse:
        try:
            return {"missing": sim.set_missing_permissions(body.missing)}
        except ValueError as exc:
            return _error(422, str(exc))

    @router.post("/throttle")
    def throttle(body: ThrottleBody) -> dict[str, Any]:
        sim.throttle(body.requests, body.retry_after)
        return {"requests": body.requests, "retry_after": body.retry_after}

    @router.post("/rate_limit")
    def rate_limit(body: RateLimitBody) -> dict[str, Any]:
        sim.set_rate_limit(body.capacity, body.refill_per_second)
        return {"capacity": body.capacity, "refill_per_second": body.refill_per_second}

    @router.get("/faults")
    def faults() -> dict[str, Any]:
        return sim.faults()

    @router.post("/faults")
    def set_faults(body: FaultsBody) -> dict[str, Any]:
        return sim.set_faults(**body.model_dump())

    @router.post("/latency")
    def latency(body: LatencyBody) -> dict[str, Any]:
        sim.set_latency(body.seconds)
        return {"seconds": body.seconds}

    @router.post("/hold")
    def hold(body: HoldBody) -> dict[str, Any]:
        sim.hold(body.on)
        return {"on": body.on, "held": sim.held}

    @router.post("/config")
    def config(body: ConfigBody) -> dict[str, Any]:
        sim.set_webhook_url(body.webhook_url)
        return {"webhook_url": sim.webhook_url}

    @router.post("/reset")
    def reset() -> dict[str, Any]:
        sim.reset()
        return {"reset": True}

    return router
