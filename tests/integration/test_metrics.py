"""Metrics and logs that answer questions, against the real app over real HTTP: GET /metrics
(token, off by default, multiprocess), the counters a purchase moves (webhook → delivery →
cancellation at the simulator), the database's figures on SQLite, PostgreSQL and MariaDB, the
queue's depth and lateness on each queue backend, a worker's metrics port; the rejected-webhook
log and its summary, the access log, and the order id on every line about a purchase."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

import whop_autocancel
from support.harness import (
    SECRET,
    STOCK_POOL,
    ServiceServer,
    event_body,
    make_runtime,
    make_settings,
    post_event,
    signed_headers,
    wait_for,
)
from support.logs import LogLines, captured_logs
from support.stock import StockWorld, stock_world
from whop_autocancel import metrics
from whop_autocancel.admin.stock import void_stock
from whop_autocancel.alerts.models import Alert
from whop_autocancel.cancellation.models import Cancellation
from whop_autocancel.clock import FrozenClock, SystemClock
from whop_autocancel.delivery.models import StockItem
from whop_autocancel.jobs import Backlog, Jobs
from whop_autocancel.mail.models import Email
from whop_autocancel.mail.sink import SmtpSink
from whop_autocancel.simulator import SimulatorServer
from whop_autocancel.webhooks.rejections import RejectionLog

TOKEN = "metrics-token-for-the-tests-5c1e0b"
P = "whop_autocancel"
CANCEL_ENDPOINT = "POST /memberships/{id}/cancel"

Key = tuple[str, frozenset[tuple[str, str]]]


def key(name: str, **labels: str) -> Key:
    return (name, frozenset(labels.items()))


class Scrape:
    """One parsed exposition: every sample by (name, labels), and each sample's family type."""

    def __init__(self, text: str) -> None:
        self.samples: dict[Key, float] = {}
        self.types: dict[str, str] = {}
        self.families: set[str] = set()
        for family in text_string_to_metric_families(text):
            self.families.add(family.name)
            for sample in family.samples:
                self.samples[key(sample.name, **sample.labels)] = sample.value
                self.types[sample.name] = family.type

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get(key(name, **labels), 0.0)

    def labelled(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        return {labels: value for (sample, labels), value in self.samples.items() if sample == name}


def scrape(http: httpx.Client, token: str = TOKEN) -> Scrape:
    response = http.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)


def moved(before: Scrape, after: Scrape) -> dict[Key, float]:
    """Every sample of our counters and histograms (count and sum) that changed, by how much."""
    changes: dict[Key, float] = {}
    for sample_key, value in after.samples.items():
        name = sample_key[0]
        if not name.startswith(P) or after.types[name] not in ("counter", "histogram"):
            continue
        if name.endswith(("_bucket", "_created")):
            continue
        change = value - before.samples.get(sample_key, 0.0)
        if change:
            changes[sample_key] = change
    return changes


@pytest.fixture
def logs() -> Iterator[LogLines]:
    """The service's structured lines, as written (JSON), read back as dicts."""
    with captured_logs() as lines:
        yield lines


@pytest.fixture
def shop(
    tmp_path: Path,
    clock: FrozenClock,
    simulator: SimulatorServer,
    smtp_sink: SmtpSink,
    database_url: str,
) -> Iterator[StockWorld]:
    """A running shop selling from stock, with metrics on, on each database."""
    with stock_world(
        tmp_path, clock, simulator, smtp_sink, database_url, METRICS_TOKEN=TOKEN
    ) as world:
        yield world


@contextmanager
def web(tmp_path: Path, clock: FrozenClock, **settings: Any) -> Iterator[httpx.Client]:
    """The app alone (no simulator), on a SQLite file."""
    runtime = make_runtime(make_settings(tmp_path, **settings), clock)
    try:
        with (
            ServiceServer(runtime).running() as server,
            httpx.Client(base_url=server.url, timeout=10) as http,
        ):
            yield http
    finally:
        runtime.close()


