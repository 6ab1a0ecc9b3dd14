"""What one webhook costs the web app, the part of a request past the HTTP server (issue 12). A
purchase brings three webhooks, and in a flash sale a third of `serve`'s time went to them:
two thirds of that in the web framework, not in checking and storing the event. FastAPI's
handling of a request (its middleware, routing, exit stacks, dependency solving, the `Request`
object) cost as many calls as everything the service does with the webhook.

Counted, not timed: the function calls the profiler hook sees (Python's and C's) while the app
answers one signed `payment.succeeded`, called as uvicorn calls it (ASGI, in this thread; the
webhook writer's commit runs in its own thread and is not counted). The bound leaves room for
newer libraries; through FastAPI's route the count was 978, answered before FastAPI's handling
676 (the event loop this test makes for each request included). The same requests over real
HTTP: tests/integration/test_webhook_ingest.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.types import ASGIApp, Message

from support.calls import python_calls
from support.harness import event_body, make_runtime, make_settings, signed_headers
from whop_autocancel.app import create_app
from whop_autocancel.runtime import Runtime


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    built = make_runtime(make_settings(tmp_path))
    yield built
    built.close()


def answer(app: ASGIApp, method: str, body: bytes, headers: dict[str, str]) -> list[Message]:
    """Call `app` with one request as uvicorn would (its event loop, this thread): what the app
    sent back."""
    sent: list[Message] = []
    incoming = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    raw = [(name.lower().encode(), value.encode()) for name, value in headers.items()]
    raw += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": "/webhooks/whop",
        "raw_path": b"/webhooks/whop",
        "root_path": "",
        "query_string": b"",
        "headers": raw,
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(app(scope, receive, send))
    finally:
        loop.close()
    return sent


def test_a_webhook_costs_the_app_a_few_hundred_calls(runtime: Runtime) -> None:
    app = create_app(runtime)
    counts: list[int] = []
    for _ in range(4):  # (the first ones compile statements, start the writer, warm caches)
        body = event_body("payment.succeeded.legacy.json")
        headers = signed_headers(body)
        sent: list[Message] = []

        def one(
            body: bytes = body, headers: dict[str, str] = headers, sent: list[Message] = sent
        ) -> None:
            sent.extend(answer(app, "POST", body, headers))

        counts.append(python_calls(one))
        assert sent[0]["status"] == 200, sent
    assert counts[-1] <= 800, counts
