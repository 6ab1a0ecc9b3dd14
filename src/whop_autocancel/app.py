"""The web process (FastAPI): webhook endpoint, checkout API, health and metrics. Stateless."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from whop_autocancel import __version__, metrics
from whop_autocancel.admin.metrics import metrics_router
from whop_autocancel.admin.web.routes import admin_router
from whop_autocancel.db import leases
from whop_autocancel.logs import AccessLog
from whop_autocancel.orders.routes import BodyTooLarge, checkout_router, read_capped
from whop_autocancel.runtime import Runtime
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
    limit = runtime.settings.WEBHOOK_MAX_BYTES
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
    if runtime.settings.ACCESS_LOG:
        app.add_middleware(AccessLog)  # outermost: sees every request and its final status

    @app.post(
        "/webhooks/whop",
        # The body is read raw (the signature covers its exact bytes): describe it for clients
        # and fuzzers all the same.
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        },
    )
    async def receive_webhook(request: Request) -> JSONResponse:
        """Whop's webhooks (Standard Webhooks signed). 200 once stored durably (applied
        after, by a worker); 401 bad signature; 400 not an event; 413 too large; 503 database
        down (Whop retries)."""
        started = time.monotonic()
        client = request.client.host if request.client else None
        try:
            body = await read_capped(request, limit)
        except BodyTooLarge:
            result = runtime.inbox.refuse_too_large(limit, client)
        else:
            try:
                result = await runtime.inbox.receive(body, request.headers, client)
            except Exception:
                metrics.observe_webhook(None, "error", time.monotonic() - started)
                raise
        metrics.observe_webhook(result.event_type, result.outcome, time.monotonic() - started)
        return JSONResponse(result.body, status_code=result.http_status)

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
