"""Run the simulator as a real HTTP server (uvicorn) in a background thread."""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime
from types import TracebackType

import uvicorn

from whop_autocancel.simulator.app import create_app
from whop_autocancel.simulator.faults import DEFAULT_SEED
from whop_autocancel.simulator.state import API_PREFIX, Simulator

_START_TIMEOUT = 10.0


class SimulatorServer:
    """A Whop simulator listening on a loopback port; `start()`, then use `url` / `api_url`."""

    def __init__(
        self,
        api_key: str = "sim_key",
        webhook_secret: str | None = None,
        webhook_url: str | None = None,
        *,
        time_scale: float = 1.0,
        host: str = "127.0.0.1",
        port: int = 0,
        company_id: str = "biz_SimStore",
        seed: int = DEFAULT_SEED,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        self.host = host
        self._requested_port = port
        self.state = Simulator(
            api_key=api_key,
            webhook_secret=webhook_secret or "ws_" + secrets.token_hex(24),
            webhook_url=webhook_url,
            time_scale=time_scale,
            company_id=company_id,
            seed=seed,
            clock=clock,
        )
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None
        self._sock: socket.socket | None = None

    @property
    def api_key(self) -> str:
        """The bearer key the API accepts."""
        return self.state.api_key

    @property
    def webhook_secret(self) -> str:
        """The `ws_…` secret webhooks are signed with."""
        return self.state.webhook_secret

    @property
    def port(self) -> int:
        """The bound port (known once started)."""
        if self._port is None:
            raise RuntimeError("the simulator is not started")
        return self._port

    @property
    def url(self) -> str:
        """`http://host:port` of the running server."""
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        """The base URL of the simulated Whop API (`WHOP_API_URL`)."""
        return self.url + API_PREFIX

    def start(self) -> SimulatorServer:
        """Bind, serve in a background thread and return once connections are accepted."""
        if self._thread is not None:
            return self
        # proto=IPPROTO_TCP lets asyncio set TCP_NODELAY on accepted connections; with proto 0
        # it does not, and every keep-alive response then waits ~40 ms for a delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._requested_port))
        self._port = sock.getsockname()[1]
        self.state.public_url = self.url
        config = uvicorn.Config(
            create_app(self.state),
            log_level="warning",
            access_log=False,
            lifespan="off",
            loop="asyncio",
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="whop-sim-http", daemon=True
        )
        self.state.start()
        thread.start()
        deadline = time.monotonic() + _START_TIMEOUT
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                self.state.close()
                sock.close()
                raise RuntimeError(f"the simulator failed to start on {self.host}:{self._port}")
            time.sleep(0.01)
        self._server, self._thread = server, thread
        self._sock = sock
        return self

    def stop(self) -> None:
        """Stop the HTTP server and the webhook sender."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None and thread is not None:
            server.should_exit = True
            thread.join(_START_TIMEOUT)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.state.close()

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
