"""The floors the webhook endpoint is measured against: the least a route can do on the same
stack (FastAPI on the same uvicorn, started with the options `whop-autocancel serve` uses).

- `POST /bare`: read the body, answer 200 (what the HTTP stack and the load generator cost);
- `POST /verify`: the same plus Standard Webhooks verification (`standardwebhooks`, the secret
  as bytes, as `webhooks/verify.py` does; the library parses the JSON too);
- `POST /durable-sqlite`: verify, then INSERT the body into a SQLite table (WAL,
  synchronous=FULL) on one connection, one commit per request;
- `POST /durable-pg`: verify, then INSERT + commit into PostgreSQL, on a pool of connections
  as large as the service's own pool (10), one commit per request.

The database work runs on worker threads (one for SQLite: its one connection), so the event
loop keeps reading requests while a commit waits for the disk, as the service's threadpool does.

    python bench/floors.py --port 8123 [--sqlite FILE] [--postgres URL]

`bench/ingest.py` starts one process per floor, one at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import sqlite3
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response
from standardwebhooks import Webhook, WebhookVerificationError

SECRET_ENV = "BENCH_WEBHOOK_SECRET"  # noqa: S105 (the variable's name, not a secret)
PG_CONNECTIONS = 10  # the service's SQLAlchemy pool_size on PostgreSQL (db/engine.py)
TABLE = "CREATE TABLE IF NOT EXISTS floor_inbox (id TEXT PRIMARY KEY, payload TEXT NOT NULL)"
INSERT_SQLITE = "INSERT INTO floor_inbox (id, payload) VALUES (?, ?)"
INSERT_PG = "INSERT INTO floor_inbox (id, payload) VALUES (%s, %s)"


class SqliteStore:
    """One connection in WAL mode with synchronous=FULL, owned by one thread."""

    def __init__(self, path: str) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self.connection: sqlite3.Connection = self.executor.submit(self._open, path).result()

    @staticmethod
    def _open(path: str) -> sqlite3.Connection:
        connection = sqlite3.connect(path, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute(TABLE)
        return connection

    def _insert(self, event_id: str, payload: str) -> None:
        self.connection.execute("BEGIN IMMEDIATE")
        try:
            self.connection.execute(INSERT_SQLITE, (event_id, payload))
        except BaseException:
            self.connection.execute("ROLLBACK")
            raise
        self.connection.execute("COMMIT")

    async def insert(self, event_id: str, payload: str) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self._insert, event_id, payload)

    def close(self) -> None:
        self.executor.submit(self.connection.close).result()
        self.executor.shutdown()


class PostgresStore:
    """PG_CONNECTIONS connections, each used by one request at a time; autocommit off, so every
    INSERT is its own transaction and `commit()` waits for the WAL flush."""

    def __init__(self, url: str) -> None:
        import psycopg

        self.connections: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(PG_CONNECTIONS):
            self.connections.put(psycopg.connect(url))
        first = self.connections.get()
        first.execute(TABLE)
        first.commit()
        self.connections.put(first)
        self.executor = ThreadPoolExecutor(max_workers=PG_CONNECTIONS, thread_name_prefix="pg")

    def _insert(self, event_id: str, payload: str) -> None:
        connection = self.connections.get()
        try:
            connection.execute(INSERT_PG, (event_id, payload))
            connection.commit()
        except BaseException:
            connection.rollback()
            raise
        finally:
            self.connections.put(connection)

    async def insert(self, event_id: str, payload: str) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self._insert, event_id, payload)

    def close(self) -> None:
        self.executor.shutdown()
        while not self.connections.empty():
            self.connections.get().close()


def create_app(
    secret: bytes, sqlite_path: str | None = None, postgres_url: str | None = None
) -> FastAPI:
    webhook = Webhook(secret)  # bytes: used as the key itself, as the service does
    stores: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if sqlite_path is not None:
            stores["sqlite"] = await asyncio.to_thread(SqliteStore, sqlite_path)
        if postgres_url is not None:
            stores["pg"] = await asyncio.to_thread(PostgresStore, postgres_url)
        try:
            yield
        finally:
            for opened in stores.values():
                await asyncio.to_thread(opened.close)

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def verified(body: bytes, request: Request) -> str | None:
        """The webhook id when the signature holds, else None."""
        try:
            webhook.verify(body, request.headers)  # type: ignore[arg-type]
        except WebhookVerificationError:
            return None
        return request.headers["webhook-id"]

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(status_code=200)

    @app.post("/bare")
    async def bare(request: Request) -> Response:
        await request.body()
        return Response(status_code=200)

    @app.post("/verify")
    async def verify(request: Request) -> Response:
        body = await request.body()
        return Response(status_code=200 if verified(body, request) else 401)

    @app.post("/durable-sqlite")
    async def durable_sqlite(request: Request) -> Response:
        body = await request.body()
        event_id = verified(body, request)
        if event_id is None:
            return Response(status_code=401)
        await stores["sqlite"].insert(event_id, body.decode())
        return Response(status_code=200)

    @app.post("/durable-pg")
    async def durable_pg(request: Request) -> Response:
        body = await request.body()
        event_id = verified(body, request)
        if event_id is None:
            return Response(status_code=401)
        await stores["pg"].insert(event_id, body.decode())
        return Response(status_code=200)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sqlite", help="SQLite file for /durable-sqlite")
    parser.add_argument("--postgres", help="PostgreSQL URL for /durable-pg")
    options = parser.parse_args()
    app = create_app(os.environ[SECRET_ENV].encode(), options.sqlite, options.postgres)
    # The options `whop-autocancel serve` passes (cli/service.py), with the settings' defaults.
    uvicorn.run(
        app,
        host=options.host,
        port=options.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=30,
        proxy_headers=True,
        forwarded_allow_ips="127.0.0.1",
    )


if __name__ == "__main__":
    main()