# GET /metrics -----------------------------------------------------------------------------------


def test_metrics_are_off_without_a_token(tmp_path: Path, clock: FrozenClock) -> None:
    with web(tmp_path, clock) as http:
        assert http.get("/metrics").status_code == 404
        assert http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404


def test_metrics_answer_only_the_bearer_token(tmp_path: Path, clock: FrozenClock) -> None:
    with web(tmp_path, clock, METRICS_TOKEN=TOKEN) as http:
        for headers in (
            {},
            {"Authorization": TOKEN},
            {"Authorization": f"Basic {TOKEN}"},
            {"Authorization": f"Bearer {TOKEN[:-1]}"},
            {"Authorization": f"Bearer {TOKEN}x"},
            {"Authorization": "Bearer"},
        ):
            refused = http.get("/metrics", headers=headers)
            assert refused.status_code == 401, headers
            assert refused.headers["www-authenticate"] == "Bearer"
            assert TOKEN not in refused.text
        samples = scrape(http)
        assert samples.value(f"{P}_collector_up", part="database") == 1
        assert samples.value(f"{P}_collector_up", part="queue") == 1
        assert scrape(http, token=TOKEN).families >= {f"{P}_webhooks", f"{P}_queue_jobs"}
        # The scheme is case-insensitive, as for the checkout token.
        lower = http.get("/metrics", headers={"Authorization": f"bearer {TOKEN}"})
        assert lower.status_code == 200
        # Not part of the public API's schema.
        assert "/metrics" not in http.get("/openapi.json").json()["paths"]


# What a purchase moves --------------------------------------------------------------------------


def test_a_purchase_moves_each_counter_by_exactly_its_share(shop: StockWorld) -> None:
    shop.import_items("KEY-A1", "KEY-A2", "KEY-A3")  # threshold 2: the sale leaves it low
    before = scrape(shop.http)
    purchase = shop.pay()
    shop.drain()  # delivery, its emails, the low-stock alert
    shop.settle()  # CANCEL_DELAY later: the cancellation
    after = scrape(shop.http)

    order = shop.order(purchase["order_id"])
    row = shop.cancellation(order.id)
    assert row is not None
    assert row.status == "canceled"
    assert row.canceled_at is not None
    assert order.paid_at is not None
    since_purchase = (row.canceled_at - max(order.paid_at, order.created_at)).total_seconds()
    assert since_purchase == pytest.approx(shop.runtime.settings.CANCEL_DELAY + 1)

    changes = moved(before, after)
    durations = {
        sample_key: changes.pop(sample_key)
        for sample_key in [
            key(f"{P}_webhook_ingest_seconds_sum", outcome="received"),
            key(f"{P}_whop_request_seconds_sum", endpoint=CANCEL_ENDPOINT),
            key(f"{P}_purchase_to_cancelled_seconds_sum"),
        ]
    }
    assert all(duration > 0 for duration in durations.values())
    assert durations[key(f"{P}_purchase_to_cancelled_seconds_sum")] == pytest.approx(since_purchase)
    # mail.send: one for the purchase (the admin's notice goes in the batch of the customer's
    # email) and one for the low-stock alert.
    jobs = {"webhooks.apply": 1, "delivery.deliver": 1, "mail.send": 2, "cancellation.run": 1}
    # Every job that ran counted its CPU time (the worker here runs cancellations as jobs).
    assert all(changes.pop(key(f"{P}_job_cpu_seconds_total", job=job)) > 0 for job in jobs)
    assert changes == {
        **{key(f"{P}_job_runs_total", job=job): runs for job, runs in jobs.items()},
        key(f"{P}_webhooks_total", type="payment.succeeded", outcome="received"): 1,
        key(f"{P}_webhook_ingest_seconds_count", outcome="received"): 1,
        key(f"{P}_webhook_applies_total", type="payment.succeeded", outcome="handled"): 1,
        key(f"{P}_deliveries_total", outcome="delivered"): 1,
        key(f"{P}_alerts_total", kind="low_stock", outcome="sent"): 1,
        key(f"{P}_email_attempts_total", kind="delivery", result="sent"): 1,
        key(f"{P}_email_attempts_total", kind="admin_delivered", result="sent"): 1,
        key(f"{P}_email_attempts_total", kind="alert", result="sent"): 1,
        key(f"{P}_whop_requests_total", endpoint=CANCEL_ENDPOINT, status="200"): 1,
        key(f"{P}_whop_request_seconds_count", endpoint=CANCEL_ENDPOINT): 1,
        key(f"{P}_whop_pacing_wait_seconds_count"): 1,  # its turn: no wait (sum unmoved)
        key(f"{P}_cancellations_total", outcome="canceled"): 1,
        key(f"{P}_cancellation_attempts_count"): 1,
        key(f"{P}_cancellation_attempts_sum"): 1,
        key(f"{P}_purchase_to_cancelled_seconds_count"): 1,
    }
    # The histogram puts the one cancellation in its buckets: 6 s is above 5, within 7.5.
    assert (
        after.value(f"{P}_purchase_to_cancelled_seconds_bucket", le="7.5")
        - before.value(f"{P}_purchase_to_cancelled_seconds_bucket", le="7.5")
        == 1
    )
    assert after.value(f"{P}_purchase_to_cancelled_seconds_bucket", le="5.0") == before.value(
        f"{P}_purchase_to_cancelled_seconds_bucket", le="5.0"
    )


