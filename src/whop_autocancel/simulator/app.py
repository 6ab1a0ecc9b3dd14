"""The simulator's ASGI app: Whop's API under `/api/v1` and the control API under `/_sim`."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from whop_autocancel.simulator.shapes import error_body
from whop_autocancel.simulator.state import (
    API_PREFIX,
    ApiRequest,
    Simulator,
    UnknownMembershipError,
)

_API_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


class PurchaseBody(BaseModel):
    """`POST /_sim/purchases`: the same fields as `Simulator.create_purchase`."""

    model_config = ConfigDict(extra="forbid")

    plan_id: str
    product_id: str | None = None
    email: str | None = None
    billing_reason: str = "one_time"
    shape: Literal["legacy", "pinned"] = "legacy"
    metadata: dict[str, Any] = Field(default_factory=dict)
    checkout_configuration_id: str | None = None
    amount: str = "25.00"
    currency: str = "usd"
    send_webhooks: bool = True
    send_activation: bool = True
    activation_first: bool = False
    duplicate_payment_webhook: bool = False
    payment_has_membership_id: bool = True


class RejectBody(BaseModel):
    """`POST /_sim/memberships/{id}/reject`."""

    status: int = Field(default=422, ge=400, le=599)


class ToggleBody(BaseModel):
    """`POST /_sim/outage` and `POST /_sim/forbidden`."""

    enabled: bool


class ThrottleBody(BaseModel):
    """`POST /_sim/throttle`: the next `requests` API requests answer 429."""

    requests: int = Field(ge=0)
    retry_after: float = Field(default=1.0, ge=0)


class LatencyBody(BaseModel):
    """`POST /_sim/latency`: every API answer waits this long."""

    seconds: float = Field(ge=0)


class ConfigBody(BaseModel):
    """`POST /_sim/config`."""

    webhook_url: str | None


def _not_found(membership_id: str) -> JSONResponse:
    return JSONResponse(error_body(404, f"Membership {membership_id} not found"), status_code=404)


def _control_router(sim: Simulator) -> APIRouter:
    router = APIRouter(prefix="/_sim")

    @router.post("/purchases", status_code=201, response_model=None)
    def create_purchase(body: PurchaseBody) -> dict[str, Any] | JSONResponse:
        try:
            return sim.create_purchase(**body.model_dump())
        except ValueError as exc:
            return JSONResponse(error_body(422, str(exc)), status_code=422)

    @router.get("/memberships/{membership_id}", response_model=None)
    def membership(membership_id: str) -> dict[str, Any] | JSONResponse:
        try:
            view = sim.membership(membership_id)
        except UnknownMembershipError:
            return _not_found(membership_id)
        return {"membership": view, "calls": sim.calls(membership_id)}

    @router.post("/memberships/{membership_id}/reject", response_model=None)
    def reject(membership_id: str, body: RejectBody | None = None) -> dict[str, Any] | Response:
        status = (body or RejectBody()).status
        try:
            sim.reject(membership_id, status)
        except UnknownMembershipError:
            return _not_found(membership_id)
        return {"membership_id": membership_id, "status": status}

    @router.delete("/memberships/{membership_id}/reject", response_model=None)
    def unreject(membership_id: str) -> dict[str, Any] | Response:
        try:
            sim.unreject(membership_id)
        except UnknownMembershipError:
            return _not_found(membership_id)
        return {"membership_id": membership_id, "status": None}

    @router.get("/calls")
    def calls(membership_id: str | None = None) -> dict[str, Any]:
        return {"calls": sim.calls(membership_id)}

    @router.get("/webhooks")
    def webhooks() -> dict[str, Any]:
        return {"deliveries": sim.deliveries(), "pending": sim.pending_webhooks()}

    @router.post("/outage")
    def outage(body: ToggleBody) -> dict[str, Any]:
        sim.set_outage(body.enabled)
        return {"enabled": body.enabled}

    @router.post("/forbidden")
    def forbidden(body: ToggleBody) -> dict[str, Any]:
        sim.set_forbidden(body.enabled)
        return {"enabled": body.enabled}

    @router.post("/throttle")
    def throttle(body: ThrottleBody) -> dict[str, Any]:
        sim.throttle(body.requests, body.retry_after)
        return {"requests": body.requests, "retry_after": body.retry_after}

    @router.post("/latency")
    def latency(body: LatencyBody) -> dict[str, Any]:
        sim.set_latency(body.seconds)
        return {"seconds": body.seconds}

    @router.post("/config")
    def config(body: ConfigBody) -> dict[str, Any]:
        sim.set_webhook_url(body.webhook_url)
        return {"webhook_url": sim.webhook_url}

    return router


def create_app(sim: Simulator) -> FastAPI:
    """The ASGI app serving `sim` over HTTP."""
    app = FastAPI(title="Whop simulator", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(_control_router(sim))

    @app.api_route(API_PREFIX + "/{rest:path}", methods=_API_METHODS)
    async def whop_api(request: Request) -> JSONResponse:
        api_request = ApiRequest(
            method=request.method,
            path=request.url.path,
            headers=dict(request.headers),
            body=await request.body(),
        )
        if sim.latency:
            await asyncio.sleep(sim.latency)
        response = sim.handle_api(api_request)
        return JSONResponse(response.body, status_code=response.status, headers=response.headers)

    return app
