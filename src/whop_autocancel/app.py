"""The web process (FastAPI): webhook endpoint, checkout API, health and metrics. Stateless."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from inspect import cleandoc
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from whop_autocancel import __version__, metrics
from whop_autocancel.admin.metrics import metrics_router
from whop_autocancel.admin.web.routes import admin_router
from whop_autocancel.db import leases
from whop_autocancel.logs import AccessLog
from whop_autocancel.orders.routes import BodyTooLarge, checkout_router, read_body
from whop_autocancel.runtime import Runtime
from whop_autocancel.webhooks.inbox import Inbox
from whop_autocancel.worker import InProcessWorker


def readiness(runtime: Runtime) -> dict[str, Any]:
    report: dict[str, Any] = {}
    ready = True
    heartbeat = None
    try:
        with runtime.database.transaction() as session:
            heartbeat = leases.latest_heartbeat(session)
        report["database"] = "ok"
    except Exception as error:
        report["database"] = f"unreachable: {type(error).__name__}"
        ready = False
    try:
        runtime.jobs.ping()
        report["queue"] = "ok"
    except Exception as error:
        report["queue"] = f"unreachable: {type(error).__name__}"
        ready = False
    limit = runtime.settings.WORKER_HEARTBEAT_MAX_AGE
    if heartbeat is None:
        report["worker"] = "no worker has ever reported"
        ready = False
    else:
        age = (runtime.clock.now() - heartbeat).total_seconds()
        report["worker_heartbeat_age"] = round(age, 1)
        report["worker"] = "ok" if age <= limit else f"no heartbeat for {age:.0f} s (> {limit:g})"
        ready = ready and age <= limit
    report["status"] = "ready" if ready else "not ready"
    return report


WEBHOOK_PATH = "/webhooks/whop"


class WebhookRoute:
    """ASGI middleware that answers `POST /webhooks/whop` itself, before FastAPI's handling of
    a request (its middleware, routing, exit stacks, dependency solving, `Request` object):
    a flash sale sends three webhooks a purchase, and that handling cost as many function
    calls as checking and storing each one (tests/integration/test_request_cost.py). Every
    other request goes on to FastAPI. The route is described in /openapi.json all the same
    (`_document_webhook_route`)."""

    def __init__(self, app: ASGIApp, *, inbox: Inbox, limit: int) -> None:
        self.app = app
        self._inbox = inbox
        self._limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") != WEBHOOK_PATH:
            await self.app(scope, receive, send)
            return
        if scope["method"] == "POST":
            response = await self._receive(scope, receive)
        else:
            response = JSONResponse(
                {"error": "method not allowed"}, status_code=405, headers={"Allow": "POST"}
            )
        await response(scope, receive, send)

    async def _receive(self, scope: Scope, receive: Receive) -> JSONResponse:
        """Whop's webhooks (Standard Webhooks signed). 200 once stored durably (applied
        after, by a worker); 401 bad signature; 400 not an event; 413 too large; 503 database
        down (Whop retries)."""
        started = time.monotonic()
        client = scope.get("client")
        host = client[0] if client else None
        headers = Headers(scope=scope)
        try:
            body = await read_body(headers, receive, self._limit)
        except BodyTooLarge:
            result = self._inbox.refuse_too_large(self._limit, host)
        else:
            try:
                result = await self._inbox.receive(body, headers, host)
            except Exception:
                metrics.observe_webhook(None, "error", time.monotonic() - started)
                raise
        metrics.observe_webhook(result.event_type, result.outcome, time.monotonic() - started)
        return JSONResponse(result.body, status_code=result.http_status)


_WEBHOOK_OPERATION: dict[str, Any] = {
    "post": {
        "summary": "Receive Webhook",
        "description": cleandoc(WebhookRoute._receive.__doc__ or ""),
        "operationId": "receive_webhook_webhooks_whop_post",
        # The body is read raw (the signature covers its exact bytes): described for clients
        # and fuzzers all the same.
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        "responses": {
            str(status): {
                "description": meaning,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        }
                    }
                },
            }
            for status, meaning in (
                (200, "Stored (or stored before): Whop stops retrying."),
                (400, "Signed, but not an event."),
                (401, "Signature missing, wrong, or outside the tolerance."),
                (413, "Body over WEBHOOK_MAX_BYTES."),
                (503, "The database is unavailable: Whop retries."),
            )
        },
    }
}


def _document_webhook_route(app: FastAPI) -> None:
    """Add `WebhookRoute`'s operation to the app's /openapi.json (FastAPI describes only the
    routes it handles)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schema["paths"] = {WEBHOOK_PATH: _WEBHOOK_OPERATION, **schema["paths"]}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(runtime: Runtime, *, with_worker: bool = False) -> FastAPI:
    worker = InProcessWorker(runtime) if with_worker else None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if worker is not None:
            worker.start()
        try:
            yield
        finally:
            if worker is not None:
                await run_in_threadpool(worker.stop)

    # /openapi.json is served on purpose: the public HTTP API (checkouts, Whop's webhooks,
    # health) is a contract a storefront codes against; the dashboard and /metrics stay out of
    # it, and there are no interactive /docs pages to keep safe.
    app = FastAPI(
        title="whop-autocancel",
        version=__version__,
        description=(
            "The public HTTP API of a whop-autocancel service: a storefront starts a checkout "
            "and polls its order; Whop posts its signed webhooks; a proxy checks health."
        ),
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.include_router(checkout_router(runtime.checkouts, runtime.settings))
    app.include_router(metrics_router(runtime))  # GET /metrics (METRICS_TOKEN set)
    app.include_router(admin_router(runtime))
    if runtime.settings.CHECKOUT_CORS_ORIGINS:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=runtime.settings.CHECKOUT_CORS_ORIGINS,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    # Inside the access log (it logs webhooks too), outside everything of FastAPI's.
    app.add_middleware(WebhookRoute, inbox=runtime.inbox, limit=runtime.settings.WEBHOOK_MAX_BYTES)
    if runtime.settings.ACCESS_LOG:
        app.add_middleware(AccessLog)  # outermost: sees every request and its final status
    _document_webhook_route(app)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Readiness: database and queue reachable, and some worker alive recently."""
        report = await run_in_threadpool(readiness, runtime)
        return JSONResponse(report, status_code=200 if report["status"] == "ready" else 503)

    return app
