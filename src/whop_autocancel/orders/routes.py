"""`POST /api/checkouts` and `GET /api/checkouts/{order_id}`: public, so guarded by an optional
bearer token and a rate limit per client address, because creating a checkout spends the
merchant's API key.

The POST reads its body itself, and only after the token and the rate limit let the request
through: a refused caller costs no parsing, a body over `MAX_BODY` is refused (413) without being
read, and every refusal is the service's `{"error": "..."}` that never repeats the input."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.types import Receive

from whop_autocancel.orders.checkout import CheckoutError, CheckoutService
from whop_autocancel.settings import Settings

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")

#: The largest `POST /api/checkouts` body read (a real one is under 500 bytes).
MAX_BODY = 8 * 1024


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


class ErrorBody(BaseModel):
    error: str
    order_id: str | None = None


# What a refusal says about each field: fixed sentences, so no part of the input is echoed.
_FIELD_ERRORS = {
    "plan_id": "plan_id must be a Whop plan id: plan_ then letters and digits, at most 64 long",
    "email": "email must be an email address of at most 320 characters, or null",
}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _explain(error: ValidationError) -> str:
    """One line naming each field at fault, without the values (or unknown keys) sent."""
    reasons: list[str] = []
    for problem in error.errors(include_input=False, include_url=False):
        location = problem["loc"]
        field = str(location[0]) if location else None
        if field is None:
            reason = "the body must be a JSON object"
        elif field in _FIELD_ERRORS and problem["type"] == "missing":
            reason = f"{field} is required"
        elif field in _FIELD_ERRORS:
            reason = _FIELD_ERRORS[field]
        else:
            reason = f"unknown field (the body takes {' and '.join(_FIELD_ERRORS)} only)"
        if reason not in reasons:
            reasons.append(reason)
    return "; ".join(reasons)


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


class BodyTooLarge(Exception):
    """The request body is over the limit (answer 413)."""


async def read_capped(request: Request, limit: int) -> bytes:
    """The body, refusing one over `limit` bytes by its declared length before reading any of
    it, and a chunked one as soon as `limit` is passed."""
    return await read_body(request.headers, request.receive, limit)


async def read_body(headers: Mapping[str, str], receive: Receive, limit: int) -> bytes:
    """`read_capped` for a plain ASGI app: the request's headers and its `receive`. A client
    gone before the body is whole raises Starlette's `ClientDisconnect`, as a `Request` does."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _bearer(authorization: str | None) -> bytes:
    """The credentials of `Authorization: Bearer <token>` (scheme in any case); else empty."""
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    return credentials.strip().encode() if scheme.lower() == "bearer" else b""


_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": CheckoutRequest.model_json_schema()}},
    }
}


def checkout_router(service: CheckoutService, settings: Settings) -> APIRouter:
    router = APIRouter(prefix="/api/checkouts", tags=["checkout"])
    token = settings.CHECKOUT_TOKEN.get_secret_value() if settings.CHECKOUT_TOKEN else None
    # Compared as digests: equal length whatever is offered, so the compare leaks nothing.
    token_digest = hashlib.sha256(token.encode()).digest() if token else None
    limiter = MovingWindowRateLimiter(MemoryStorage())
    limit = None if settings.CHECKOUT_RATE_LIMIT == "off" else parse(settings.CHECKOUT_RATE_LIMIT)

    def refused(request: Request, authorization: str | None) -> JSONResponse | None:
        if token_digest is not None:
            offered = _bearer(authorization)
            digest = hashlib.sha256(offered).digest()
            if not (hmac.compare_digest(digest, token_digest) and offered):
                return _error(401, "missing or wrong bearer token")
        if limit is not None:
            client = request.client.host if request.client else "unknown"
            if not limiter.hit(limit, "checkout", client):
                reset = limiter.get_window_stats(limit, "checkout", client).reset_time
                wait = max(1, int(reset - datetime.now().timestamp()) + 1)
                headers = {"Retry-After": str(wait)}
                return _error(429, "too many checkouts from this address", headers)
        return None

    @router.post(
        "",
        status_code=201,
        response_model=CheckoutCreated,
        responses={
            400: {"model": ErrorBody, "description": "The body is not JSON."},
            401: {"model": ErrorBody, "description": "Missing or wrong bearer token."},
            404: {"model": ErrorBody, "description": "The plan is not sold here."},
            413: {"model": ErrorBody, "description": f"Body larger than {MAX_BODY} bytes."},
            415: {"model": ErrorBody, "description": "Not sent as application/json."},
            422: {"model": ErrorBody, "description": "A field is missing, wrong or unknown."},
            429: {"model": ErrorBody, "description": "Too many checkouts from this address."},
            503: {"model": ErrorBody, "description": "Whop did not create the checkout."},
        },
        openapi_extra=_REQUEST_BODY,
    )
    async def create_checkout(
        request: Request,
        authorization: Annotated[str | None, Header()] = None,
    ) -> CheckoutCreated | JSONResponse:
        """Create a pending order and a Whop checkout for it; send the buyer to
        `purchase_url`. 503 when Whop does not create the checkout: the order (its id in the
        answer) is then closed as `abandoned`, and the buyer simply tries again."""
        if (refusal := refused(request, authorization)) is not None:
            return refusal
        if not _is_json(request.headers.get("content-type")):
            return _error(415, "send the body as JSON, with Content-Type: application/json")
        try:
            raw = await read_capped(request, MAX_BODY)
        except BodyTooLarge:
            return _error(413, f"body larger than {MAX_BODY} bytes")
        try:
            document = json.loads(raw)
        except ValueError:  # not UTF-8 text, or not JSON
            return _error(400, "the body is not valid JSON")
        try:
            body = CheckoutRequest.model_validate(document)
        except ValidationError as error:
            return _error(422, _explain(error))
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
        """The order's state, for the success page to poll until `paid` or `delivered`. Statuses:
        `pending`, `paid`, `delivered`, `waiting_for_stock`, `delivery_failed`, `refunded`,
        `disputed`, `abandoned` (see the README)."""
        if len(order_id) > 64:
            return JSONResponse({"error": "no such order"}, status_code=404)
        found = await run_in_threadpool(service.status, order_id)
        if found is None:
            return JSONResponse({"error": "no such order"}, status_code=404)
        return CheckoutState(**found.__dict__)

    return router
