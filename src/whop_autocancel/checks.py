"""`whop-autocancel check`: is everything the service needs reachable and right? One line per
check; every check runs even when an earlier one failed, so one run shows every problem."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

from whop_autocancel.catalog import Catalog, load_catalog
from whop_autocancel.clock import SystemClock, format_utc
from whop_autocancel.db.engine import Database, sqlite_path
from whop_autocancel.db.install import watching_since
from whop_autocancel.delivery.methods import known_methods
from whop_autocancel.delivery.stock import (
    empty_pools,
    restock_command,
    stock_levels,
    unreadable_items,
)
from whop_autocancel.errors import WhopAutocancelError, error_line, one_line
from whop_autocancel.jobs import Jobs
from whop_autocancel.mail.render import EmailTemplates
from whop_autocancel.mail.smtp import check_connection
from whop_autocancel.schema.migrate import current_revision, head_revision
from whop_autocancel.settings import Settings
from whop_autocancel.whop.client import WhopClient, WhopReply

CANCEL_NOTE = (
    "note: permission to cancel memberships cannot be proven without cancelling one; the first "
    "cancellation tells (a missing permission pauses cancellations and alerts you once)"
)


API_KEYS_PAGE = "Dashboard → Developer → API keys"


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str


def _attempt(name: str, check: Callable[[], str]) -> CheckResult:
    """The check's result on one line, whatever its error holds (a driver's hint, SQLAlchemy's
    "(Background on this error at: …)", the list of settings to fix)."""
    try:
        return CheckResult(name, True, one_line(check()))
    except (WhopAutocancelError, OSError) as error:
        return CheckResult(name, False, one_line(str(error)))
    except Exception as error:  # a check must report, never crash the command
        return CheckResult(name, False, error_line(error))


class _Failed(WhopAutocancelError):
    pass


def run_checks(settings: Settings) -> Iterator[CheckResult]:
    yield _attempt("settings", lambda: _settings(settings))
    catalog_box: list[Catalog] = []
    yield _attempt("catalog", lambda: _catalog(settings, catalog_box))
    yield _attempt("database", lambda: _database(settings))
    if catalog_box and catalog_box[0].stock_pools():
        yield _attempt("stock", lambda: _stock(settings, catalog_box[0]))
    if settings.EMAIL_TEMPLATES_DIR is not None:
        yield _attempt("email templates", lambda: _templates(settings))
    yield _attempt("queue", lambda: _queue(settings))
    yield _attempt(
        "smtp",
        lambda: (
            f"{settings.smtp.describe()} answered "
            f"{check_connection(settings.smtp, settings.SMTP_TIMEOUT)}"
        ),
    )
    if settings.WHOP_API_KEY is None:
        yield CheckResult("whop", False, "WHOP_API_KEY is not set: nothing to check at Whop")
        return
    client = WhopClient(
        settings.WHOP_API_URL,
        settings.WHOP_API_KEY.get_secret_value(),
        version_date=settings.WHOP_API_VERSION_DATE,
        timeout=settings.WHOP_TIMEOUT,
        clock=SystemClock(),
    )
    try:
        for what, listing, permission in (
            ("memberships", client.list_memberships, "member:basic:read"),
            ("payments", client.list_payments, "payment:basic:read"),
        ):
            yield _attempt(
                f"whop {what}",
                partial(_readable, listing, what, permission, settings),
            )
        for plan_id in sorted(catalog_box[0].plans) if catalog_box else []:
            yield _attempt(f"plan {plan_id}", partial(_plan, client, plan_id))
    finally:
        client.close()


def _settings(settings: Settings) -> str:
    settings.require_runtime()
    secrets = settings.webhook_secrets
    if any(not secret.startswith(b"ws_") for secret in secrets):
        raise _Failed(
            "WHOP_WEBHOOK_SECRET: Whop's secrets start with ws_; check you copied "
            "the webhook's secret, not another value"
        )
    api = "legacy" if settings.WHOP_API_VERSION_DATE is None else settings.WHOP_API_VERSION_DATE
    return f"complete; Whop API {settings.WHOP_API_URL} ({api}); {len(secrets)} webhook secret(s)"


def _catalog(settings: Settings, box: list[Catalog]) -> str:
    catalog = load_catalog(settings.CATALOG_PATH, known_methods())
    box.append(catalog)
    if not catalog.plans:
        raise _Failed(f"{settings.CATALOG_PATH} lists no plans: nothing would be delivered")
    return f"{settings.CATALOG_PATH}: {len(catalog.plans)} plan(s)"


def _database(settings: Settings) -> str:
    path = sqlite_path(settings.DATABASE_URL)
    if path is not None and not path.exists():
        return f"{path} does not exist yet; `serve` creates it"
    database = Database(settings.DATABASE_URL)
    try:
        database.ping()
        current, head = current_revision(database), head_revision(database)
        since = database.run(watching_since) if current == head else None
    finally:
        database.dispose()
    if current == head:
        watching = (
            f"watching Whop since {format_utc(since)}"
            if since is not None
            else "not started yet (the first start records when it starts watching Whop)"
        )
        return f"reachable, schema at {head}, {watching}"
    if database.engine.dialect.name == "sqlite":
        return f"reachable; schema at {current or 'nothing'} is upgraded to {head} on start"
    raise _Failed(f"schema at {current or 'nothing'}, not {head}: run `whop-autocancel migrate`")


def _stock(settings: Settings, catalog: Catalog) -> str:
    """The key is set, and every pool the catalog uses has items (an empty pool makes buyers
    wait: their orders are paid, not delivered)."""
    settings.require("STOCK_ENCRYPTION_KEY")
    path = sqlite_path(settings.DATABASE_URL)
    if path is not None and not path.exists():
        raise _Failed("no items: import them with `whop-autocancel stock import POOL FILE` first")
    database = Database(settings.DATABASE_URL)
    try:
        if current_revision(database) != head_revision(database):
            return "key set; levels shown once the schema is current (see the database check)"
        with database.transaction() as session:
            levels = stock_levels(session, catalog)
            sealer = settings.sealer
            assert sealer is not None
            unreadable = unreadable_items(session, sealer)
    finally:
        database.dispose()
    if unreadable:
        named = ", ".join(f"{pool} (item #{item_id})" for pool, item_id in unreadable)
        raise _Failed(
            f"STOCK_ENCRYPTION_KEY cannot decrypt the stored items of {named}: is it the key "
            "they were imported with? (after a rotation: new key first, old key after)"
        )
    used = [level for level in levels if level.plans]
    empty = empty_pools(levels)
    summary = "; ".join(
        f"{level.pool}: {level.available} available" + (" (low)" if level.low else "")
        for level in used
    )
    if empty:
        raise _Failed(
            f"{summary}. Empty: {', '.join(empty)}: buyers would wait; import items with "
            f"`{restock_command('POOL')}`"
        )
    return f"key set; {summary}"


def _templates(settings: Settings) -> str:
    EmailTemplates(settings.EMAIL_TEMPLATES_DIR).check()
    return f"{settings.EMAIL_TEMPLATES_DIR}: customer templates render"


def _queue(settings: Settings) -> str:
    path = sqlite_path(settings.QUEUE_URL)
    if path is not None and not path.exists():
        return f"{path} does not exist yet; `serve` creates it"
    jobs = Jobs(settings.QUEUE_URL, settings.QUEUE_NAME)
    return f"reachable, {jobs.pending()} job(s) waiting"


def _readable(
    listing: Callable[..., WhopReply], what: str, permission: str, settings: Settings
) -> str:
    reply = listing(company_id=settings.WHOP_COMPANY_ID, first=1)
    if reply.ok:
        return f"the API key can read {what}"
    _refused(reply, permission)
    hint = ""
    if reply.status == 400 and settings.WHOP_COMPANY_ID is None:
        hint = " (set WHOP_COMPANY_ID to your biz_… id)"
    raise _Failed(f"cannot list {what}: {reply.describe()}{hint}")


def _refused(reply: WhopReply, permission: str) -> None:
    """Whop refused the key: 401, it does not know the key at all (mistyped, revoked or
    deleted; no permission would help); 403, it knows the key and `permission` is missing."""
    if reply.status == 401:
        raise _Failed(
            f"Whop does not accept the API key ({reply.describe()}): it is wrong, revoked or "
            f"deleted; create an account API key in Whop ({API_KEYS_PAGE}) and set WHOP_API_KEY"
        )
    if reply.status == 403:
        raise _Failed(
            f"the API key lacks the {permission} permission ({reply.describe()}): add it to "
            f"the key in Whop ({API_KEYS_PAGE})"
        )


def _plan(client: WhopClient, plan_id: str) -> str:
    reply = client.retrieve_plan(plan_id)
    _refused(reply, "plan:basic:read")
    if reply.status == 404:
        raise _Failed("does not exist for this API key: fix the plan id in the catalog")
    if not reply.ok or not isinstance(reply.body, dict):
        raise _Failed(f"cannot read it: {reply.describe()}")
    plan_type = reply.body.get("plan_type")
    if plan_type == "one_time":
        return "exists and is one_time"
    if plan_type == "renewal":
        raise _Failed(
            "is a subscription (renewal): remove it from the catalog; subscriptions "
            "are never cancelled"
        )
    raise _Failed(f"has plan_type {plan_type!r}, expected one_time")
