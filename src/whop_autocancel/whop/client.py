"""A thin typed Whop API client for the few endpoints we use: one request builder (`WhopApi`)
and two senders, blocking (`WhopClient`, httpx) and non-blocking (`AsyncWhopClient`, aiohttp),
both paced by the shared `Pacer` and teaching it what Whop answered.

It never retries by itself: the cancellation state machine decides what a reply means
(`whop.outcomes`), so every attempt is recorded and nothing is retried twice over.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import cache
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
import httpx
from yarl import URL

from whop_autocancel import metrics
from whop_autocancel.clock import Clock


@cache
def tls_context() -> ssl.SSLContext:
    """One TLS context for every Whop client of the process: what httpx builds by default
    (certifi's CA bundle, or `SSL_CERT_FILE`/`SSL_CERT_DIR`; certificates and hostnames
    verified), built once. Loading the CA bundle costs about 20 ms of CPU, which every new
    client paid, and a cancellation run outside a worker (`cancel`, a retry from the
    dashboard) builds one per run."""
    return httpx.create_ssl_context()


@dataclass(frozen=True)
class WhopReply:
    """What one call produced: an HTTP answer, or a transport error (status None)."""

    status: int | None
    body: Any = None
    transport_error: str | None = None
    retry_after: float | None = None
    remaining: int | None = None  # X-RateLimit-Remaining, when Whop sends it
    reset_after: float | None = None  # X-RateLimit-Reset, as seconds from now

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def items(self) -> list[dict[str, Any]]:
        """The `data` of a list page (empty when the body is not one)."""
        data = self.body.get("data") if isinstance(self.body, dict) else None
        return [item for item in data if isinstance(item, dict)] if isinstance(data, list) else []

    @property
    def next_cursor(self) -> str | None:
        info = self.body.get("page_info") if isinstance(self.body, dict) else None
        if isinstance(info, dict) and info.get("has_next_page") and info.get("end_cursor"):
            return str(info["end_cursor"])
        return None

    @property
    def membership_status(self) -> str | None:
        if isinstance(self.body, dict):
            status = self.body.get("status")
            return status if isinstance(status, str) else None
        return None

    @property
    def membership_id(self) -> str | None:
        """The id of the membership in the body (legacy and versioned objects both carry it
        at the top), to check that Whop answered for the membership we asked about."""
        if isinstance(self.body, dict):
            value = self.body.get("id")
            return value if isinstance(value, str) and value else None
        return None

    def describe(self) -> str:
        """A short, log-safe description: HTTP status and Whop's error message."""
        if self.status is None:
            return f"no answer from Whop ({self.transport_error})"
        if self.ok:
            return f"HTTP {self.status}"
        error = self.body.get("error") if isinstance(self.body, dict) else None
        if isinstance(error, dict):
            message = error.get("message") or error.get("type") or ""
            return f"HTTP {self.status}: {message}".strip()
        if isinstance(self.body, dict) and isinstance(self.body.get("message"), str):
            return f"HTTP {self.status}: {self.body['message']}"
        return f"HTTP {self.status}"


@dataclass(frozen=True)
class WhopRequest:
    """One API request, built once for either client. `endpoint` names it for the metrics as a
    route template (never an id). `wait`: take the pacer's turn (False: draw from the shared
    budget but go at once, for a buyer waiting on a checkout)."""

    method: str
    path: str
    endpoint: str
    options: dict[str, Any]
    wait: bool = True