def test_a_refused_cancel_and_folded_alerts_are_counted(shop: StockWorld) -> None:
    before = scrape(shop.http)
    # No stock: the first buyer's out_of_stock alert goes out at once, the second buyer's is
    # folded into the digest (ALERT_THROTTLE is an hour here).
    first = shop.pay()
    shop.drain()
    second = shop.pay()
    shop.drain()
    assert shop.order(first["order_id"]).waiting_for_stock == STOCK_POOL
    assert shop.order(second["order_id"]).waiting_for_stock == STOCK_POOL
    middle = scrape(shop.http)
    alerts = moved(before, middle)
    assert alerts[key(f"{P}_alerts_total", kind="out_of_stock", outcome="sent")] == 1
    assert alerts[key(f"{P}_alerts_total", kind="out_of_stock", outcome="folded")] == 1
    assert alerts[key(f"{P}_deliveries_total", outcome="out_of_stock")] >= 1
    assert middle.value(f"{P}_alert_rows", kind="out_of_stock", state="awaiting_digest") == 1
    assert middle.value(f"{P}_stock_waiting_orders", pool=STOCK_POOL) == 2

    # An hour later the sweep sends the digest of what was folded.
    shop.clock.advance(3601)
    shop.runtime.stuck_sweep.run(force=True)
    shop.drain()
    digested = scrape(shop.http)
    assert moved(middle, digested)[key(f"{P}_alert_digests_total", kind="out_of_stock")] == 1
    assert digested.value(f"{P}_alert_rows", kind="out_of_stock", state="awaiting_digest") == 0

    # Stock arrives; Whop refuses the first buyer's cancel: one POST (422), one GET, failed.
    shop.import_items("KEY-B1", "KEY-B2", "KEY-B3", "KEY-B4")
    shop.drain()
    shop.simulator.state.reject(first["membership_id"], 422)
    shop.settle()
    after = scrape(shop.http)
    changes = moved(digested, after)
    assert changes[key(f"{P}_whop_requests_total", endpoint=CANCEL_ENDPOINT, status="422")] == 1
    assert (
        changes[key(f"{P}_whop_requests_total", endpoint="GET /memberships/{id}", status="200")]
        == 1
    )
    assert changes[key(f"{P}_cancellations_total", outcome="failed")] == 1
    assert changes[key(f"{P}_cancellations_total", outcome="canceled")] == 1  # the second's
    assert changes[key(f"{P}_cancellation_attempts_count")] == 2
    assert changes[key(f"{P}_alerts_total", kind="cancellation_failed", outcome="sent")] == 1
    assert changes[key(f"{P}_deliveries_total", outcome="delivered")] == 2
    assert after.value(f"{P}_cancellation_rows", status="failed") == 1


