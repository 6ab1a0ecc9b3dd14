"""Builds the process's parts from the settings and wires the jobs to them."""

from __future__ import annotations

import os
import socket
import threading
import uuid
from dataclasses import dataclass, field

from whop_autocancel.alerts.service import Alerts
from whop_autocancel.cancellation.dispatch import CancelDispatcher, active_limit
from whop_autocancel.cancellation.models import CANCEL_TASK
from whop_autocancel.cancellation.service import CancellationService
from whop_autocancel.catalog import Catalog, load_catalog
from whop_autocancel.clock import Clock, SystemClock
from whop_autocancel.db.engine import Database
from whop_autocancel.delivery.hooks import PurchaseHooks
from whop_autocancel.delivery.methods import known_methods
from whop_autocancel.delivery.service import DeliveryService
from whop_autocancel.delivery.stock import SERVE_TASK
from whop_autocancel.errors import ConfigurationError
from whop_autocancel.jobs import Jobs
from whop_autocancel.mail.outbox import SEND_TASK, Outbox
from whop_autocancel.mail.render import EmailTemplates
from whop_autocancel.orders.checkout import CheckoutService
from whop_autocancel.orders.service import DELIVER_TASK, OrderService
from whop_autocancel.reconcile.backfill import Backfill
from whop_autocancel.reconcile.recover import Recovery
from whop_autocancel.reconcile.sweeps import StuckWorkSweep
from whop_autocancel.reconcile.whop_sweep import WhopSweep
from whop_autocancel.sealing import Sealer
from whop_autocancel.settings import Settings
from whop_autocancel.webhooks.inbox import APPLY_TASK, REAPPLY_TASK, Inbox, names_unapplied
from whop_autocancel.whop.client import AsyncWhopClient, WhopClient
from whop_autocancel.whop.pacing import WhopPacer

SWEEP_TASK = "sweeps.stuck"


