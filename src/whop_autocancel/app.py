"""The web process (FastAPI): webhook endpoint and health. Stateless."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from whop_autocancel.orders.routes import checkout_router
from whop_autocancel.runtime import Runtime
from whop_autocancel.worker import InProcessWorker


class _TooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


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

    app = FastAPI(title="whop-autocancel", lifespan=lifespan, docs_url=None, redoc_url=None)
    limit = runtime.settings.WEBHOOK_MAX_BYTES
    app.include_router(checkout_router(runtime.checkouts, runtime.settings))
    if runtime.settings.CHECKOUT_CORS_ORIGINS:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=runtime.settings.CHECKOUT_CORS_ORIGINS,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )

    @app.post("/webhooks/whop")
    async def receive_webhook(request: Request) -> JSONResponse:
        """Whop's webhooks (Standard Webhooks signed). 200 once stored; 401 bad signature;
        400 not an event; 413 too large; 503 database down (Whop retries)."""
        try:
            body = await _read_body(request, limit)
        except _TooLarge:
            return JSONResponse({"error": f"body larger than {limit} bytes"}, status_code=413)
        result = await run_in_threadpool(runtime.inbox.ingest, body, dict(request.headers))
        return JSONResponse(result.body, status_code=result.http_status)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