class WhopApi:
    """The requests we make, in the dialect of the configured API version (no header: legacy;
    a date: versioned)."""

    def __init__(self, version_date: str | None) -> None:
        self.version_date = version_date

    def headers(self, api_key: str) -> dict[str, str]:
        headers = {
            "Authorization": f"Bearer {api_key}",
            "Accept": "application/json",
            "User-Agent": "whop-autocancel",
        }
        if self.version_date:
            headers["Api-Version-Date"] = self.version_date
        return headers

    def cancel_membership(self, membership_id: str, idempotency_key: str) -> WhopRequest:
        """Cancel immediately, in the body the configured API version expects."""
        body: dict[str, Any] = (
            {"cancel_at_period_end": False}
            if self.version_date
            else {"cancellation_mode": "immediate"}
        )
        return WhopRequest(
            "POST",
            f"memberships/{membership_id}/cancel",
            "POST /memberships/{id}/cancel",
            {"json": body, "headers": {"Idempotency-Key": idempotency_key}},
        )

    def retrieve_membership(self, membership_id: str) -> WhopRequest:
        return WhopRequest("GET", f"memberships/{membership_id}", "GET /memberships/{id}", {})

    def retrieve_plan(self, plan_id: str) -> WhopRequest:
        return WhopRequest("GET", f"plans/{plan_id}", "GET /plans/{id}", {})

    def list_memberships(
        self,
        *,
        company_id: str | None,
        first: int = 10,
        after: str | None = None,
        user_id: str | None = None,
        plan_id: str | None = None,
        created_after: datetime | None = None,
    ) -> WhopRequest:
        """One page of memberships, with the filters named the way the API version wants."""
        params = self._page(first, after, company_id, created_after)
        params += [("plan_ids", plan_id)] if plan_id else []
        if user_id:
            params.append(("user_id" if self.version_date else "user_ids", user_id))
        return WhopRequest("GET", "memberships", "GET /memberships", {"params": params})

    def list_payments(
        self,
        *,
        company_id: str | None,
        first: int = 10,
        after: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
    ) -> WhopRequest:
        """One page of payments, newest first."""
        params = self._page(first, after, company_id, created_after)
        if created_before is not None:
            params.append(("created_before", _iso(created_before)))
        return WhopRequest("GET", "payments", "GET /payments", {"params": params})

    def _page(
        self, first: int, after: str | None, company_id: str | None, created_after: datetime | None
    ) -> list[tuple[str, str]]:
        params: list[tuple[str, str]] = [("first", str(first))]
        if after:
            params.append(("after", after))
        if company_id:
            params.append(("account_id" if self.version_date else "company_id", company_id))
        if created_after is not None:
            params.append(("created_after", _iso(created_after)))
        return params

    def create_checkout_configuration(
        self,
        *,
        plan_id: str,
        metadata: dict[str, str],
        redirect_url: str | None,
        company_id: str | None,
        timeout: float,
    ) -> WhopRequest:
        """A checkout for one order: Whop copies `metadata` onto its payment and membership.
        A buyer is waiting: it draws from the shared budget but never waits its turn."""
        body: dict[str, Any] = {"plan_id": plan_id, "metadata": metadata, "mode": "payment"}
        if redirect_url:
            body["redirect_url"] = redirect_url
        if company_id:
            body["account_id" if self.version_date else "company_id"] = company_id
        return WhopRequest(
            "POST",
            "checkout_configurations",
            "POST /checkout_configurations",
            {"json": body, "timeout": timeout},
            wait=False,
        )


class Pacer(Protocol):
    """Spaces the calls of every process under the API key's rate limit (`whop.pacing`)."""

    def turn(self, wait: bool) -> float:
        """Draw one request; the seconds to wait before sending it."""
        ...

    def kept_turn(self) -> float | None:
        """`turn(True)` when it needs neither the database nor a wait (a turn this process
        kept): its seconds to wait; None otherwise (ask `turn`)."""
        ...

    def stopped_for(self) -> float:
        """After a call's wait for its turn: the seconds of a stop Whop asked for meanwhile
        that it waits out too (0: it goes)."""
        ...

    def known_stop(self) -> float | None:
        """`stopped_for()` when it needs no read of the database; None otherwise."""
        ...

    def observe(self, reply: WhopReply) -> None:
        """Learn from an answer (a 429, rate-limit headers)."""
        ...


