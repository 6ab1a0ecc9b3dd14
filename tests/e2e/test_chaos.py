"""Chaos: real processes (web + workers), the Whop simulator over HTTP and an SMTP sink, while
things break — workers killed with SIGKILL, Whop down or refusing the key or rate limiting,
webhooks duplicated, forged or lost, SMTP refusing mail. Every scenario waits on database state
(never on a sleep) and asserts exact counts, which it prints (`pytest -rP` shows them).

These run on SQLite (database and queue files in tmp_path), not on the backend diagonal: they
test the product's recovery logic, which is the same on every backend, and SQLite keeps them
fast and deterministic on a small machine. The backend matrix is test_processes/test_concurrency.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from support.chaos import RESENDS_PER_KILL, Cluster, parse_at, report, wait
from support.concurrency import _bodies as event_bodies
from support.harness import SECRET, signed_headers
from whop_autocancel.cancellation.models import Cancellation

pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class Send:
    """One webhook request of the storm and the answer it must get."""

    url: str
    body: bytes
    expected: int
    secret: str = SECRET
    at: datetime | None = None
    webhook_id: str | None = None  # None: the body's own `id`

    def post(self, http: httpx.Client) -> int:
        headers = signed_headers(
            self.body, secret=self.secret, at=self.at, webhook_id=self.webhook_id
        )
        return http.post(self.url, content=self.body, headers=headers).status_code


def renamed(body: bytes) -> bytes:
    """The same event under a new id (a forgery or a replay must not pass as the original)."""
    document = json.loads(body)
    document["id"] = f"msg_{uuid.uuid4().hex}"
    return json.dumps(document).encode()


def test_kill_9_workers_during_a_run(tmp_path: Path) -> None:
    """300 purchases in 5 waves; in each wave a worker holding a running cancellation is killed
    with SIGKILL and a fresh one started. Nothing is lost and nothing happens twice."""
    rng = random.Random(1)
    with Cluster(tmp_path, workers=2) as cluster:
        # Slow Whop answers keep cancellations `running` long enough to be killed mid-call;
        # some calls are carried out but answered 504 late, so a kill can land after Whop acted.
        cluster.state.set_latency(0.3)
        cluster.state.set_faults(timeout_rate=0.2, timeout_seconds=0.6, seed=3)
        for _ in range(5):
            cluster.buy(60)
            wait(lambda: bool(cluster.running_owners()), 60, "a cancellation to be running")
            owners = cluster.running_owners()
            targets = [i for i, w in enumerate(cluster.workers) if w.pid in owners]
            if not targets:  # the row finished between the two reads: kill any worker
                targets = list(range(len(cluster.workers)))
            cluster.kill_worker(rng.choice(targets))
            cluster.start_worker()
            time.sleep(0.7)  # pacing only
        cluster.state.set_faults(timeout_rate=0.0)
        wait(cluster.settled, 240, "every cancellation to finish and every email to go out")

        fresh = cluster.fresh_cancels()
        calls = cluster.cancel_calls()
        counts = {
            "kills (SIGKILL)": cluster.kills,
            "purchases": len(cluster.purchases),
            "orders": cluster.orders(),
            "cancellations by status": dict(cluster.cancellation_statuses()),
            "memberships canceled at Whop": cluster.canceled_at_whop(),
            "buyers by emails received": dict(cluster.delivery_counts()),
            "delivery email rows": sum(e.kind == "delivery" for e in cluster.emails()),
            "buyers who got the same email twice (kill after SMTP)": cluster.duplicates(),
            "cancel calls": len(calls),
            "carried out (fresh 200 or late 504)": sum(fresh.values()),
            "replayed 200s": sum(1 for c in calls if c["status"] == 200 and c["replayed"]),
            "simulated timeouts (504)": sum(1 for c in calls if c["timed_out"]),
            "canceled by the echo after a lost answer": sum(
                "answer was lost" in (row.last_error or "") for row in cluster.cancellations()
            ),
        }
        report("kill -9 workers during a run", counts)
        n = len(cluster.purchases)
        assert cluster.kills == 5
        assert n == 300
        assert cluster.orders() == n
        # Each row says what happened, whichever came first (the answer to our call, or the
        # echo webhook of it): `canceled` when a call of ours was carried out at Whop (the
        # simulator's record; we are its only caller), `already_inactive` only when none was.
        assert cluster.status_by_membership() == {
            p["membership_id"]: "canceled" if fresh[p["membership_id"]] else "already_inactive"
            for p in cluster.purchases
        }
        assert cluster.canceled_at_whop() == n
        # One delivery email per buyer in the outbox, each sent. SMTP is at least once: an email
        # whose worker was killed after the server took it but before `sent_at` was written is
        # sent again (same outbox row) once its lease expires — at most the batches in flight.
        deliveries = [e for e in cluster.emails() if e.kind == "delivery"]
        assert Counter(e.to_address for e in deliveries) == Counter(
            {p["email"]: 1 for p in cluster.purchases}
        )
        assert cluster.unsent() == 0
        outbox_ids = cluster.outbox_ids()
        assert all(len(outbox_ids[p["email"]]) == 1 for p in cluster.purchases)
        assert 0 not in cluster.delivery_counts()
        resent = sum(count - 1 for count in cluster.delivery_counts().elements())
        assert resent <= cluster.kills * RESENDS_PER_KILL
        assert all(fresh[p["membership_id"]] == 1 for p in cluster.purchases)
        assert sum(fresh.values()) == n


def test_outage_longer_than_the_retry_schedule_then_recovery(tmp_path: Path) -> None:
    """Whop answers 503 for longer than the whole retry schedule (0.3+0.6+1 s): cancellations
    keep retrying, one `whop_unreachable` alert goes out, and it resolves when Whop is back."""
    with Cluster(tmp_path, workers=1) as cluster:
        cluster.state.set_outage(True)
        cluster.buy(20)
        schedule = 3  # RETRY_SCHEDULE has 3 intervals; the 4th attempt is past it

        def past_the_schedule() -> bool:
            rows = cluster.cancellations()
            return len(rows) == 20 and all(row.attempts > schedule for row in rows)

        wait(past_the_schedule, 60, "every cancellation to retry past the schedule")
        assert cluster.cancellation_statuses()["failed"] == 0
        cluster.state.set_outage(False)
        wait(cluster.settled, 60, "every cancellation to finish after the outage")

        outage = [c for c in cluster.cancel_calls() if c["status"] == 503]
        first, last = parse_at(outage[0]["at"]), parse_at(outage[-1]["at"])
        alerts = cluster.alerts("whop_unreachable")
        fresh = cluster.fresh_cancels()
        attempts = Counter(row.attempts for row in cluster.cancellations())
        report(
            "outage longer than the retry schedule",
            {
                "purchases": len(cluster.purchases),
                "cancellations by status": dict(cluster.cancellation_statuses()),
                "attempts per cancellation (attempts: rows)": dict(sorted(attempts.items())),
                "503 answers": len(outage),
                "outage seen by cancels (s)": round((last - first).total_seconds(), 2),
                "whop_unreachable alerts (resolved)": (
                    len(alerts),
                    sum(a.resolved_at is not None for a in alerts),
                ),
                "memberships canceled at Whop": cluster.canceled_at_whop(),
                "carried-out cancel calls": sum(fresh.values()),
            },
        )
        assert (last - first).total_seconds() > 0.3 + 0.6 + 1
        assert cluster.cancellation_statuses() == Counter({"canceled": 20})
        assert min(attempts) == schedule + 2  # past the schedule, then the one that worked
        assert len(alerts) == 1
        assert alerts[0].resolved_at is not None
        assert cluster.canceled_at_whop() == 20
        assert fresh == Counter({p["membership_id"]: 1 for p in cluster.purchases})
        assert cluster.delivery_counts() == Counter({1: 20})


def test_api_key_loses_permission_for_a_while(tmp_path: Path) -> None:
    """Whop answers 403 to every cancel: nothing fails, one `whop_auth` alert, the rows pause
    (next try after the last interval of RETRY_SCHEDULE) and resume once the key works."""
    last_interval = 1.0
    with Cluster(tmp_path, workers=1) as cluster:
        cluster.state.set_forbidden(True)
        cluster.buy(20)

        def all_refused_twice() -> bool:
            refused = Counter(
                c["membership_id"] for c in cluster.cancel_calls() if c["status"] == 403
            )
            return len(refused) == 20 and min(refused.values()) >= 2

        wait(all_refused_twice, 60, "every cancellation to be refused twice")
        assert cluster.cancellation_statuses()["failed"] == 0
        wait(lambda: bool(cluster.alerts("whop_auth")), 30, "the sweep's whop_auth alert")
        cluster.state.set_forbidden(False)
        wait(cluster.settled, 60, "every cancellation to finish once the key works")

        gaps = []
        for p in cluster.purchases:
            posts = [
                (parse_at(c["at"]), c["status"])
                for c in cluster.state.calls(p["membership_id"])
                if c["method"] == "POST"
            ]
            gaps += [
                (later - at).total_seconds()
                for (at, status), (later, _) in itertools.pairwise(posts)
                if status == 403
            ]
        alerts = cluster.alerts("whop_auth")
        fresh = cluster.fresh_cancels()
        report(
            "API key refused (403) for a while",
            {
                "purchases": len(cluster.purchases),
                "cancellations by status": dict(cluster.cancellation_statuses()),
                "403 answers": sum(1 for c in cluster.cancel_calls() if c["status"] == 403),
                "shortest wait after a 403 (s)": round(min(gaps), 3),
                "whop_auth alerts (resolved)": (
                    len(alerts),
                    sum(a.resolved_at is not None for a in alerts),
                ),
                "other alerts": len(cluster.alerts()) - len(alerts),
                "carried-out cancel calls": sum(fresh.values()),
            },
        )
        assert cluster.cancellation_statuses() == Counter({"canceled": 20})
        assert min(gaps) >= last_interval * 0.9 - 0.05  # paused at the last interval (±10 %)
        assert len(alerts) == 1
        assert alerts[0].resolved_at is not None
        assert len(cluster.alerts()) == 1
        assert fresh == Counter({p["membership_id"]: 1 for p in cluster.purchases})


def test_429_storm_is_respected_by_every_worker(tmp_path: Path) -> None:
    """Whop answers 429 (Retry-After: 1) in two bursts while 20 cancellations run on two
    workers: nothing fails, and no cancel is sent before the Retry-After has elapsed (beyond
    the calls already in flight when the 429 was answered)."""
    retry_after = 1.0
    in_flight = 0.25  # calls claimed before the 429 was recorded may still arrive just after it
    with Cluster(tmp_path, workers=2) as cluster:
        cluster.state.throttle(6, retry_after=retry_after)
        cluster.buy(10)
        wait(lambda: cluster.count_status("canceled") >= 5, 60, "half of the first ten")
        cluster.state.throttle(6, retry_after=retry_after)
        cluster.buy(10)
        wait(cluster.settled, 60, "every cancellation to finish")

        calls = cluster.cancel_calls()
        limited = [parse_at(c["at"]) for c in calls if c["status"] == 429]
        early = [
            c
            for c in calls
            for t in limited
            if t.timestamp() + in_flight
            < parse_at(c["at"]).timestamp()
            < t.timestamp() + retry_after - 0.05
        ]
        in_window = [
            c
            for c in calls
            for t in limited
            if t.timestamp() < parse_at(c["at"]).timestamp() <= t.timestamp() + in_flight
        ]
        fresh = cluster.fresh_cancels()
        report(
            "429 storm",
            {
                "purchases": len(cluster.purchases),
                "cancellations by status": dict(cluster.cancellation_statuses()),
                "429 answers": len(limited),
                "all API calls / cancel calls": (len(cluster.state.calls()), len(calls)),
                "calls in flight just after a 429": len(in_window),
                "calls before Retry-After elapsed": len(early),
                "carried-out cancel calls": sum(fresh.values()),
            },
        )
        assert len(limited) == 12
        assert early == []
        assert cluster.cancellation_statuses() == Counter({"canceled": 20})
        assert fresh == Counter({p["membership_id"]: 1 for p in cluster.purchases})


def test_webhook_storm(tmp_path: Path) -> None:
    """The test sends, concurrently and shuffled, every genuine payment and activation, 30 % of
    them again (same webhook id), forged ones (another secret), stale ones (10 minutes old) and
    malformed signed bodies: each is answered as it should be, and each genuine purchase makes
    exactly one order, one delivery and one cancel."""
    rng = random.Random(5)
    with Cluster(tmp_path, workers=1) as cluster:
        made = cluster.buy(40, send_webhooks=False)
        url = cluster.webhook_urls[0]
        genuine: list[Send] = []
        for purchase in made:
            payment, activation = event_bodies(purchase, purchase["email"])
            genuine += [Send(url, payment, 200), Send(url, activation, 200)]
        sends = list(genuine)
        sends += [Send(s.url, s.body, 200) for s in rng.sample(genuine, round(0.3 * len(genuine)))]
        stale_at = datetime.now(UTC) - timedelta(minutes=10)
        for s in rng.sample(genuine, round(0.05 * len(genuine))):
            sends.append(Send(url, renamed(s.body), 401, secret="ws_forged_" + "0" * 24))
        for s in rng.sample(genuine, round(0.05 * len(genuine))):
            sends.append(Send(url, renamed(s.body), 401, at=stale_at))
        malformed = [
            b"this is not json",
            b"{truncated",
            b'[{"id": "msg_array", "type": "payment.succeeded"}]',
            b'{"id": "msg_no_data", "type": "payment.succeeded"}',
        ]
        sends += [Send(url, body, 400, webhook_id=f"msg_{uuid.uuid4().hex}") for body in malformed]
        rng.shuffle(sends)
        with (
            httpx.Client(timeout=30, limits=httpx.Limits(max_connections=32)) as http,
            ThreadPoolExecutor(max_workers=16) as pool,
        ):
            answers = list(pool.map(lambda s: s.post(http), sends))
        wait(cluster.settled, 90, "every purchase to be delivered and cancelled")

        by_expected: dict[int, Counter[int]] = {}
        for send, answer in zip(sends, answers, strict=True):
            by_expected.setdefault(send.expected, Counter())[answer] += 1
        fresh = cluster.fresh_cancels()
        deliveries = [e for e in cluster.emails() if e.kind == "delivery"]
        report(
            "webhook storm",
            {
                "purchases": len(made),
                "requests sent": len(sends),
                "answers": dict(sorted(Counter(answers).items())),
                "answers by expectation": {k: dict(v) for k, v in sorted(by_expected.items())},
                "orders": cluster.orders(),
                "delivery email rows": len(deliveries),
                "buyers by emails received": dict(cluster.delivery_counts()),
                "cancellations by status": dict(cluster.cancellation_statuses()),
                "carried-out cancel calls": sum(fresh.values()),
            },
        )
        assert answers == [s.expected for s in sends]
        assert Counter(answers) == Counter({200: 104, 401: 8, 400: 4})
        assert cluster.orders() == 40
        assert len(deliveries) == 40
        assert cluster.delivery_counts() == Counter({1: 40})
        assert cluster.cancellation_statuses() == Counter({"canceled": 40})
        assert fresh == Counter({p["membership_id"]: 1 for p in made})


def test_webhooks_dropped_for_good_are_recovered_by_the_whop_sweep(tmp_path: Path) -> None:
    """Whop never delivers a webhook: the Whop sweep (every 2 s) finds the payments by listing
    them, and each purchase is delivered and cancelled as if its webhook had come."""
    interval = 2.0
    tick = 0.5  # SWEEP_INTERVAL: the ticker looks at the Whop sweep's due time this often
    with Cluster(tmp_path, workers=1, WHOP_SWEEP_INTERVAL=f"{interval:g}") as cluster:
        cluster.state.set_webhook_options(drop=True)
        cluster.buy(20)
        bought_at = datetime.now(UTC)
        wait(cluster.settled, 60, "the sweep to recover every purchase")

        listed = [
            parse_at(c["at"])
            for c in cluster.state.calls()
            if c["method"] == "GET" and str(c["path"]).endswith("/payments")
        ]
        after = [at for at in listed if at > bought_at]
        recovered_in = (after[0] - bought_at).total_seconds()
        delivered = [d for d in cluster.state.deliveries() if d["status"] is not None]
        alerts = cluster.alerts("missed_webhooks_recovered")
        fresh = cluster.fresh_cancels()
        report(
            "webhooks dropped for good",
            {
                "purchases": len(cluster.purchases),
                "webhooks delivered (dropped)": (
                    len(delivered),
                    sum(d["error"] == "dropped" for d in cluster.state.deliveries()),
                ),
                "first payments listing after the purchases (s)": round(recovered_in, 2),
                "orders": cluster.orders(),
                "buyers by emails received": dict(cluster.delivery_counts()),
                "cancellations by status": dict(cluster.cancellation_statuses()),
                "missed_webhooks_recovered alerts": len(alerts),
                "carried-out cancel calls": sum(fresh.values()),
            },
        )
        assert delivered == []
        assert recovered_in <= interval + tick + 0.3
        assert cluster.orders() == 20
        assert cluster.delivery_counts() == Counter({1: 20})
        assert cluster.cancellation_statuses() == Counter({"canceled": 20})
        assert len(alerts) >= 1  # one per sweep that found any
        assert fresh == Counter({p["membership_id"]: 1 for p in cluster.purchases})


def test_smtp_down_then_back(tmp_path: Path) -> None:
    """The SMTP server refuses every message (451) while 10 purchases go through: nothing is
    sent, and no membership is cancelled while its buyer has no product (the cancellation waits
    for the delivery email to be accepted). Once SMTP accepts again every email goes out exactly
    once, and then the memberships are cancelled; one of them fails (Whop answers 422, the
    membership stays live) with one alert."""
    with Cluster(tmp_path, workers=1) as cluster:
        cluster.sink.refusing = True
        made = cluster.buy(10)
        cluster.state.reject(made[0]["membership_id"], 422)

        def all_tried() -> bool:
            emails = cluster.emails()
            deliveries = [e for e in emails if e.kind == "delivery"]
            return (
                len(deliveries) == 10
                and cluster.count(Cancellation) == 10
                and all(e.attempts >= 2 and e.sent_at is None for e in emails)
            )

        wait(all_tried, 60, "every email to be refused twice")
        refused = cluster.emails()
        assert cluster.sink.messages == []
        assert cluster.cancel_calls() == []  # nobody's membership goes before their product
        assert cluster.final() == 0
        cluster.sink.refusing = False
        wait(
            lambda: (
                cluster.final() == 10
                and bool(cluster.alerts("cancellation_failed"))
                and cluster.unsent() == 0
            ),
            90,
            "the outbox to drain and every cancellation to end",
        )

        emails = cluster.emails()
        received = Counter(
            found.group(1)
            for m in cluster.sink.messages
            if (found := re.search(r"<whop-autocancel\.(\d+)\.", str(m.message["Message-ID"])))
        )
        kinds = Counter(e.kind for e in emails)
        report(
            "SMTP down, then back",
            {
                "purchases": len(made),
                "cancel calls while SMTP refused": 0,
                "cancellations by status": dict(cluster.cancellation_statuses()),
                "alerts": [a.kind for a in cluster.alerts()],
                "outbox rows by kind": dict(kinds),
                "refused attempts before recovery": sum(e.attempts for e in refused),
                "messages received": len(cluster.sink.messages),
                "outbox rows received exactly once": sum(n == 1 for n in received.values()),
                "unsent rows": cluster.unsent(),
            },
        )
        assert cluster.cancellation_statuses() == Counter({"canceled": 9, "failed": 1})
        assert [a.kind for a in cluster.alerts()] == ["cancellation_failed"]
        # Recovery queued only the failed cancellation's alert email; no email twice.
        assert [e.kind for e in emails[len(refused) :]] == ["alert:cancellation_failed"]
        assert received == Counter({str(e.id): 1 for e in emails})
        assert len(cluster.sink.messages) == len(emails)
        assert kinds["delivery"] == 10
        assert cluster.delivery_counts() == Counter({1: 10})
        assert cluster.unsent() == 0
