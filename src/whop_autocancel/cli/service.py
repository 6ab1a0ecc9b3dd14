"""Running the service: `serve`, `worker`, `migrate`, `check`, `demo`, `simulator`, `deploy`."""

from __future__ import annotations

import errno
import socket
import sys
from collections.abc import Generator
from contextlib import contextmanager
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated

import typer
from rich.text import Text

from whop_autocancel import affinity
from whop_autocancel.cli.children import WorkerProcesses, stop_with_parent, take_back_cpus
from whop_autocancel.cli.common import (
    cli_settings,
    log,
    ping_database,
    safe_url,
    start_runtime,
    start_watching_whop,
)
from whop_autocancel.cli.output import JsonOption, out, print_json
from whop_autocancel.clock import format_utc
from whop_autocancel.errors import ConfigurationError, WhopAutocancelError
from whop_autocancel.logs import configure_logging
from whop_autocancel.settings import RUNTIME_SETTINGS, Settings

if TYPE_CHECKING:
    from whop_autocancel.runtime import Runtime

# uvicorn's default: connections the kernel queues until the server accepts them.
LISTEN_BACKLOG = 2048


def _pin(settings: Settings, *, owns_cores: bool, children: int = 0) -> affinity.Plan:
    """Pin this process as CPU_AFFINITY says (affinity.py); where the workers it starts go.
    (Logged with the start-up line, once every setting has been checked.)"""
    try:
        chosen = affinity.plan(
            affinity.parse(settings.CPU_AFFINITY),
            affinity.allowed_cpus(),
            owns_cores=owns_cores,
            children=children,
        )
        if chosen.own is not None:
            affinity.pin(chosen.own)
    except (ValueError, OSError) as error:
        raise ConfigurationError(f"CPU_AFFINITY: {error}") from None
    return chosen


def serve(
    host: Annotated[str, typer.Option(metavar="ADDRESS", help="Address to listen on.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(metavar="PORT", help="Port to listen on.")] = 8000,
    no_worker: Annotated[
        bool, typer.Option("--no-worker", help="Web only; run `worker` processes separately.")
    ] = False,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            min=0,
            max=64,
            metavar="N",
            help="Also run N worker processes, started and stopped with serve: more cores "
            "for the same database (SQLite too).",
        ),
    ] = 0,
) -> None:
    """Run the web endpoint and an in-process job worker. With --no-worker, the web endpoint
    alone."""
    import uvicorn

    from whop_autocancel.app import create_app

    settings = cli_settings(required=RUNTIME_SETTINGS, service=True)
    spawn_from = affinity.allowed_cpus()  # (before this process pins itself)
    cpus = _pin(settings, owns_cores=not no_worker or workers > 0, children=workers)
    listener = _listen(host, port)  # before anything starts: a taken port stops it cleanly
    try:
        runtime = start_runtime(settings)
    except BaseException:
        listener.close()
        raise
    log.info(
        "serve_starting",
        host=host,
        port=listener.getsockname()[1],
        worker=not no_worker,
        worker_processes=workers,
        cpu=cpus.own,  # (None: not pinned)
        worker_cpus=list(cpus.children),
        plans=len(runtime.catalog.plans),
        database=safe_url(settings.DATABASE_URL),
    )
    _warn_of_empty_pools(runtime)
    application = create_app(runtime, with_worker=not no_worker)
    children = WorkerProcesses(workers, settings.SHUTDOWN_TIMEOUT + 5, cpus, spawn_from)

    class Server(uvicorn.Server):
        """uvicorn re-raises a stopping signal once it has shut down, which ends the process
        there and then: the worker processes are stopped, and waited for, before that."""

        @contextmanager
        def capture_signals(self) -> Generator[None, None, None]:
            with super().capture_signals():
                try:
                    yield
                finally:
                    children.stop()

    server = Server(
        uvicorn.Config(
            application,
            host=host,
            port=port,
            backlog=LISTEN_BACKLOG,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=int(settings.SHUTDOWN_TIMEOUT),
            proxy_headers=True,
            forwarded_allow_ips=settings.FORWARDED_ALLOW_IPS,
        )
    )
    children.start()
    try:
        server.run(sockets=[listener])
    finally:
        listener.close()
        children.stop()
        runtime.close()
    if not server.started:  # the application's start-up failed (uvicorn logged why)
        raise typer.Exit(3)