class _Sender:
    """What both clients share: the request builder, the headers, the pacer."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        version_date: str | None,
        clock: Clock,
        pacer: Pacer | None,
    ) -> None:
        self.api = WhopApi(version_date)
        self.version_date = version_date
        self._base_url = base_url.rstrip("/") + "/"
        self._headers = self.api.headers(api_key)
        self._clock = clock
        self.pacer = pacer

    def _failed(
        self, request: WhopRequest, started: float, error: Exception, *, timed_out: bool = False
    ) -> WhopReply:
        metrics.observe_whop_call(request.endpoint, None, time.monotonic() - started)
        if timed_out:
            return WhopReply(status=None, transport_error=f"timeout ({type(error).__name__})")
        return WhopReply(status=None, transport_error=f"{type(error).__name__}: {error}")

    def _answered(
        self,
        request: WhopRequest,
        started: float,
        status: int,
        headers: Mapping[str, str],
        body: Any,
    ) -> WhopReply:
        metrics.observe_whop_call(request.endpoint, status, time.monotonic() - started)
        return WhopReply(
            status=status,
            body=body,
            retry_after=_retry_after(headers, self._clock),
            remaining=_int_header(headers, "x-ratelimit-remaining"),
            reset_after=_reset_after(headers, self._clock),
        )

    def _teaches(self, reply: WhopReply) -> bool:
        """Whether the pacer has something to learn from this answer (it writes then)."""
        return self.pacer is not None and (reply.status == 429 or reply.remaining == 0)


class WhopClient(_Sender):
    """The blocking client: sweeps, backfill, recovery, checks, the checkout API."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        version_date: str | None,
        timeout: float,
        clock: Clock,
        pacer: Pacer | None = None,
    ) -> None:
        super().__init__(base_url, api_key, version_date=version_date, clock=clock, pacer=pacer)
        self._http = httpx.Client(
            base_url=self._base_url, headers=self._headers, timeout=timeout, verify=tls_context()
        )

    def close(self) -> None:
        self._http.close()

    def send(self, request: WhopRequest) -> WhopReply:
        """One request (after the pacer's turn). It never retries."""
        if self.pacer is not None:
            delay = self.pacer.turn(request.wait)
            while delay > 0:  # (then looks again: a 429 may have come meanwhile)
                time.sleep(delay)
                delay = self.pacer.stopped_for()
        started = time.monotonic()
        try:
            response = self._http.request(request.method, request.path, **request.options)
        except httpx.HTTPError as error:
            timed_out = isinstance(error, httpx.TimeoutException)
            return self._failed(request, started, error, timed_out=timed_out)
        try:
            body = response.json()
        except ValueError:
            body = None
        reply = self._answered(request, started, response.status_code, response.headers, body)
        if self.pacer is not None and self._teaches(reply):
            self.pacer.observe(reply)
        return reply

    def retrieve_plan(self, plan_id: str) -> WhopReply:
        return self.send(self.api.retrieve_plan(plan_id))

    def list_memberships(self, **filters: Any) -> WhopReply:
        return self.send(self.api.list_memberships(**filters))

    def list_payments(self, **filters: Any) -> WhopReply:
        return self.send(self.api.list_payments(**filters))

    def create_checkout_configuration(self, **fields: Any) -> WhopReply:
        return self.send(self.api.create_checkout_configuration(**fields))


