"""The dashboard's routes. Pages read through the admin layer's queries; every action calls the
admin operation the CLI calls, after the guard checked the session, Origin and CSRF token."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import timedelta
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import quote

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from whop_autocancel.admin import overview, timeline
from whop_autocancel.admin import stock as admin_stock
from whop_autocancel.admin.audit import record
from whop_autocancel.admin.emails import EmailStatus, list_emails, retry_email
from whop_autocancel.admin.operations import (
    OrderListing,
    ignore_event,
    list_events,
    list_orders,
    replay_event,
    resend_delivery,
    retry_cancellation,
)
from whop_autocancel.admin.web.chart import series_chart
from whop_autocancel.admin.web.guard import (
    LOGIN_PATH,
    PAGES,
    AdminRoute,
    Guard,
    Refusal,
    check_origin,
    clear_cookie,
    read_form,
    set_cookie,
    text_field,
)
from whop_autocancel.admin.web.passwords import MAX_PASSWORD_CHARS, verify_password
from whop_autocancel.admin.web.sessions import (
    FLASH_COOKIE,
    LOGIN_COOKIE,
    LOGIN_FORM_MAX_AGE,
    SESSION_COOKIE,
    AdminSession,
    SessionCodec,
    same_token,
)
from whop_autocancel.cancellation.service import failed_cancellations
from whop_autocancel.db import throttle
from whop_autocancel.delivery.stock import items_for
from whop_autocancel.errors import WhopAutocancelError
from whop_autocancel.runtime import Runtime
from whop_autocancel.webhooks.models import EventStatus

log = structlog.get_logger(__name__)
T = TypeVar("T")

NAV = [
    ("overview", "/admin", "Overview"),
    ("orders", "/admin/orders", "Purchases"),
    ("cancellations", "/admin/cancellations", "Cancellations"),
    ("events", "/admin/events", "Inbox"),
    ("emails", "/admin/emails", "Emails"),
    ("stock", "/admin/stock", "Stock"),
]
STATIC = {"admin.css": "text/css; charset=utf-8", "admin.js": "text/javascript; charset=utf-8"}
MAX_IMPORT_BYTES = 8 * 1024 * 1024
LIST_LIMIT = 100
_BACK = re.compile(r"^/admin(/[A-Za-z0-9_.\-/]*)?(\?[A-Za-z0-9_.\-=&%]*)?$")
_LINES = re.compile(r"\r\n|\r|\n")


def admin_router(runtime: Runtime) -> APIRouter:
    """The dashboard's routes; none at all (so /admin is a 404) until a password is set."""
    router = APIRouter(prefix="/admin", route_class=AdminRoute, include_in_schema=False)
    settings = runtime.settings
    if settings.ADMIN_PASSWORD_HASH is None or settings.ADMIN_SESSION_SECRET is None:
        return router
    password_hash = settings.ADMIN_PASSWORD_HASH.get_secret_value()
    codec = SessionCodec(
        password_hash,
        settings.ADMIN_SESSION_SECRET.get_secret_value(),
        settings.ADMIN_SESSION_MAX_AGE,
    )
    guard = Guard(codec, runtime.clock)
    static = {
        name: (resources.files(__package__) / "static" / name).read_bytes() for name in STATIC
    }

    def actor(request: Request) -> str:
        """Who acts, for the audit table: the dashboard's one admin, from this address."""
        return f"web:admin@{throttle.client_key(request.client.host if request.client else None)}"

    def audit(request: Request, action: str) -> None:
        with runtime.database.transaction() as db:
            record(
                db,
                at=runtime.clock.now(),
                actor=actor(request),
                action=action,
                target="dashboard",
                order_id=None,
            )

    def read(work: Callable[[Session], T]) -> T:
        with runtime.database.transaction() as session:
            return work(session)

    def page(
        request: Request, session: AdminSession, template: str, active: str, **context: Any
    ) -> Response:
        flash = guard.take_flash(request)
        response = PAGES.render(
            template,
            title=dict((key, label) for key, _, label in NAV).get(active, "Dashboard"),
            nav=NAV,
            active=active,
            csrf_token=session.csrf_token,
            flash=flash,
            now=runtime.clock.now(),
            **context,
        )
        if flash is not None:
            clear_cookie(response, FLASH_COOKIE)
        return response

    async def act(request: Request, default_back: str, work: Callable[[], str]) -> Response:
        """Run an admin operation from a checked form; back to the page with what happened."""
        form = await guard.posted(request)
        back = text_field(form, "back")
        location = back if _BACK.match(back) and "//" not in back else default_back
        try:
            message = await run_in_threadpool(work)
        except WhopAutocancelError as error:
            return guard.flash_and_go(location, "error", str(error))
        return guard.flash_and_go(location, "ok", message)

    # Login ----------------------------------------------------------------------------------

    def login_page(
        request: Request, *, status: int = 200, error: str | None = None, headers: Any = None
    ) -> Response:
        nonce, cookie = codec.new_login_nonce(runtime.clock.now())
        flash = guard.take_flash(request)
        response = PAGES.render(
            "login.html",
            status=status,
            title="Log in",
            nav=None,
            csrf_token=nonce,
            flash=flash,
            error=error,
        )
        set_cookie(response, LOGIN_COOKIE, cookie, LOGIN_FORM_MAX_AGE)
        if flash is not None:
            clear_cookie(response, FLASH_COOKIE)
        response.headers.update(headers or {})
        return response

    @router.get("/login")
    async def login_form(request: Request) -> Response:
        if guard.session(request) is not None:
            return RedirectResponse("/admin", status_code=303)
        return login_page(request)

    @router.post("/login")
    async def login(request: Request) -> Response:
        check_origin(request)
        form = await read_form(request, 16 * 1024)
        now = runtime.clock.now()
        nonce = codec.login_nonce(request.cookies.get(LOGIN_COOKIE), now)
        if nonce is None or not same_token(nonce, text_field(form, "csrf_token")):
            raise Refusal(
                403,
                "Refused",
                "The login form is missing its security token or has expired: load it again.",
                link=LOGIN_PATH,
                link_text="Log in",
            )
        client = throttle.client_key(request.client.host if request.client else None)
        window = timedelta(seconds=settings.ADMIN_LOGIN_WINDOW)
        limit = settings.ADMIN_LOGIN_MAX_FAILURES
        held = await run_in_threadpool(
            read, lambda db: throttle.admit(db, client, now, window=window, limit=limit)
        )
        if held is not None:
            assert held.oldest is not None
            wait = max(1, math.ceil((held.oldest + window - now).total_seconds()))
            log.warning("admin_login_throttled", client=client, failures=held.count)
            return login_page(
                request,
                status=429,
                error=f"Too many wrong passwords from your address: try again in {wait} s.",
                headers={"Retry-After": str(wait)},
            )
        password = text_field(form, "password")[: MAX_PASSWORD_CHARS + 1]
        if not await run_in_threadpool(verify_password, password_hash, password):
            log.warning("admin_login_refused", client=client)
            return login_page(request, status=401, error="Wrong password.")
        await run_in_threadpool(read, lambda s: throttle.forget(s, client))
        await run_in_threadpool(audit, request, "dashboard.login")
        _, cookie = codec.new_session(now)
        log.info("admin_login", client=client)
        response = RedirectResponse("/admin", status_code=303)
        set_cookie(response, SESSION_COOKIE, cookie, settings.ADMIN_SESSION_MAX_AGE)
        clear_cookie(response, LOGIN_COOKIE)
        return response

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        await guard.posted(request)
        await run_in_threadpool(audit, request, "dashboard.logout")
        response = guard.flash_and_go(LOGIN_PATH, "ok", "Logged out.")
        clear_cookie(response, SESSION_COOKIE)
        log.info("admin_logout")
        return response

    @router.get("/static/{name}")
    async def static_file(name: str) -> Response:
        if name not in STATIC:
            raise Refusal(404, "Not found", "There is no such file.")
        return Response(
            static[name], media_type=STATIC[name], headers={"Cache-Control": "max-age=3600"}
        )

    # Pages ----------------------------------------------------------------------------------

    @router.get("")
    async def overview_page(request: Request) -> Response:
        session = guard.page_session(request)
        now = runtime.clock.now()

        def load(db: Session) -> dict[str, Any]:
            activity = overview.hourly_activity(db, now)
            swept = overview.sweeps(db, now, settings.WORKER_HEARTBEAT_MAX_AGE)
            return {
                "charts": [
                    series_chart(name, activity.hours, activity.counts[name])
                    for name in overview.SERIES
                ],
                "last_day": {name: sum(activity.counts[name][-24:]) for name in overview.SERIES},
                "backlogs": overview.backlogs(db, now, list(runtime.catalog.plans)),
                "sweeps": swept,
                "stuck_started": overview.sweep_started(
                    swept.stuck_lease_until, settings.SWEEP_INTERVAL
                ),
                "whop_started": overview.sweep_started(
                    swept.whop_lease_until, settings.WHOP_SWEEP_INTERVAL
                ),
                "alerts": overview.open_alerts(db),
            }

        def pending() -> tuple[int | None, str | None]:
            try:
                return runtime.jobs.pending(), None
            except Exception as error:  # the page still shows what the database knows
                return None, f"queue unreachable: {type(error).__name__}"

        context = await run_in_threadpool(read, load)
        queue_pending, queue_error = await run_in_threadpool(pending)
        levels = await run_in_threadpool(admin_stock.stock_levels, runtime)
        return page(
            request,
            session,
            "overview.html",
            "overview",
            levels=levels,
            queue_pending=queue_pending,
            queue_error=queue_error,
            sweep_interval=settings.SWEEP_INTERVAL,
            whop_sweep_interval=settings.WHOP_SWEEP_INTERVAL,
            **context,
        )

    @router.get("/orders")
    async def orders_page(request: Request, q: str = "") -> Response:
        """Find purchases by an order, payment, membership, checkout or event id, or an email;
        one match opens its timeline."""
        session = guard.page_session(request)
        query = q.strip()[:320]

        def load(db: Session) -> list[OrderListing]:
            if not query:
                return list_orders(db, limit=LIST_LIMIT)
            return overview.orders_by_ids(db, timeline.find_orders(db, query, limit=LIST_LIMIT))

        rows = await run_in_threadpool(read, load)
        if query and len(rows) == 1:
            return RedirectResponse(f"/admin/orders/{quote(rows[0].order.id)}", status_code=303)
        return page(request, session, "orders.html", "orders", query=query, orders=rows, error=None)

    @router.get("/orders/{order_id}")
    async def purchase_page(request: Request, order_id: str) -> Response:
        """One purchase's timeline: every event, the match, the delivery, every email, every
        call to Whop, every alert and admin action, in time order."""
        session = guard.page_session(request)
        view = await run_in_threadpool(read, lambda db: timeline.purchase(db, order_id))
        if view is None:
            raise Refusal(
                404,
                "Not found",
                f"There is no order {order_id}.",
                link="/admin/orders",
                link_text="Search purchases",
            )
        return page(request, session, "purchase.html", "orders", view=view)

    @router.get("/cancellations")
    async def cancellations_page(request: Request) -> Response:
        session = guard.page_session(request)

        def load(db: Session) -> dict[str, Any]:
            return {
                "failed": failed_cancellations(db),
                "recent": overview.recent_cancellations(db, limit=50),
            }

        context = await run_in_threadpool(read, load)
        return page(request, session, "cancellations.html", "cancellations", **context)

    @router.get("/events")
    async def events_page(request: Request, status: str = "") -> Response:
        session = guard.page_session(request)
        wanted = status if status in {member.value for member in EventStatus} else ""
        events = await run_in_threadpool(
            read, lambda db: list_events(db, status=wanted or None, limit=LIST_LIMIT)
        )
        statuses = [("", "All")] + [(member.value, member.value) for member in EventStatus]
        back = f"/admin/events?status={wanted}" if wanted else "/admin/events"
        return page(
            request,
            session,
            "events.html",
            "events",
            events=events,
            selected=wanted,
            statuses=statuses,
            back=back,
            error=None,
        )

    @router.get("/emails")
    async def emails_page(request: Request, status: str = "") -> Response:
        """The outbox, as `whop-autocancel emails` lists it (never a body, never a chat
        webhook's URL); every email unless a status is chosen."""
        session = guard.page_session(request)
        chosen = [member.value for member in EmailStatus if member is not EmailStatus.ALL]
        wanted = status if status in chosen else ""
        emails = await run_in_threadpool(
            read,
            lambda db: list_emails(db, status=wanted or EmailStatus.ALL.value, limit=LIST_LIMIT),
        )
        statuses = [("", "All")] + [(value, value) for value in chosen]
        back = f"/admin/emails?status={wanted}" if wanted else "/admin/emails"
        return page(
            request,
            session,
            "emails.html",
            "emails",
            emails=emails,
            selected=wanted,
            statuses=statuses,
            back=back,
        )

    @router.get("/stock")
    async def stock_page(request: Request) -> Response:
        session = guard.page_session(request)
        levels = await run_in_threadpool(admin_stock.stock_levels, runtime)
        pools = sorted(runtime.catalog.stock_pools())
        return page(request, session, "stock.html", "stock", levels=levels, pools=pools)

    # Actions --------------------------------------------------------------------------------

    @router.post("/cancellations/{cancellation_id}/retry")
    async def retry_route(request: Request, cancellation_id: int) -> Response:
        who = actor(request)

        def work() -> str:
            result = retry_cancellation(runtime, cancellation_id, actor=who)
            return (
                f"Cancellation #{result.cancellation_id} (membership "
                f"{result.membership_id or 'unknown'}) scheduled again as attempt generation "
                f"{result.generation}; a worker cancels it now."
            )

        return await act(request, "/admin/cancellations", work)

    @router.post("/events/{event_id:path}/replay")
    async def replay_route(request: Request, event_id: str) -> Response:
        who = actor(request)

        def work() -> str:
            result = replay_event(runtime, event_id, actor=who)
            name = f"Event {result.event_id} ({result.event_type})"
            if result.failed:
                raise WhopAutocancelError(
                    f"{name} still fails to apply: {result.last_error}. It stays failed "
                    f"(attempt {result.attempts})."
                )
            changed = (
                f"It changed: {', '.join(result.changed_tables)}."
                if result.changed
                else "Nothing changed (applying an event is idempotent)."
            )
            return f"{name} replayed: {result.previous_status} → {result.status}. {changed}"

        return await act(request, "/admin/events", work)

    @router.post("/events/{event_id:path}/ignore")
    async def ignore_route(request: Request, event_id: str) -> Response:
        who = actor(request)

        def work() -> str:
            result = ignore_event(runtime, event_id, actor=who)
            name = f"Event {result.event_id} ({result.event_type})"
            if not result.changed:
                return f"{name} is already ignored; nothing to do."
            return f"{name} marked ignored (it was {result.previous_status}): no more retries."

        return await act(request, "/admin/events", work)

    @router.post("/orders/{order_id}/resend")
    async def resend_route(request: Request, order_id: str) -> Response:
        who = actor(request)

        def work() -> str:
            resent = resend_delivery(runtime, order_id, actor=who)
            return f"Order {resent.order_id}: the delivery email is queued again to {resent.to}."

        return await act(request, "/admin/emails", work)

    @router.post("/emails/{email_id}/retry")
    async def retry_email_route(request: Request, email_id: int) -> Response:
        who = actor(request)

        def work() -> str:
            retried = retry_email(runtime, email_id, actor=who)
            what = f"Email #{retried.id} ({retried.kind} to {retried.to}"
            what += f", order {retried.order_id})" if retried.order_id else ")"
            return (
                f"{what} is queued again (attempts start over); a worker sends it now. It had "
                f"failed with: {retried.previous_error or '-'}"
            )

        return await act(request, "/admin/emails", work)

    @router.post("/stock/import")
    async def import_route(request: Request) -> Response:
        form = await guard.posted(request, MAX_IMPORT_BYTES)
        pool = text_field(form, "pool").strip()
        any_pool = text_field(form, "any_pool") == "1"
        lines = _LINES.split(text_field(form, "items"))
        upload = form.get("file")
        if isinstance(upload, UploadFile) and upload.filename:
            raw = await upload.read()
            try:
                lines += _LINES.split(raw.decode("utf-8-sig"))
            except UnicodeDecodeError as error:
                return guard.flash_and_go(
                    "/admin/stock",
                    "error",
                    f"{upload.filename} is not UTF-8 (byte {error.start}); save it as UTF-8.",
                )

        def work() -> str:
            parsed = items_for(lines, where="the items given")
            report = admin_stock.import_stock(
                runtime, pool, parsed, any_pool=any_pool, actor=actor(request)
            )
            served = min(report.waiting, report.available)
            return (
                f"Pool {report.pool}: {report.added} item(s) added; skipped {report.skipped} "
                f"({report.blank} blank, {report.duplicate_in_file} repeated, "
                f"{report.already_in_stock} already in stock). Available now: "
                f"{report.available}."
                + (f" {served} waiting order(s) are being delivered." if served else "")
            )

        try:
            message = await run_in_threadpool(work)
        except WhopAutocancelError as error:
            return guard.flash_and_go("/admin/stock", "error", str(error))
        return guard.flash_and_go("/admin/stock", "ok", message)

    @router.post("/stock/void")
    async def void_route(request: Request) -> Response:
        form = await guard.posted(request)
        item = text_field(form, "item").strip().lstrip("#")
        reason = text_field(form, "reason").strip()[:500] or "voided from the dashboard"
        if not item.isdigit():
            return guard.flash_and_go("/admin/stock", "error", "Give the item's number.")

        def work() -> str:
            result = admin_stock.void_stock(runtime, int(item), reason, actor=actor(request))
            if not result.changed:
                return f"Item #{result.item_id} (pool {result.pool}) was void already."
            held = f", held by order {result.order_id}" if result.order_id else ""
            return f"Item #{result.item_id} (pool {result.pool}, was {result.was}{held}) voided."

        try:
            message = await run_in_threadpool(work)
        except WhopAutocancelError as error:
            return guard.flash_and_go("/admin/stock", "error", str(error))
        return guard.flash_and_go("/admin/stock", "ok", message)

    @router.get("/{path:path}")
    async def not_found(path: str) -> Response:
        if path == "":  # /admin/
            return RedirectResponse("/admin", status_code=303)
        raise Refusal(404, "Not found", "There is no such page.")

    return router
