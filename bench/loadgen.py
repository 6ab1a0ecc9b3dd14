"""The webhook load generator of `bench/ingest.py`: a process of its own (asyncio, raw streams,
HTTP/1.1 keep-alive), so that it costs the server nothing but the requests.

Every request is a unique, pre-signed `payment.succeeded` (legacy payload: its own event,
payment, membership, member, user and email; a plan the caller names; no checkout, no
`metadata.order_id`, so the service creates and pays a new order for each one). All bodies and
signature headers are made before the clock starts, signed with the current time (the service
accepts ±5 min).

- closed loop (`--mode closed`): CONNECTIONS connections each send their next request as soon
  as the previous answer arrives, for SECONDS (after WARMUP seconds that are not counted);
  latency is send → answer;
- open loop (`--mode open`): one request every 1/RATE s for SECONDS, each on whichever of the
  CONNECTIONS connections is free; latency runs from the *scheduled* send time, so a stall
  (no free connection, a slow server) counts in full.

    BENCH_WEBHOOK_SECRET=… python bench/loadgen.py --port 8000 --path /webhooks/whop \\
        --mode closed --seconds 10 --plan plan_Message1

Prints one JSON object: requests, seconds, rate (answers per second), p50_ms, p90_ms, p99_ms,
max_ms, statuses (answers by HTTP status; 0 = broken connection), loadgen_cpu (the share of one
core this process used while timing: its own ceiling is far off while it stays well under 1),
generated, exhausted (the closed loop ran out of pre-made bodies before SECONDS; its rate still
holds), warmup_statuses (the uncounted warm-up's answers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import secrets
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from standardwebhooks import Webhook

FIXTURE = Path(__file__).resolve().parents[1] / "tests/fixtures/whop/payment.succeeded.legacy.json"
SECRET_ENV = "BENCH_WEBHOOK_SECRET"  # noqa: S105 (the variable's name, not a secret)
MARK = "@@N@@"
MAX_BODIES = 200_000  # ~2.4 KB each, 10 µs to make
WARMUP_BODIES_PER_SECOND = 8_000


class Requests:
    """Makes the raw HTTP requests: one template, a unique token per request."""

    def __init__(self, secret: bytes, plan: str, host: str, port: int, path: str) -> None:
        self.webhook = Webhook(secret)
        self.head = (
            f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
        )
        self.run = secrets.token_hex(4)
        self.made = 0
        document = json.loads(FIXTURE.read_bytes())
        now = datetime.now(UTC)
        stamp = now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        created = (now - timedelta(seconds=5)).isoformat(timespec="milliseconds")
        document["id"] = f"msg_{MARK}"
        document["timestamp"] = stamp
        document["data"].update(
            id=f"pay_{MARK}",
            created_at=created.replace("+00:00", "Z"),
            paid_at=stamp,
            updated_at=stamp,
            last_payment_attempt=stamp,
            checkout_configuration_id=None,
            metadata={},
            member={"id": f"mber_{MARK}", "phone": None},
            membership={"id": f"mem_{MARK}", "status": "completed", "phone_number": None},
            user={
                "id": f"user_{MARK}",
                "username": f"buyer{MARK}",
                "name": "Bench Buyer",
                "email": f"buyer{MARK}@example.com",
            },
            plan={"id": plan, "internal_notes": None, "metadata": {}},
        )
        self.template = json.dumps(document)

    def make(self, count: int) -> list[bytes]:
        timestamp = datetime.now(UTC)
        seconds = str(int(timestamp.timestamp()))
        made = []
        for _ in range(count):
            token = f"{self.run}{self.made:07d}"
            self.made += 1
            body = self.template.replace(MARK, token).encode()
            event_id = f"msg_{token}"
            signature = self.webhook.sign(msg_id=event_id, timestamp=timestamp, data=body)
            made.append(
                (
                    f"{self.head}content-length: {len(body)}\r\nwebhook-id: {event_id}\r\n"
                    f"webhook-timestamp: {seconds}\r\nwebhook-signature: {signature}\r\n\r\n"
                ).encode()
                + body
            )
        return made


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    started: float = 0.0
    finished: float = 0.0
    cpu: float = 0.0  # this process's CPU seconds while it ran
    generated: int = 0
    exhausted: bool = False

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        seconds = max(self.finished - self.started, 1e-9)

        def quantile(q: float) -> float:
            if not ordered:
                return math.nan
            return ordered[max(0, math.ceil(q * len(ordered)) - 1)] * 1000

        return {
            "requests": len(ordered),
            "seconds": round(seconds, 3),
            "rate": round(len(ordered) / seconds, 1),
            "p50_ms": round(quantile(0.50), 2),
            "p90_ms": round(quantile(0.90), 2),
            "p99_ms": round(quantile(0.99), 2),
            "max_ms": round(ordered[-1] * 1000, 2) if ordered else math.nan,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "loadgen_cpu": round(self.cpu / seconds, 3),  # of one core
            "generated": self.generated,
            "exhausted": self.exhausted,
        }


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> Connection:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def send(self, request: bytes) -> int:
        """Send one request and read its answer: the HTTP status (0: the connection broke, and
        it is opened again for the next request)."""
        try:
            if self.writer is None or self.reader is None:
                await self.open()
            assert self.writer is not None
            assert self.reader is not None
            self.writer.write(request)
            head = await self.reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            lowered = head.lower()
            at = lowered.find(b"\r\ncontent-length:")
            if at >= 0:
                end = lowered.index(b"\r\n", at + 2)
                length = int(lowered[at + 17 : end])
                if length:
                    await self.reader.readexactly(length)
            elif b"transfer-encoding: chunked" in lowered:
                raise RuntimeError("chunked answers are not expected here")
            return status
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            self.close()
            return 0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def closed_loop(
    requests: list[bytes], host: str, port: int, connections: int, seconds: float
) -> Result:
    result = Result(generated=len(requests))
    clients = [await Connection(host, port).open() for _ in range(connections)]
    position = 0
    deadline = 0.0

    async def client(connection: Connection) -> None:
        nonlocal position
        while time.perf_counter() < deadline:
            if position >= len(requests):
                result.exhausted = True
                break
            request = requests[position]
            position += 1
            sent = time.perf_counter()
            status = await connection.send(request)
            done = time.perf_counter()
            result.latencies.append(done - sent)
            result.statuses[status] += 1
            result.finished = done
        connection.close()

    cpu = time.process_time()
    result.started = time.perf_counter()
    deadline = result.started + seconds
    await asyncio.gather(*(client(connection) for connection in clients))
    result.cpu = time.process_time() - cpu
    return result


async def open_loop(
    requests: list[bytes], host: str, port: int, connections: int, rate: float
) -> Result:
    result = Result(generated=len(requests))
    free: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(connections):
        free.put_nowait(await Connection(host, port).open())

    async def one(request: bytes, scheduled: float) -> None:
        connection = await free.get()
        status = await connection.send(request)
        done = time.perf_counter()
        free.put_nowait(connection)
        result.latencies.append(done - scheduled)
        result.statuses[status] += 1
        result.finished = max(result.finished, done)

    pending = []
    cpu = time.process_time()
    result.started = start = time.perf_counter() + 0.01
    for number, request in enumerate(requests):
        scheduled = start + number / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        pending.append(asyncio.create_task(one(request, scheduled)))
    await asyncio.gather(*pending)
    result.cpu = time.process_time() - cpu
    while not free.empty():
        free.get_nowait().close()
    return result


def run(options: argparse.Namespace) -> dict[str, Any]:
    maker = Requests(
        os.environ[SECRET_ENV].encode(), options.plan, options.host, options.port, options.path
    )
    address = (options.host, options.port, options.connections)
    warmed = Result()
    if options.mode == "open":
        if options.warmup > 0:
            warm = maker.make(math.ceil(options.rate * options.warmup))
            warmed = asyncio.run(open_loop(warm, *address, options.rate))
            del warm
        requests = maker.make(round(options.rate * options.seconds))
        if options.announce:
            print("timing", flush=True)
        result = asyncio.run(open_loop(requests, *address, options.rate))
        head: dict[str, Any] = {"mode": "open", "target_rate": options.rate}
    else:
        estimate = float(options.expect or 0)
        if options.warmup > 0:
            warm = maker.make(math.ceil(options.warmup * WARMUP_BODIES_PER_SECOND))
            warmed = asyncio.run(closed_loop(warm, *address, options.warmup))
            estimate = max(estimate, warmed.summary()["rate"])
            del warm
        # A short warm-up underestimates: three times its rate, so the run is rarely cut short.
        count = min(MAX_BODIES, math.ceil(max(estimate, 50.0) * options.seconds * 3) + 500)
        requests = maker.make(count)
        if options.announce:  # the caller may start a profiler, or its CPU accounting, now
            print("timing", flush=True)
        result = asyncio.run(closed_loop(requests, *address, options.seconds))
        head = {"mode": "closed", "connections": options.connections}
    warm_statuses = {str(k): v for k, v in sorted(warmed.statuses.items())}
    return {**head, **result.summary(), "warmup_statuses": warm_statuses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/webhooks/whop")
    parser.add_argument("--mode", choices=["closed", "open"], default="closed")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds not counted")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rate", type=float, default=200.0, help="open loop: requests/s")
    parser.add_argument("--plan", default="plan_Message1")
    parser.add_argument("--expect", type=float, help="closed loop: expected requests/s")
    parser.add_argument(
        "--announce", action="store_true", help="print `timing` as the clock starts"
    )
    json.dump(run(parser.parse_args()), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