def instance_name() -> str:
    """Who holds a lease: host, pid and a random suffix (unique across machines)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass
class Runtime:
    settings: Settings
    clock: Clock
    database: Database
    jobs: Jobs
    catalog: Catalog
    outbox: Outbox
    alerts: Alerts
    orders: OrderService
    inbox: Inbox
    delivery: DeliveryService
    cancellations: CancellationService
    stuck_sweep: StuckWorkSweep
    checkouts: CheckoutService
    whop_sweep: WhopSweep
    owner: str
    sealer: Sealer | None = None  # STOCK_ENCRYPTION_KEY's cipher (None: no key, no stock)
    pacer: WhopPacer | None = None  # the shared budget of Whop calls (WHOP_RATE_LIMIT)
    dispatcher: CancelDispatcher | None = None  # in a worker: runs the cancellation attempts
    _whop: WhopClient | None = None
    _whop_lock: threading.Lock = field(default_factory=threading.Lock)

    def _api_key(self) -> str:
        self.settings.require("WHOP_API_KEY")
        assert self.settings.WHOP_API_KEY is not None
        return self.settings.WHOP_API_KEY.get_secret_value()

    def whop(self) -> WhopClient:
        """The blocking client (sweeps, backfill, recovery, checkouts), paced."""
        with self._whop_lock:
            if self._whop is None:
                self._whop = WhopClient(
                    self.settings.WHOP_API_URL,
                    self._api_key(),
                    version_date=self.settings.WHOP_API_VERSION_DATE,
                    timeout=self.settings.WHOP_TIMEOUT,
                    clock=self.clock,
                    pacer=self.pacer,
                )
            return self._whop

    def async_whop(self) -> AsyncWhopClient:
        """A new non-blocking client for the cancellations (the caller closes it), paced."""
        settings = self.settings
        return AsyncWhopClient(
            settings.WHOP_API_URL,
            self._api_key(),
            version_date=settings.WHOP_API_VERSION_DATE,
            timeout=settings.WHOP_TIMEOUT,
            clock=self.clock,
            pacer=self.pacer,
            max_connections=active_limit(settings.WHOP_RATE_LIMIT, settings.WHOP_RATE_BURST),
        )

    def start_dispatcher(self) -> None:
        """A worker runs its cancellations on one event loop, off the job threads."""
        if self.dispatcher is None:
            self.dispatcher = CancelDispatcher(
                self.cancellations,
                self.async_whop,
                rate=self.settings.WHOP_RATE_LIMIT,
                burst=self.settings.WHOP_RATE_BURST,
                shutdown_timeout=self.settings.SHUTDOWN_TIMEOUT,
            )
            self.dispatcher.start()
            dispatcher = self.dispatcher
            self.jobs.run_locally(
                CANCEL_TASK, lambda args, delay: dispatcher.submit(int(args[0]), delay)
            )

    def stop_dispatcher(self) -> None:
        if self.dispatcher is not None:
            self.jobs.run_locally(CANCEL_TASK, None)
            self.dispatcher.stop(
                lambda cid, delay: self.jobs.to_queue(CANCEL_TASK, cid, delay=delay)
            )
            self.dispatcher = None

    def run_cancellation(self, cancellation_id: int) -> None:
        """The `cancellation.run` job: handed to the dispatcher in a worker, else run here."""
        dispatcher = self.dispatcher
        if dispatcher is None or not dispatcher.submit(cancellation_id):
            self.cancellations.run(cancellation_id)

    def backfill(self) -> Backfill:
        """The onboarding backfill (`backfill --plan`), wired to this runtime."""
        return Backfill(
            self.database,
            self.catalog,
            self.cancellations,
            self.clock,
            self.whop,
            owner=self.owner,
            company_id=self.settings.WHOP_COMPANY_ID,
            versioned=self.settings.uses_versioned_api,
        )

    def recovery(self) -> Recovery:
        """The recovery of purchases made before the install (`recover --since`)."""
        return Recovery(
            self.database,
            self.catalog,
            self.orders,
            self.clock,
            self.whop,
            owner=self.owner,
            company_id=self.settings.WHOP_COMPANY_ID,
            versioned=self.settings.uses_versioned_api,
        )

    def close(self) -> None:
        self.stop_dispatcher()
        self.inbox.close()  # (stores what is queued; logs what its refusal log folded)
        if self._whop is not None:
            self._whop.close()
        self.outbox.close()  # (QUITs the SMTP sessions kept open between messages)
        self.database.dispose()


def build_runtime(
    settings: Settings, *, clock: Clock | None = None, catalog: Catalog | None = None
) -> Runtime:
    clock = clock or SystemClock()
    owner = instance_name()
    if catalog is None:
        catalog = load_catalog(settings.CATALOG_PATH, known_methods())
    sealer = settings.sealer
    stock_pools = catalog.stock_pools()
    if stock_pools and sealer is None:
        plans = ", ".join(plan.plan_id for plans in stock_pools.values() for plan in plans)
        raise ConfigurationError(
            f"STOCK_ENCRYPTION_KEY is not set, but the catalog delivers from stock ({plans}): "
            "stock items are stored encrypted; create a key with `whop-autocancel stock keygen`, "
            "set it and keep a copy in a safe place"
        )
    templates = EmailTemplates(settings.EMAIL_TEMPLATES_DIR)
    templates.check()
    database = Database(settings.DATABASE_URL)
    jobs = Jobs(settings.QUEUE_URL, settings.QUEUE_NAME)
    sender = settings.MAIL_FROM or "whop-autocancel@localhost"
    outbox = Outbox(
        database,
        jobs,
        clock,
        smtp=settings.smtp,
        sender=sender,
        timeout=settings.SMTP_TIMEOUT,
        retry_schedule=settings.RETRY_SCHEDULE,
        lease_seconds=settings.SMTP_TIMEOUT * 3 + 5,
        give_up_after=settings.EMAIL_GIVE_UP_AFTER,
        sealer=sealer,
    )
    alerts = Alerts(
        outbox,
        settings.ADMIN_EMAILS,
        throttle=settings.ALERT_THROTTLE,
        chat_webhook_url=(
            settings.ALERT_WEBHOOK_URL.get_secret_value() if settings.ALERT_WEBHOOK_URL else None
        ),
    )
    orders = OrderService(
        catalog, jobs, alerts, settings.MATCH_WINDOW, PurchaseHooks(catalog, jobs)
    )
    inbox = Inbox(
        database,
        orders,
        alerts,
        jobs,
        clock,
        secrets=settings.webhook_secrets,
        tolerance=settings.WEBHOOK_TOLERANCE,
        retry_schedule=settings.RETRY_SCHEDULE,
        max_attempts=settings.EVENT_MAX_ATTEMPTS,
        signature_alert_at=settings.SIGNATURE_FAILURES_ALERT_AT,
        signature_window=settings.SIGNATURE_FAILURES_WINDOW,
    )
    delivery = DeliveryService(
        database,
        catalog,
        outbox,
        alerts,
        jobs,
        clock,
        admin_emails=settings.ADMIN_EMAILS,
        support_email=settings.SUPPORT_EMAIL,
        cancel_delay=settings.CANCEL_DELAY,
        sealer=sealer,
        templates=templates,
    )
    # Mail is below delivery: the outbox only runs hooks; the delivery domain wakes the held
    # cancellation when a delivery email goes, and alerts when one fails for good.
    outbox.listen(on_sent=delivery.email_sent, on_failed=delivery.email_failed)
    runtime_box: list[Runtime] = []
    cancellations = CancellationService(
        database,
        catalog,
        jobs,
        alerts,
        clock,
        lambda: runtime_box[0].async_whop(),
        owner=owner,
        retry_schedule=settings.RETRY_SCHEDULE,
        give_up_after=settings.CANCEL_GIVE_UP_AFTER,
        lease_seconds=settings.CANCEL_LEASE,
        membership_wait=settings.MEMBERSHIP_WAIT,
        version_date=settings.WHOP_API_VERSION_DATE,
        company_id=settings.WHOP_COMPANY_ID,
        unapplied_facts=names_unapplied,
    )
    stuck_sweep = StuckWorkSweep(
        database,
        catalog,
        jobs,
        alerts,
        clock,
        owner=owner,
        interval=settings.SWEEP_INTERVAL,
        grace=settings.STUCK_GRACE,
        pending_ttl=settings.PENDING_ORDER_TTL,
    )
    checkouts = CheckoutService(
        database,
        catalog,
        clock,
        lambda: runtime_box[0].whop(),
        redirect_url=settings.CHECKOUT_REDIRECT_URL,
        company_id=settings.WHOP_COMPANY_ID,
        timeout=settings.CHECKOUT_TIMEOUT,
    )
    whop_sweep = WhopSweep(
        database,
        catalog,
        orders,
        cancellations,
        jobs,
        alerts,
        clock,
        lambda: runtime_box[0].whop(),
        owner=owner,
        interval=settings.WHOP_SWEEP_INTERVAL,
        lookback=settings.WHOP_SWEEP_LOOKBACK,
        overlap=settings.WHOP_SWEEP_OVERLAP,
        company_id=settings.WHOP_COMPANY_ID,
        versioned=settings.uses_versioned_api,
    )
    runtime = Runtime(
        settings=settings,
        clock=clock,
        database=database,
        jobs=jobs,
        catalog=catalog,
        outbox=outbox,
        alerts=alerts,
        orders=orders,
        inbox=inbox,
        delivery=delivery,
        cancellations=cancellations,
        stuck_sweep=stuck_sweep,
        checkouts=checkouts,
        whop_sweep=whop_sweep,
        owner=owner,
        sealer=sealer,
        pacer=WhopPacer(
            database,
            clock,
            rate=settings.WHOP_RATE_LIMIT,
            burst=settings.WHOP_RATE_BURST,
            owner=owner,
        ),
    )
    runtime_box.append(runtime)
    _register_tasks(runtime)
    return runtime


def _register_tasks(runtime: Runtime) -> None:
    jobs = runtime.jobs
    jobs.register(DELIVER_TASK, runtime.delivery.deliver)
    jobs.register(SERVE_TASK, runtime.delivery.serve_waiting)
    jobs.register(CANCEL_TASK, runtime.run_cancellation)
    jobs.register(SEND_TASK, runtime.outbox.send)
    jobs.register(APPLY_TASK, runtime.inbox.apply_received)
    jobs.register(REAPPLY_TASK, runtime.inbox.reapply)
    jobs.register(SWEEP_TASK, lambda: _sweep_quietly(runtime))


def _sweep_quietly(runtime: Runtime) -> None:
    runtime.stuck_sweep.run()
