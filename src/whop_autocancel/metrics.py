"""Prometheus instruments of what happens in this process (counters and histograms), recorded
where it happens, and the exposition of them.

What the database knows (queue depth, stock levels, email and cancellation rows, open alerts) is
not counted here: `admin/metrics.py` reads it at scrape time, so every process reports the same
global figures. Label values are always from small fixed sets (never an id or an email).

Several processes on one machine (uvicorn workers, a web process next to a worker) share their
counters through `PROMETHEUS_MULTIPROC_DIR` (prometheus_client's multiprocess mode: set it, to an
empty directory, before the processes start); `/metrics` then reports the sum of them all.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "whop_autocancel"

# prometheus_client writes each process's values under this directory in multiprocess mode and
# fails on the first value if it is missing: create it rather than fail a webhook later.
if _multiproc_dir := os.environ.get(MULTIPROC_ENV):
    Path(_multiproc_dir).mkdir(parents=True, exist_ok=True)

# Webhooks ----------------------------------------------------------------------------------------

WEBHOOKS = Counter(
    f"{PREFIX}_webhooks",
    "Webhooks received at POST /webhooks/whop, by event type and what became of them "
    "(received: stored, to be applied; duplicate; or refused).",
    ["type", "outcome"],
)
WEBHOOK_SECONDS = Histogram(
    f"{PREFIX}_webhook_ingest_seconds",
    "Time to answer one webhook (read, verify, store durably), by outcome.",
    ["outcome"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
WEBHOOK_APPLIES = Counter(
    f"{PREFIX}_webhook_applies",
    "Stored webhooks applied by a worker (the webhooks.apply and webhooks.reapply jobs), by "
    "event type and result (handled, ignored: a type we do not act on, failed: retried).",
    ["type", "outcome"],
)
UNKNOWN_TYPE = "unknown"  # not verified or not readable: the body's type is not trusted
OTHER_TYPE = "other"  # signed, but not shaped like an event type (kept out of the labels)
_EVENT_TYPE = re.compile(r"^[a-z0-9_]{1,40}(\.[a-z0-9_]{1,40}){1,3}$")

# Deliveries and cancellations ---------------------------------------------------------------------

DELIVERIES = Counter(
    f"{PREFIX}_deliveries",
    "Delivery attempts of one order, by outcome (delivered, waiting, out_of_stock, unreadable, "
    "failed, not_applicable).",
    ["outcome"],
)
CANCELLATIONS = Counter(
    f"{PREFIX}_cancellations",
    "Cancellations that ended (one per attempt generation), by final status.",
    ["outcome"],
)
CANCELLATION_ATTEMPTS = Histogram(
    f"{PREFIX}_cancellation_attempts",
    "Whop calls spent by a cancellation that ended (its attempt generation).",
    buckets=(0, 1, 2, 3, 4, 5, 7, 10, 20, 50, 100),
)
PURCHASE_TO_CANCELLED = Histogram(
    f"{PREFIX}_purchase_to_cancelled_seconds",
    "From the purchase (its payment, or the first webhook that told us of it, whichever came "
    "later) to the membership cancelled.",
    buckets=(1, 2.5, 5, 7.5, 10, 15, 30, 60, 120, 300, 900, 3600, 6 * 3600, 86400),
)

# Whop API -----------------------------------------------------------------------------------------

WHOP_REQUESTS = Counter(
    f"{PREFIX}_whop_requests",
    "Calls to the Whop API, by endpoint (a route template, never an id) and HTTP status "
    "(or transport_error: no answer).",
    ["endpoint", "status"],
)
WHOP_SECONDS = Histogram(
    f"{PREFIX}_whop_request_seconds",
    "Duration of one Whop API call, by endpoint.",
    ["endpoint"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
WHOP_PACING = Histogram(
    f"{PREFIX}_whop_pacing_wait_seconds",
    "How long a Whop API call waited for its turn under WHOP_RATE_LIMIT (all processes share "
    "one budget).",
    buckets=(0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
TRANSPORT_ERROR = "transport_error"

# Jobs --------------------------------------------------------------------------------------------

JOB_RUNS = Counter(
    f"{PREFIX}_job_runs",
    "Jobs this process ran (a worker's queue jobs, and each cancellation attempt of its "
    "dispatcher as cancellation.attempt), by job name.",
    ["job"],
)
JOB_CPU_SECONDS = Counter(
    f"{PREFIX}_job_cpu_seconds",
    "CPU time those jobs spent (their thread's time: waiting for a lock, the database or a "
    "server is not counted; of a cancellation attempt, its database work: its call to Whop "
    "runs on the dispatcher's shared event loop), by job name. Divided by job_runs: what one "
    "costs.",
    ["job"],
)


def observe_job(job: str, cpu_seconds: float, *, run: bool = True) -> None:
    """One job run (`run`), or more CPU time of one (`run=False`)."""
    if run:
        JOB_RUNS.labels(job).inc()
    JOB_CPU_SECONDS.labels(job).inc(cpu_seconds)


# Mail and alerts ----------------------------------------------------------------------------------

EMAIL_ATTEMPTS = Counter(
    f"{PREFIX}_email_attempts",
    "Attempts to send one outbox message, by kind (delivery, admin_delivered, alert, chat) and "
    "result (sent; retry: refused for now; failed: given up for good).",
    ["kind", "result"],
)
ALERTS = Counter(
    f"{PREFIX}_alerts",
    "Alerts raised, by kind and outcome (sent at once; folded into the next digest; "
    "deduplicated: raised before, nothing sent).",
    ["kind", "outcome"],
)
ALERT_DIGESTS = Counter(
    f"{PREFIX}_alert_digests",
    "Digest messages sent (each carries the alerts folded within ALERT_THROTTLE), by kind.",
    ["kind"],
)


def webhook_type(event_type: str | None) -> str:
    """The `type` label of a webhook: its event type when it looks like one, else a fixed
    word (a label never holds arbitrary input)."""
    if event_type is None:
        return UNKNOWN_TYPE
    return event_type if _EVENT_TYPE.match(event_type) else OTHER_TYPE


def email_kind(kind: str) -> str:
    """The `kind` label of an outbox message: `alert:<alert kind>` counts as `alert`."""
    return kind.split(":", 1)[0]


def observe_webhook(event_type: str | None, outcome: str, seconds: float) -> None:
    WEBHOOKS.labels(webhook_type(event_type), outcome).inc()
    WEBHOOK_SECONDS.labels(outcome).observe(seconds)


def observe_webhook_apply(event_type: str, outcome: str) -> None:
    WEBHOOK_APPLIES.labels(webhook_type(event_type), outcome).inc()


def observe_whop_call(endpoint: str, status: int | None, seconds: float) -> None:
    WHOP_REQUESTS.labels(endpoint, TRANSPORT_ERROR if status is None else str(status)).inc()
    WHOP_SECONDS.labels(endpoint).observe(seconds)


def observe_whop_pacing(seconds: float) -> None:
    WHOP_PACING.observe(max(seconds, 0.0))


def observe_cancellation_end(outcome: str, attempts: int, seconds: float | None) -> None:
    """A cancellation ended: `seconds` from purchase to cancelled (None: not cancelled by us,
    or the purchase time is unknown)."""
    CANCELLATIONS.labels(outcome).inc()
    CANCELLATION_ATTEMPTS.observe(attempts)
    if seconds is not None:
        PURCHASE_TO_CANCELLED.observe(max(seconds, 0.0))


# Exposition ---------------------------------------------------------------------------------------


def multiprocess_dir() -> str | None:
    """The shared directory of multiprocess mode, or None (this process's own values)."""
    return os.environ.get(MULTIPROC_ENV) or None


class _Together:
    """Several collectors exposed as one (no registry: names are not re-checked per scrape)."""

    def __init__(self, *collectors: Collector) -> None:
        self._collectors = collectors

    def collect(self) -> Iterator[Metric]:
        for collector in self._collectors:
            yield from collector.collect()


def process_collector() -> Collector:
    """What this process (or, in multiprocess mode, every process on the machine) counted."""
    directory = multiprocess_dir()
    if directory is None:
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return registry


def exposition(*extra: Collector) -> bytes:
    """The Prometheus text of the process's instruments and the `extra` collectors."""
    return generate_latest(_Together(process_collector(), *extra))


CONTENT_TYPE = CONTENT_TYPE_LATEST


def bearer_matches(authorization: str | None, token_digest: bytes) -> bool:
    """Whether `Authorization: Bearer <token>` carries the token whose SHA-256 is
    `token_digest` (compared as digests, in constant time)."""
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    offered = credentials.strip().encode() if scheme.lower() == "bearer" else b""
    return bool(offered) and hmac.compare_digest(hashlib.sha256(offered).digest(), token_digest)


# A metrics port for processes without a web app (workers) -----------------------------------------


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return None


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


StartResponse = Callable[..., Any]


@dataclass
class MetricsServer:
    """A running metrics port; `stop()` closes it."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_metrics_server(
    port: int, host: str = "127.0.0.1", *, token: str | None = None
) -> MetricsServer:
    """Serve `GET /metrics` of this process (multiprocess mode: of the machine) on `host:port`
    in a daemon thread, for a worker, which has no web app. With `token` a scrape needs
    `Authorization: Bearer <token>` (else 401); without, keep the port on loopback or behind a
    firewall. Port 0 picks a free port (see `.port`)."""
    token_digest = hashlib.sha256(token.encode()).digest() if token else None

    def application(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") not in ("/metrics", "/"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        if token_digest is not None and not bearer_matches(
            environ.get("HTTP_AUTHORIZATION"), token_digest
        ):
            start_response(
                "401 Unauthorized",
                [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")],
            )
            return [b"missing or wrong bearer token\n"]
        body = exposition()
        start_response("200 OK", [("Content-Type", CONTENT_TYPE)])
        return [body]

    server = make_server(
        host, port, application, server_class=_ThreadingServer, handler_class=_QuietHandler
    )
    thread = threading.Thread(target=server.serve_forever, name="metrics-server", daemon=True)
    thread.start()
    return MetricsServer(server, thread)
