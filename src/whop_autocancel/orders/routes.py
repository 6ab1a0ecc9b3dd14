"""`POST /api/checkouts` and `GET /api/checkouts/{order_id}`: public, so guarded by an optional
bearer token and a rate limit per client address, because creating a checkout spends the
merchant's API key."""

from __future__ import annotations

import hmac
import re
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool

from whop_autocancel.orders.checkout import CheckoutError, CheckoutService
from whop_autocancel.settings import Settings

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


class CheckoutRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    plan_id: str = Field(pattern=r"^plan_[A-Za-z0-9]+$", max_length=64)
    email: str | None = Field(default=None, max_length=320)

    @field_validator("email")
    @classmethod
    def _check_email(cls, value: str | None) -> str | None:
        if value is not None and not _EMAIL.match(value):
            raise ValueError("is not an email address")
        return value.lower() if value else None


class CheckoutCreated(BaseModel):
    order_id: str
    purchase_url: str
    checkout_configuration_id: str


class CheckoutState(BaseModel):
    order_id: str
    status: str
    plan_id: str | None
    purchase_url: str | None
    paid_at: datetime | None
    delivered_at: datetime | None


def checkout_router(service: CheckoutService, settings: Settings) -> APIRouter:
    router = APIRouter(prefix="/api/checkouts", tags=["checkout"])
    token = settings.CHECKOUT_TOKEN.get_secret_value() if settings.CHECKOUT_TOKEN else None
    limiter = MovingWindowRateLimiter(MemoryStorage())
    limit = None if settings.CHECKOUT_RATE_LIMIT == "off" else parse(settings.CHECKOUT_RATE_LIMIT)

    def refused(request: Request, authorization: str | None) -> JSONResponse | None:
        if token is not None:
            offered = (authorization or "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(offered.encode(), token.encode()):
                return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401)
        if limit is not None:
            client = request.client.host if request.client else "unknown"
            if not limiter.hit(limit, "checkout", client):
                reset = limiter.get_window_stats(limit, "checkout", client).reset_time
                wait = max(1, int(reset - datetime.now().timestamp()) + 1)
                return JSONResponse(
                    {"error": "too many checkouts from this address"},
                    status_code=429,
                    headers={"Retry-After": str(wait)},
                )
        return None

    @router.post(
        "",
        status_code=201,
        response_model=CheckoutCreated,
        responses={401: {}, 404: {}, 429: {}, 503: {}},
    )
    async def create_checkout(
        body: CheckoutRequest,
        request: Request,
        authorization: Annotated[str | None, Header()] = None,
    ) -> CheckoutCreated | JSONResponse:
        """Create a pending order and a Whop checkout for it; send the buyer to
        `purchase_url`. 503 (order left pending) when Whop cannot be reached."""
        if (refusal := refused(request, authorization)) is not None:
            return refusal
        try:
            checkout = await run_in_threadpool(service.create, body.plan_id, body.email)
        except CheckoutError as error:
            content = {"error": str(error)}
            if error.order_id:
                content["order_id"] = error.order_id
            return JSONResponse(content, status_code=error.http_status)
        return CheckoutCreated(
            order_id=checkout.order_id,
            purchase_url=checkout.purchase_url,
            checkout_configuration_id=checkout.checkout_configuration_id,
        )

    @router.get("/{order_id}", response_model=CheckoutState, responses={404: {}})
    async def checkout_status(order_id: str) -> CheckoutState | JSONResponse:
        """The order's state, for the success page to poll until `paid` or `delivered`."""
        if len(order_id) > 64:
            return JSONResponse({"error": "no such order"}, status_code=404)
        found = await run_in_threadpool(service.status, order_id)
        if found is None:
            return JSONResponse({"error": "no such order"}, status_code=404)
        return CheckoutState(**found.__dict__)

    return router