# The database's figures ---------------------------------------------------------------------------


def test_the_database_figures_match_the_rows(shop: StockWorld) -> None:
    shop.import_items(*[f"KEY-C{n}" for n in range(6)])
    void_stock(shop.runtime, shop.item_ids("KEY-C5")["KEY-C5"], "leaked")
    delivered = shop.pay()
    shop.drain()
    bounced = "bounces@example.com"
    shop.sink.reject(bounced)
    shop.pay(email=bounced)  # its delivery email fails for good: an email_failed alert
    shop.drain()
    waiting = shop.pay()  # paid, its delivery job still in the queue
    unapplied = json.dumps({"id": "msg_Unapplied1", "type": "course.created", "data": {}})
    assert post_event(shop.http, unapplied.encode()).json() == {"status": "received"}  # only
    shop.clock.advance(30)
    samples = scrape(shop.http)
    now = shop.clock.now()

    with shop.runtime.database.transaction() as session:
        stock = session.execute(
            select(StockItem.pool, StockItem.status, func.count()).group_by(
                StockItem.pool, StockItem.status
            )
        ).all()
        emails = session.execute(select(Email.kind, Email.sent_at, Email.failed_at)).all()
        cancellations = session.execute(
            select(Cancellation.status, Cancellation.next_attempt_at)
        ).all()
        open_alerts = session.execute(
            select(Alert.kind, func.count()).where(Alert.resolved_at.is_(None)).group_by(Alert.kind)
        ).all()

    assert sorted(stock) == [
        (STOCK_POOL, "assigned", 2),
        (STOCK_POOL, "available", 3),
        (STOCK_POOL, "void", 1),
    ]
    for pool, status, count in stock:
        assert samples.value(f"{P}_stock_items", pool=pool, state=status) == count
    assert samples.value(f"{P}_stock_low_threshold", pool=STOCK_POOL) == 2
    assert samples.value(f"{P}_stock_waiting_orders", pool=STOCK_POOL) == 0

    expected_emails: dict[tuple[str, str], int] = {}
    for kind, sent_at, failed_at in emails:
        if sent_at is None:
            status = "pending" if failed_at is None else "failed"
            label = (kind.split(":")[0], status)
            expected_emails[label] = expected_emails.get(label, 0) + 1
    assert expected_emails[("delivery", "failed")] == 1
    assert {
        (dict(labels)["kind"], dict(labels)["status"]): value
        for labels, value in samples.labelled(f"{P}_email_rows").items()
    } == expected_emails

    by_status: dict[str, int] = {}
    for status, _ in cancellations:
        by_status[status] = by_status.get(status, 0) + 1
    for status in ("scheduled", "running", "failed"):
        assert samples.value(f"{P}_cancellation_rows", status=status) == by_status.get(status, 0)
    assert by_status == {"scheduled": 2}  # the delivered one's and the bounced one's (held)

    assert {
        dict(labels)["kind"]: value
        for labels, value in samples.labelled(f"{P}_alert_rows").items()
        if dict(labels)["state"] == "open"
    } == dict(open_alerts)
    assert dict(open_alerts)["email_failed"] == 1

    # Work overdue, as the clock sees it: the paid order waits since its payment (30 s ago), the
    # stored event since it arrived; the earliest scheduled cancellation is late by its own time.
    assert samples.value(f"{P}_overdue_work_seconds", kind="delivery") == pytest.approx(30)
    assert samples.value(f"{P}_overdue_work_seconds", kind="event") == pytest.approx(30)
    earliest = min(due for _, due in cancellations)
    assert samples.value(f"{P}_overdue_work_seconds", kind="cancellation") == pytest.approx(
        (now - earliest).total_seconds()
    )
    assert samples.value(f"{P}_overdue_work_seconds", kind="email") == 0  # none unsent is due

    backlog = shop.runtime.jobs.backlog()
    assert samples.value(f"{P}_queue_jobs", state="ready") == backlog.ready >= 1
    assert samples.value(f"{P}_queue_jobs", state="scheduled") == backlog.scheduled
    assert samples.value(f"{P}_webhook_event_rows", status="failed") == 0
    assert samples.value(f"{P}_webhook_event_rows", status="received") == 1
    assert samples.value(f"{P}_collector_up", part="database") == 1
    assert delivered["order_id"] != waiting["order_id"]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "redis"])
