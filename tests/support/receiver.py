"""A webhook receiver on loopback for tests: records every POST (headers and exact body
bytes) and answers 200, or 500 for the first `fail_first` requests or while `failing`; each
answer after `delay` seconds. `most_at_once` is the most requests it was answering at once."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Receiver:
    def __init__(
        self, fail_first: int = 0, path: str = "/webhooks/whop", *, delay: float = 0.0
    ) -> None:
        self.fail_first = fail_first
        self.delay = delay
        self.at_once = 0
        self.most_at_once = 0
        self.failing = False
        self.path = path
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.statuses: list[int] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver._lock:
                    refuse = receiver.failing or len(receiver.received) < receiver.fail_first
                    status = 500 if refuse else 200
                    receiver.received.append((dict(self.headers.items()), body))
                    receiver.statuses.append(status)
                    receiver.at_once += 1
                    receiver.most_at_once = max(receiver.most_at_once, receiver.at_once)
                if receiver.delay:
                    time.sleep(receiver.delay)
                with receiver._lock:
                    receiver.at_once -= 1
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        ).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{self.path}"

    def snapshot(self) -> list[tuple[dict[str, str], bytes]]:
        """Every request as (headers, body), refused ones included."""
        with self._lock:
            return list(self.received)

    def bodies(self) -> list[Any]:
        with self._lock:
            return [json.loads(body) for _, body in self.received]

    def accepted(self) -> list[Any]:
        """The JSON bodies of the requests answered 200."""
        with self._lock:
            return [
                json.loads(body)
                for (_, body), status in zip(self.received, self.statuses, strict=True)
                if status == 200
            ]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