class AsyncWhopClient(_Sender):
    """The non-blocking client of the cancellations: as many calls in flight as the rate limit
    and Whop's latency need, on one event loop, none holding a thread while it waits.

    On aiohttp, not httpx: measured side by side against one local server, this client cost
    1.2 ms of CPU a call on httpx with one call in flight and 1.9 ms with ten (httpx's pool
    looks at every connection it holds for each request), 0.4-0.5 and 0.3-0.4 ms on aiohttp;
    it makes every cancellation's call (docs/performance.md). Its session is made on the
    first call, on the loop that uses it (aiohttp ties a session to one loop)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        version_date: str | None,
        timeout: float,
        clock: Clock,
        pacer: Pacer | None = None,
        max_connections: int = 100,
    ) -> None:
        super().__init__(base_url, api_key, version_date=version_date, clock=clock, pacer=pacer)
        # As httpx's timeout: connecting (a pooled connection included) and each read are
        # bounded, not the whole exchange.
        self._timeout = aiohttp.ClientTimeout(total=None, connect=timeout, sock_read=timeout)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._proxy_headers: dict[str, str] | None = None  # the proxy's credentials

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            proxy, self._proxy_headers = env_proxy(self._base_url)
            # No default headers: aiohttp adds a session's defaults to what it sends a proxy,
            # and our Authorization would reach it as Proxy-Authorization. Each request
            # carries them instead (`send`).
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=self._max_connections, ssl=tls_context()),
                # The environment's proxy, read once here: aiohttp's `trust_env` reads it, and
                # ~/.netrc, in a thread on every request (two thread hops a call), and a netrc
                # entry for Whop's host would clash with our Authorization header.
                proxy=proxy,
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, request: WhopRequest) -> WhopReply:
        if self.pacer is not None:
            # What needs the database goes to a thread; a kept turn, or a stop read a moment
            # ago, is answered here on the loop (most calls, under load: no thread hop).
            pacer, loop = self.pacer, asyncio.get_running_loop()
            delay = pacer.kept_turn() if request.wait else None
            if delay is None:
                delay = await loop.run_in_executor(None, pacer.turn, request.wait)
            while delay > 0:  # (then looks again: a 429 may have come meanwhile)
                await asyncio.sleep(delay)
                known = pacer.known_stop()
                delay = (
                    await loop.run_in_executor(None, pacer.stopped_for) if known is None else known
                )
        started = time.monotonic()
        options = dict(request.options)  # (a "timeout" there: aiohttp bounds the whole call)
        session = self._http()
        options["headers"] = {**self._headers, **options.get("headers", {})}
        if self._proxy_headers is not None:  # the proxy's credentials: to its tunnel (https)
            if self._base_url.startswith("https:"):  # or, plain http, on the request it relays
                options["proxy_headers"] = self._proxy_headers
            else:
                options["headers"].update(self._proxy_headers)
        try:
            async with session.request(
                request.method, self._base_url + request.path, **options
            ) as response:
                raw = await response.read()
                status, headers = response.status, response.headers
        except TimeoutError as error:  # (aiohttp's timeouts are TimeoutErrors)
            return self._failed(request, started, error, timed_out=True)
        except aiohttp.ClientError as error:
            return self._failed(request, started, error)
        reply = self._answered(request, started, status, headers, _json(raw))
        if self.pacer is not None and self._teaches(reply):
            await asyncio.get_running_loop().run_in_executor(None, self.pacer.observe, reply)
        return reply


def env_proxy(url: str) -> tuple[str | None, dict[str, str] | None]:
    """The proxy the environment names for `url` (HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, less
    NO_PROXY), as httpx honours it, without the credentials in its address, and the header
    that sends them to it; (None, None) for none."""
    parts = urlsplit(url)
    if parts.hostname is None or urllib.request.proxy_bypass(parts.hostname):
        return None, None
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy:
        return None, None
    address = URL(proxy)
    credentials = aiohttp.BasicAuth.from_url(address)
    headers = {"Proxy-Authorization": credentials.encode()} if credentials else None
    return str(address.with_user(None)), headers


def _json(raw: bytes) -> Any:
    """A body as JSON; None when it is not (empty, HTML from a proxy, cut short)."""
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    value = headers.get(name)
    try:
        return int(float(value)) if value is not None else None
    except ValueError:
        return None


def _reset_after(headers: Mapping[str, str], clock: Clock) -> float | None:
    """`X-RateLimit-Reset` as seconds from now: a Unix time (what Whop's SDKs expect) or, when
    small, a number of seconds."""
    value = headers.get("x-ratelimit-reset")
    if not value:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    if number > 1_000_000_000:  # a Unix timestamp
        return max(0.0, number - clock.now().timestamp())
    return max(0.0, number)


def _retry_after(headers: Mapping[str, str], clock: Clock) -> float | None:
    milliseconds = headers.get("retry-after-ms")
    if milliseconds:
        try:
            return max(0.0, float(milliseconds) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (moment - clock.now()).total_seconds())


def _iso(moment: datetime) -> str:
    """Whop's timestamp form: UTC, milliseconds, `Z`."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