def test_the_queue_tells_its_depth_and_how_late_its_oldest_due_job_is(
    tmp_path: Path, backend: str
) -> None:
    from support.backends import RUN_ID, queue_url

    jobs = Jobs(queue_url(backend, tmp_path), f"{RUN_ID}-backlog-{backend}")
    huey = jobs.huey
    try:
        assert jobs.backlog() == Backlog(ready=0, scheduled=0, oldest_due_age=0.0)
        jobs.register("test.noop", lambda *args: None)
        jobs.enqueue("test.noop", 1)  # to run at once: counted, carries no due time
        jobs.enqueue("test.noop", 2, delay=3600)  # due in an hour: not late
        now = datetime.now(UTC)
        wrapper = huey.task(name="test.late")(lambda: None)
        # Due 30 s ago, still in the schedule (no consumer moved it): 30 s late.
        huey.add_schedule(wrapper.s(eta=now - timedelta(seconds=30)))
        backlog = jobs.backlog(now=now)
        assert (backlog.ready, backlog.scheduled) == (2, 1)
        assert backlog.oldest_due_age == pytest.approx(30)
        # A delayed job moved to the queue once due, waiting there for a worker thread.
        huey.enqueue(wrapper.s(eta=now - timedelta(seconds=90)))
        backlog = jobs.backlog(now=now)
        assert (backlog.ready, backlog.scheduled) == (3, 1)
        assert backlog.oldest_due_age == pytest.approx(90)
    finally:
        huey.flush()


# Several processes, and a worker's port -----------------------------------------------------------


def test_multiprocess_mode_adds_up_every_process_on_the_machine(
    tmp_path: Path, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "prometheus"
    environment = {
        **os.environ,
        metrics.MULTIPROC_ENV: str(shared),
        "PYTHONPATH": str(Path(whop_autocancel.__file__).resolve().parents[1]),
    }
    record = (
        "from whop_autocancel import metrics\n"
        "metrics.observe_webhook('payment.succeeded', 'received', 0.02)\n"
        "metrics.observe_whop_call('GET /payments', 200, 0.1)\n"
        "metrics.observe_whop_call('GET /payments', None, 5.0)\n"
    )
    for _ in range(2):  # two processes (think: two uvicorn workers), each counting its own
        subprocess.run([sys.executable, "-c", record], env=environment, check=True, timeout=60)
    assert shared.is_dir()  # created by the first process that imported the metrics

    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(shared))
    with web(tmp_path, clock, METRICS_TOKEN=TOKEN) as http:
        samples = scrape(http)
    assert samples.value(f"{P}_webhooks_total", type="payment.succeeded", outcome="received") == 2
    assert samples.value(f"{P}_webhook_ingest_seconds_count", outcome="received") == 2
    assert samples.value(f"{P}_whop_requests_total", endpoint="GET /payments", status="200") == 2
    assert (
        samples.value(
            f"{P}_whop_requests_total", endpoint="GET /payments", status="transport_error"
        )
        == 2
    )
    assert samples.value(f"{P}_collector_up", part="database") == 1  # the database's still there


