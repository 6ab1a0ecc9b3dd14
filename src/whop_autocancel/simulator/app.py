"""The simulator's ASGI app: Whop's API under `/api/v1`, the control API under `/_sim`, and a
stand-in checkout page under `/checkout/{id}`.

Waiting (latency, simulated timeouts) happens here, after `Simulator.handle_api` has released
the lock, so a slow answer never holds up another request.
"""

from __future__ import annotations

import asyncio
import html

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from whop_autocancel.simulator.control import control_router
from whop_autocancel.simulator.state import API_PREFIX, ApiRequest, Simulator

_API_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


def _checkout_page(sim: Simulator, record_id: str) -> HTMLResponse:
    """A tiny page where a buyer would pay; the control API completes the purchase."""
    safe = html.escape(record_id)
    if record_id.startswith("ch_"):
        url = f"{sim.public_url}/_sim/checkout_configurations/{record_id}/complete"
        how = f"POST {html.escape(url)}"
    else:
        how = f"POST {html.escape(sim.public_url)}/_sim/purchases {{&quot;plan_id&quot;: ...}}"
    body = (
        "<!doctype html><html><head><meta charset='utf-8'><title>Whop simulator checkout</title>"
        f"</head><body><h1>Simulated checkout</h1><p>Checkout <code>{safe}</code>.</p>"
        f"<p>Complete it with <code>{how}</code>.</p></body></html>"
    )
    return HTMLResponse(body)


def create_app(sim: Simulator) -> FastAPI:
    """The ASGI app serving `sim` over HTTP."""
    app = FastAPI(title="Whop simulator", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(control_router(sim))

    @app.get("/checkout/{record_id}", response_class=HTMLResponse)
    def checkout_page(record_id: str) -> HTMLResponse:
        if sim.checkout_configuration(record_id) is None and sim.plan(record_id) is None:
            return HTMLResponse("<!doctype html><p>No such checkout.</p>", status_code=404)
        return _checkout_page(sim, record_id)

    @app.api_route(API_PREFIX + "/{rest:path}", methods=_API_METHODS)
    async def whop_api(request: Request) -> JSONResponse:
        api_request = ApiRequest(
            method=request.method,
            path=request.url.path,
            headers=dict(request.headers),
            body=await request.body(),
            query=request.url.query,
        )
        if sim.holding:
            sim.count_held(1)
            try:
                while sim.holding:
                    await asyncio.sleep(0.005)
            finally:
                sim.count_held(-1)
        if sim.latency:
            await asyncio.sleep(sim.latency)
        response = sim.handle_api(api_request)
        if response.delay:
            await asyncio.sleep(response.delay)
        return JSONResponse(response.body, status_code=response.status, headers=response.headers)

    return app