def _warn_of_empty_pools(runtime: Runtime) -> None:
    """A listed plan whose pool is empty still sells (through the checkout API and Whop's own
    links): say so once at start, where the merchant looks, as `check` does."""
    from whop_autocancel.admin.stock import empty_listed_pools
    from whop_autocancel.delivery.stock import restock_command

    empty = empty_listed_pools(runtime)
    if empty:
        log.warning(
            "stock_pools_empty",
            pools=empty,
            consequence="their plans still sell: buyers pay, then wait (their memberships "
            "are not cancelled) until items are imported, and are then served in payment order",
            action="; ".join(restock_command(pool) for pool in empty),
        )


def _listen(host: str, port: int) -> socket.socket:
    """The web port, bound and listening before the worker, the database or the queue are
    touched: a port in use stops `serve` with one line, and nothing can take the port between
    a check and the bind (connections made while `serve` starts wait in the queue)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP: asyncio sets TCP_NODELAY only on connections accepted from such a
    # socket. With proto 0 a response written in two parts (head, body) held the body until
    # the client's delayed ACK: every answer after the first on a keep-alive connection came
    # ~40 ms late (one connection: 23 webhooks/s instead of hundreds).
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        # As uvicorn does: a restart need not wait for the old connections' TIME_WAIT.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(LISTEN_BACKLOG)
    except (OSError, OverflowError) as error:
        listener.close()
        if isinstance(error, OSError) and error.errno == errno.EADDRINUSE:
            raise ConfigurationError(
                f"--port: {host}:{port} is in use (another `whop-autocancel serve`?): stop that "
                "process or choose another --port"
            ) from None
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise ConfigurationError(
            f"--host/--port: cannot listen on {host}:{port}: {reason}"
        ) from None
    return listener


def worker(
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            min=1,
            max=65535,
            metavar="PORT",
            help="Serve this worker's Prometheus metrics at /metrics on this port.",
        ),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option("--metrics-host", metavar="ADDRESS", help="Address for --metrics-port.")
    ] = "127.0.0.1",
) -> None:
    """Run a job worker alone (any number, on any machine). SIGTERM stops it gracefully:
    running jobs finish, no new ones start."""
    from whop_autocancel.metrics import start_metrics_server
    from whop_autocancel.worker import run_worker

    settings = cli_settings(required=RUNTIME_SETTINGS, service=True)
    take_back_cpus()  # started by `serve --workers`: not on serve's CPU
    _pin(settings, owns_cores=False)  # `auto` leaves a worker alone (see affinity.py)
    stop_with_parent()  # started by `serve --workers`: goes when serve goes
    server = None
    if metrics_port is not None:  # before anything starts: a taken port stops it cleanly
        token = settings.METRICS_TOKEN
        try:
            server = start_metrics_server(
                metrics_port,
                metrics_host,
                token=token.get_secret_value() if token is not None else None,
            )
        except OSError as error:
            raise ConfigurationError(
                f"--metrics-port: cannot listen on {metrics_host}:{metrics_port}: "
                f"{error.strerror or error}"
            ) from None
        log.info("metrics_serving", host=metrics_host, port=metrics_port)
    try:
        runtime = start_runtime(settings)
    except BaseException:
        if server is not None:
            server.stop()
        raise
    try:
        run_worker(runtime)
    finally:
        if server is not None:
            server.stop()
        runtime.close()


def migrate() -> None:
    """Create or upgrade the database schema. It goes to the newest version; the first run
    records when the service started watching Whop."""
    from whop_autocancel.clock import SystemClock
    from whop_autocancel.db.engine import Database
    from whop_autocancel.schema.migrate import upgrade

    settings = cli_settings()
    database = Database(settings.DATABASE_URL)
    try:
        ping_database(database)
        before, after = upgrade(database)
        since = start_watching_whop(database, SystemClock().now())
    finally:
        database.dispose()
    if before == after:
        out.print(f"Database already at revision {after}; nothing to do.")
    else:
        out.print(f"Database migrated from {before or 'empty'} to {after}.")
    out.print(
        f"Watching Whop since {format_utc(since)}: purchases paid before it are "
        "not delivered (`whop-autocancel recover` lists them).",
        soft_wrap=True,
    )


def check(json_output: JsonOption = False) -> None:
    """Check everything the service needs, one line each. It checks settings, catalog,
    database, queue, SMTP and the Whop API key, and exits non-zero when any check fails."""
    from whop_autocancel.checks import CANCEL_NOTE, run_checks

    settings = cli_settings()
    results = []
    for result in run_checks(settings):
        results.append(result)
        if not json_output:
            mark = ("ok  ", "green") if result.ok else ("FAIL", "red")
            out.print(Text.assemble(mark, f" {result.name}: {result.detail}"), soft_wrap=True)
    failed = sum(not result.ok for result in results)
    if json_output:
        print_json(
            {
                "ok": not failed,
                "checks": [
                    {"name": result.name, "ok": result.ok, "detail": result.detail}
                    for result in results
                ],
                "note": CANCEL_NOTE,
            }
        )
    else:
        out.print(CANCEL_NOTE, soft_wrap=True)
    if failed:
        raise WhopAutocancelError(f"{failed} check(s) failed")


def demo(
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the temporary folder for inspection.")
    ] = False,
) -> None:
    """Run the whole flow against a simulated Whop. It starts the built-in Whop simulator, an
    SMTP sink and `serve`, makes purchases and prints what happened to each. Exits 0 only if
    everything ended as it should."""
    from whop_autocancel.demo import run_demo

    configure_logging("WARNING", "console")
    ok = run_demo(out, keep=keep)
    raise typer.Exit(0 if ok else 1)


def simulator(
    host: Annotated[str, typer.Option(metavar="ADDRESS", help="Address to listen on.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(metavar="PORT", help="Port to listen on.")] = 8900,
    api_key: Annotated[
        str,
        typer.Option(envvar="SIM_API_KEY", metavar="KEY", help="The bearer key it accepts."),
    ] = "sim_key",
    webhook_secret: Annotated[
        str,
        typer.Option(
            envvar="SIM_WEBHOOK_SECRET",
            metavar="SECRET",
            show_default=False,  # too long for a help line: docs/simulator.md shows it
            help="The ws_… secret it signs with (default: see docs/simulator.md).",
        ),
    ] = "ws_simulator_0cce044aae8d45bd64e73cf4c07c32e0460aa0",  # noqa: S107
    webhook_url: Annotated[
        str | None,
        typer.Option(envvar="SIM_WEBHOOK_URL", metavar="URL", help="Where it sends webhooks."),
    ] = None,
    plan: Annotated[
        list[str] | None,
        typer.Option(
            metavar="PLAN",
            help="A plan it knows: plan_ID, plan_ID:one_time or plan_ID:renewal; repeatable.",
        ),
    ] = None,
    company_id: Annotated[
        str, typer.Option(metavar="ID", help="The store's biz_… id.")
    ] = "biz_SimStore",
    seed: Annotated[int, typer.Option(metavar="N", help="Seed of the fault injection's dice.")] = 1,
    time_scale: Annotated[
        float, typer.Option(metavar="FACTOR", help="Multiplies Whop's delays.")
    ] = 1.0,
) -> None:
    """Run the Whop simulator, a stand-in for api.whop.com. It runs until interrupted; its
    control API is described in docs/simulator.md."""
    import signal
    import threading

    from whop_autocancel.simulator import SimulatorServer

    plans: list[tuple[str, str]] = []
    for entry in plan or []:
        plan_id, _, plan_type = entry.partition(":")
        if plan_type not in ("", "one_time", "renewal") or not plan_id.startswith("plan_"):
            raise typer.BadParameter(
                f"{entry!r}: expected plan_ID, plan_ID:one_time or plan_ID:renewal",
                param_hint="--plan",
            )
        plans.append((plan_id, plan_type or "one_time"))
    configure_logging("INFO", "console")
    server = SimulatorServer(
        api_key=api_key,
        webhook_secret=webhook_secret,
        webhook_url=webhook_url,
        time_scale=time_scale,
        host=host,
        port=port,
        company_id=company_id,
        seed=seed,
    )
    server.start()
    for plan_id, plan_type in plans:
        server.state.create_plan(plan_id, plan_type)  # type: ignore[arg-type]
    out.print(
        f"Whop simulator at {server.api_url} (control API under {server.url}/_sim); "
        "Ctrl-C or SIGTERM stops it."
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


UserOption = Annotated[str, typer.Option("--user", metavar="USER", help="The user they run as.")]


WorkdirOption = Annotated[
    str, typer.Option("--workdir", metavar="DIR", help="Folder with .env and the catalog.")
]


ExecutableOption = Annotated[
    str,
    typer.Option("--executable", metavar="PATH", help="The installed whop-autocancel command."),
]


HostOption = Annotated[
    str, typer.Option("--host", metavar="ADDRESS", help="Address the web processes bind.")
]


PortOption = Annotated[
    int, typer.Option("--port", metavar="PORT", help="First web port (then +1, +2, …).")
]


WebOption = Annotated[
    int, typer.Option("--web", metavar="N", help="Web processes on this machine.")
]


WorkersOption = Annotated[
    int, typer.Option("--workers", metavar="N", help="Worker processes here.")
]


StopOption = Annotated[
    int,
    typer.Option(
        "--stop-timeout",
        metavar="SECONDS",
        help="Seconds to wait after SIGTERM (more than SHUTDOWN_TIMEOUT).",
    ),
]


LogOption = Annotated[
    str, typer.Option("--log-dir", metavar="DIR", help="The folder for the log files.")
]


class ProcessManager(StrEnum):
    systemd = "systemd"
    supervisor = "supervisor"


def deploy(
    kind: Annotated[ProcessManager, typer.Argument(metavar="KIND", help="systemd or supervisor.")],
    user: UserOption = "whop-autocancel",
    workdir: WorkdirOption = "/opt/whop-autocancel",
    executable: ExecutableOption = "/opt/whop-autocancel/.venv/bin/whop-autocancel",
    env_file: Annotated[
        str,
        typer.Option(
            "--env-file",
            metavar="PATH",
            help="systemd: EnvironmentFile with the settings ('none' to omit); supervisor "
            "reads .env from --workdir.",
        ),
    ] = "/etc/whop-autocancel/env",
    host: HostOption = "127.0.0.1",
    port: PortOption = 8000,
    web: WebOption = 2,
    workers: WorkersOption = 2,
    stop_timeout: StopOption = 45,
    log_dir: LogOption = "/var/log/whop-autocancel",
) -> None:
    """Print process manager files for web and worker processes. Ready to use: systemd units
    (migrate, web@PORT, worker@N, a target) or a supervisord config. See docs/deploy.md."""
    from whop_autocancel.deploy import DeployOptions, render_supervisor, render_systemd

    systemd = kind is ProcessManager.systemd
    options = DeployOptions(
        user=user,
        workdir=workdir,
        executable=executable,
        env_file=env_file if systemd and env_file.lower() != "none" else None,
        host=host,
        port=port,
        web=web,
        workers=workers,
        stop_timeout=stop_timeout,
        log_dir=log_dir,
    )
    sys.stdout.write(render_systemd(options) if systemd else render_supervisor(options))