def test_a_worker_serves_its_metrics_on_a_port_of_its_own() -> None:
    guarded = metrics.start_metrics_server(0, token=TOKEN)
    open_port = metrics.start_metrics_server(0)
    try:
        url = f"http://127.0.0.1:{guarded.port}"
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert (
            httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        )
        answer = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert answer.status_code == 200
        assert {f"{P}_webhooks", f"{P}_cancellations"} <= Scrape(answer.text).families
        assert (
            httpx.get(f"{url}/other", headers={"Authorization": f"Bearer {TOKEN}"}).status_code
            == 404
        )
        plain = httpx.get(f"http://127.0.0.1:{open_port.port}/metrics")
        assert plain.status_code == 200
        assert f"{P}_whop_requests" in Scrape(plain.text).families
    finally:
        guarded.stop()
        open_port.stop()


# Logs ---------------------------------------------------------------------------------------------


def test_rejected_webhooks_name_the_client_and_fold_into_a_summary_a_minute(
    tmp_path: Path, clock: FrozenClock, logs: LogLines
) -> None:
    with web(tmp_path, clock, METRICS_TOKEN=TOKEN, WEBHOOK_MAX_BYTES=8192) as http:
        before = scrape(http)
        forged = event_body("payment.succeeded.legacy.json")
        for _ in range(6):
            answer = post_event(http, forged, secret="ws_not_the_secret_0000")
            assert answer.status_code == 401
        not_an_event = b'{"hello": "world"}'
        assert post_event(http, not_an_event).status_code == 400
        huge = b"{" + b" " * 9000 + b"}"
        assert (
            http.post("/webhooks/whop", content=huge, headers=signed_headers(huge)).status_code
            == 413
        )

        full = logs.events("webhook_rejected")
        assert len(full) == 5  # the first five of the minute, in full
        assert {line["client"] for line in full} == {"127.0.0.1"}
        assert {line["outcome"] for line in full} == {"bad_signature"}
        assert all(line["http_status"] == 401 and line["reason"] for line in full)
        assert logs.events("webhooks_rejected_summary") == []

        clock.advance(60)  # the minute is over: the next refusal closes it with one summary
        assert post_event(http, forged, secret="ws_not_the_secret_0000").status_code == 401
        [summary] = logs.events("webhooks_rejected_summary")
        assert summary["rejected"] == 3
        assert summary["by_reason"] == {"bad_request": 1, "bad_signature": 1, "too_large": 1}
        assert summary["top_clients"] == {"127.0.0.1": 3}
        assert summary["logged_in_full"] == 5
        assert summary["level"] == "warning"
        full = logs.events("webhook_rejected")
        assert len(full) == 6  # a new minute: logged in full again
        assert full[-1]["client"] == "127.0.0.1"

        changes = moved(before, scrape(http))
        assert changes[key(f"{P}_webhooks_total", type="unknown", outcome="bad_signature")] == 7
        assert changes[key(f"{P}_webhooks_total", type="unknown", outcome="bad_request")] == 1
        assert changes[key(f"{P}_webhooks_total", type="unknown", outcome="too_large")] == 1
    text = logs.text
    assert SECRET not in text
    assert TOKEN not in text


def test_a_summary_is_logged_when_the_minute_ends_without_another_refusal(
    logs: LogLines,
) -> None:
    rejected = RejectionLog(SystemClock(), free=1, window=0.2)
    try:
        for address in ("10.0.0.7", "10.0.0.7", "10.0.0.8"):
            rejected.record("bad_signature", address, reason="no signature matches")
        wait_for(lambda: bool(logs.events("webhooks_rejected_summary")), what="the summary")
    finally:
        rejected.close()
    [summary] = logs.events("webhooks_rejected_summary")
    assert summary["rejected"] == 2
    assert summary["by_reason"] == {"bad_signature": 2}
    assert summary["top_clients"] == {"10.0.0.7": 1, "10.0.0.8": 1}
    assert len(logs.events("webhook_rejected")) == 1


