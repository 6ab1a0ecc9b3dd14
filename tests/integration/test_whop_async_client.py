"""The non-blocking Whop client (aiohttp) at its edges, over real HTTP on loopback: the proxy the
environment names (read once, its credentials sent to the proxy), a read that times out, and an
answer whose body is not JSON. Its everyday calls are the cancellation tests' (the simulator)."""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from support.harness import free_port
from whop_autocancel.clock import SystemClock
from whop_autocancel.whop.client import AsyncWhopClient, WhopReply, env_proxy
from whop_autocancel.whop.outcomes import Outcome, classify

PROXY_VARIABLES = (
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
)


@pytest.fixture(autouse=True)
def no_proxy_from_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@dataclass
class CannedServer:
    """An HTTP/1.1 server on loopback, in a thread: it answers every request with `answer`
    (after `delay` seconds) and keeps each request's head."""

    answer: bytes
    delay: float = 0.0
    heads: list[str] = field(default_factory=list)
    port: int = 0

    @contextmanager
    def serving(self) -> Iterator[CannedServer]:
        ready = threading.Event()
        box: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                    self.heads.append(head)
                    length = 0
                    for line in head.split("\r\n"):
                        name, _, value = line.partition(":")
                        if name.strip().lower() == "content-length":
                            length = int(value)
                    await reader.readexactly(length)
                    await asyncio.sleep(self.delay)
                    writer.write(self.answer)
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        async def main() -> None:
            stop = asyncio.Event()
            server = await asyncio.start_server(handle, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            box.append((asyncio.get_running_loop(), stop))
            ready.set()
            async with server:
                await stop.wait()  # (asyncio.run then cancels the handlers still open)

        thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
        thread.start()
        assert ready.wait(10)
        try:
            yield self
        finally:
            loop, stop = box[0]
            loop.call_soon_threadsafe(stop.set)
            thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def response(status: str, body: bytes, content_type: str = "application/json") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode() + body


MEMBERSHIP = b'{"id": "mem_X", "status": "canceled"}'


def call(base_url: str, *, timeout: float = 5.0) -> tuple[int | None, object, str | None]:
    async def go() -> tuple[int | None, object, str | None]:
        client = AsyncWhopClient(
            base_url, "apik_test", version_date=None, timeout=timeout, clock=SystemClock()
        )
        try:
            reply = await client.send(client.api.cancel_membership("mem_X", "key-1"))
        finally:
            await client.aclose()
        return reply.status, reply.body, reply.transport_error

    return asyncio.run(go())


@pytest.fixture
def proxy() -> Iterator[CannedServer]:
    """Stands in for an HTTP proxy: it answers itself, so what reached it is what the client
    sent a proxy."""
    with CannedServer(response("200 OK", MEMBERSHIP)).serving() as server:
        yield server


def test_calls_go_through_the_proxy_the_environment_names_with_its_credentials(
    proxy: CannedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whop's address: nothing listens there, so only the proxy can have answered.
    whop = f"http://127.0.0.1:{free_port()}/api/v1"
    monkeypatch.setenv("HTTP_PROXY", f"http://ops:s%40cret@127.0.0.1:{proxy.port}")
    status, body, error = call(whop)
    assert (status, body, error) == (200, {"id": "mem_X", "status": "canceled"}, None)
    [head] = proxy.heads
    request_line, *headers = head.split("\r\n")
    # A proxy is asked with the whole address (absolute form), and its credentials go to it.
    assert request_line == f"POST {whop}/memberships/mem_X/cancel HTTP/1.1"
    expected = base64.b64encode(b"ops:s@cret").decode()
    proxy_credentials = [line for line in headers if line.startswith("Proxy-Authorization:")]
    # ...and only its own: the API key goes to Whop alone.
    assert proxy_credentials == [f"Proxy-Authorization: Basic {expected}"]
    assert "Authorization: Bearer apik_test" in headers
    assert "Idempotency-Key: key-1" in headers


def test_an_https_call_asks_the_proxy_for_a_tunnel_with_its_credentials_never_the_api_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    refusing = CannedServer(response("403 Forbidden", b""))
    with refusing.serving() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", f"http://ops:s%40cret@127.0.0.1:{proxy.port}")
        status, _, error = call("https://api.whop.example/api/v1")
        assert status is None
        assert "403" in str(error)  # the proxy's refusal, as a transport error
        [head] = proxy.heads
        request_line, *headers = head.split("\r\n")
        assert request_line == "CONNECT api.whop.example:443 HTTP/1.1"
        expected = base64.b64encode(b"ops:s@cret").decode()
        assert f"Proxy-Authorization: Basic {expected}" in headers
        assert not [line for line in headers if "apik_test" in line or "Idempotency" in line]


def test_no_proxy_sends_the_call_straight_to_whop(
    proxy: CannedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    whop = CannedServer(response("200 OK", MEMBERSHIP))
    with whop.serving() as server:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        assert call(f"{server.url}/api/v1")[0] == 200
        assert proxy.heads == []
        [head] = server.heads
        assert head.startswith("POST /api/v1/memberships/mem_X/cancel HTTP/1.1\r\n")


@pytest.mark.parametrize(
    ("environment", "expected"),
    [
        ({}, (None, None)),
        ({"HTTPS_PROXY": "http://proxy.example:3128"}, ("http://proxy.example:3128", None)),
        ({"ALL_PROXY": "http://proxy.example:3128"}, ("http://proxy.example:3128", None)),
        (
            {"HTTPS_PROXY": "http://proxy.example:3128", "NO_PROXY": "api.whop.com"},
            (None, None),
        ),
        ({"HTTP_PROXY": "http://proxy.example:3128"}, (None, None)),  # Whop is https
    ],
)
def test_the_proxy_for_whops_address(
    environment: dict[str, str],
    expected: tuple[str | None, None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert env_proxy("https://api.whop.com/api/v1/") == expected


def test_a_read_that_outlasts_the_timeout_is_a_timeout_and_retryable() -> None:
    slow = CannedServer(response("200 OK", MEMBERSHIP), delay=2.0)
    with slow.serving() as server:
        status, body, error = call(f"{server.url}/api/v1", timeout=0.2)
        assert (status, body) == (None, None)
        assert str(error).startswith("timeout (")
        assert classify(WhopReply(status=None, transport_error=error)) is Outcome.RETRYABLE


def test_an_answer_that_is_not_json_keeps_its_status_without_a_body() -> None:
    page = response("502 Bad Gateway", b"<html>bad gateway</html>", "text/html")
    with CannedServer(page).serving() as server:
        status, body, error = call(f"{server.url}/api/v1")
        assert (status, body, error) == (502, None, None)


def test_a_refused_connection_is_a_transport_error() -> None:
    status, body, error = call(f"http://127.0.0.1:{free_port()}/api/v1")
    assert (status, body) == (None, None)
    assert "Cannot connect" in str(error)