@pytest.mark.parametrize("enabled", [True, False])
def test_the_access_log_has_a_line_per_request_without_the_query_string(
    tmp_path: Path, clock: FrozenClock, logs: LogLines, enabled: bool
) -> None:
    secret_query = "DISTINCTIVE-query-value-77"
    with web(tmp_path, clock, ACCESS_LOG=enabled) as http:
        assert http.get(f"/healthz?token={secret_query}").status_code == 200
        assert http.post("/webhooks/whop", content=b"{}").status_code == 401
        assert http.get("/nowhere").status_code == 404
        if enabled:
            wait_for(lambda: len(logs.events("http_request")) == 3, what="three access lines")
    lines = logs.events("http_request")
    if not enabled:
        assert lines == []
        return
    assert [(line["method"], line["path"], line["status"]) for line in lines] == [
        ("GET", "/healthz", 200),
        ("POST", "/webhooks/whop", 401),
        ("GET", "/nowhere", 404),
    ]
    assert all(line["client"] == "127.0.0.1" and line["duration_ms"] >= 0 for line in lines)
    assert secret_query not in logs.text


def test_every_line_about_a_purchase_names_its_order(shop: StockWorld, logs: LogLines) -> None:
    shop.import_items("KEY-D1", "KEY-D2", "KEY-D3", "KEY-D4")
    purchase = shop.pay()
    shop.drain()
    shop.settle()
    assert shop.cancellation(purchase["order_id"]).status == "canceled"  # type: ignore[union-attr]
    about = ("payment_id", "membership_id", "cancellation_id")
    lines = [
        line
        for line in logs.events()
        if any(line.get(name) for name in about)
        or line.get("kind") in ("delivery", "admin_delivered")
    ]
    events = {line["event"] for line in lines}
    assert {"payment_matched", "delivered", "email_sent", "cancel_attempt", "cancelled"} <= events
    assert [line for line in lines if line.get("order_id") != purchase["order_id"]] == []
    [received] = logs.events("webhook_received")  # stored: its order is not known yet
    [applied] = logs.events("webhook_applied")
    assert applied["event_id"] == received["event_id"]
    assert applied["order_id"] == purchase["order_id"]


def test_the_worker_command_serves_metrics_on_its_port_behind_the_token(tmp_path: Path) -> None:
    """`worker --metrics-port`: a real worker process answers /metrics with the bearer token
    and refuses without it; a taken port stops it at once with one plain line."""
    from support.harness import free_port, run_cli, service_environment

    token = "metrics-token-for-the-worker-1234"
    port = free_port()
    environment = service_environment(tmp_path, METRICS_TOKEN=token)
    worker = subprocess.Popen(
        [sys.executable, "-m", "whop_autocancel", "worker", "--metrics-port", str(port)],
        env=environment,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}/metrics"
    try:

        def answers() -> bool:
            assert worker.poll() is None, worker.stderr.read() if worker.stderr else ""
            try:
                return httpx.get(url, timeout=5).status_code == 401
            except httpx.TransportError:
                return False

        wait_for(answers)
        scraped = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=5)
        assert scraped.status_code == 200
        names = {family.name for family in text_string_to_metric_families(scraped.text)}
        assert {"whop_autocancel_cancellations", "whop_autocancel_whop_requests"} <= names, names
        assert token not in scraped.text

        taken = run_cli(tmp_path, "worker", "--metrics-port", str(port), env=environment)
        assert taken.returncode == 2
        last = taken.stderr.strip().splitlines()[-1]
        assert last.startswith(
            f"whop-autocancel: configuration error: --metrics-port: cannot listen on "
            f"127.0.0.1:{port}:"
        ), taken.stderr
    finally:
        worker.terminate()
        worker.wait(timeout=60)
