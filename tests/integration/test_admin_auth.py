"""The dashboard's door, over real HTTP: off without a password, a signed session cookie
(strict flags, expiry, valid on every process, void after a password change), a CSRF token on
every form, and a login throttle counted in the database across processes."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import select

from support.dashboard import PASSWORD, AdminClient, dashboard_settings
from support.harness import ServiceServer, make_runtime, make_settings
from whop_autocancel.clock import FrozenClock
from whop_autocancel.db.throttle import LoginFailure
from whop_autocancel.runtime import Runtime
from whop_autocancel.webhooks.models import EventStatus, WebhookEvent

PAGES = [
    "/admin",
    "/admin/orders",
    "/admin/cancellations",
    "/admin/events",
    "/admin/emails",
    "/admin/stock",
]
ACTIONS = [
    "/admin/logout",
    "/admin/cancellations/1/retry",
    "/admin/events/msg_x/replay",
    "/admin/events/msg_x/ignore",
    "/admin/orders/ord_x/resend",
    "/admin/stock/import",
    "/admin/stock/void",
]


@contextmanager
def serving(tmp_path: Path, clock: FrozenClock, **settings: Any) -> Iterator[tuple[Runtime, str]]:
    runtime = make_runtime(make_settings(tmp_path, **settings), clock)
    server = ServiceServer(runtime)
    try:
        with server.running():
            yield runtime, server.url
    finally:
        runtime.close()


@contextmanager
def client(url: str, **options: Any) -> Iterator[AdminClient]:
    admin = AdminClient(url, **options)
    try:
        yield admin
    finally:
        admin.close()


def test_the_dashboard_is_not_there_without_a_password(tmp_path: Path, clock: FrozenClock) -> None:
    with serving(tmp_path, clock) as (_, url), client(url) as admin:
        assert admin.get("/admin").status_code == 404
        assert admin.get("/admin/login").status_code == 404
        assert admin.post("/admin/login", {"password": PASSWORD}).status_code == 404


def test_every_page_and_action_is_refused_without_a_session(
    tmp_path: Path, clock: FrozenClock
) -> None:
    with serving(tmp_path, clock, **dashboard_settings()) as (_, url), client(url) as admin:
        for path in PAGES:
            response = admin.get(path)
            assert response.status_code == 303, path
            assert response.headers["location"] == "/admin/login", path
        admin.get("/admin/login")  # a login form's token is no session's token
        for path in ACTIONS:
            assert admin.post(path).status_code == 403, path
            assert admin.post(path, token=False).status_code == 403, path
        assert admin.get("/admin/static/admin.css").status_code == 200


def test_login_sets_a_strict_signed_session_cookie(tmp_path: Path, clock: FrozenClock) -> None:
    with serving(tmp_path, clock, **dashboard_settings()) as (_, url), client(url) as admin:
        response = admin.login()
        assert response.status_code == 303
        assert response.headers["location"] == "/admin"
        [cookie] = [
            header
            for header in response.headers.get_list("set-cookie")
            if header.startswith("wa_admin=")
        ]
        flags = {part.strip().lower() for part in cookie.split(";")[1:]}
        assert {"secure", "httponly", "samesite=strict", "path=/admin", "max-age=43200"} <= flags
        overview = admin.get("/admin")
        assert overview.status_code == 200
        assert "Overview" in overview.text
        for path in PAGES:
            assert admin.get(path).status_code == 200, path


def test_admin_responses_carry_security_headers(tmp_path: Path, clock: FrozenClock) -> None:
    with serving(tmp_path, clock, **dashboard_settings()) as (_, url), client(url) as admin:
        responses = [admin.get("/admin/login"), admin.post("/admin/stock/void")]
        admin.login()
        responses.append(admin.get("/admin"))
        for response in responses:
            csp = response.headers["content-security-policy"]
            assert "default-src 'none'" in csp
            assert "script-src 'self'" in csp
            assert "frame-ancestors 'none'" in csp
            assert "unsafe-inline" not in csp
            assert response.headers["x-frame-options"] == "DENY"
            assert response.headers["cache-control"] == "no-store"
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["referrer-policy"] == "same-origin"


def test_a_wrong_password_is_refused_then_throttled_across_processes(
    tmp_path: Path, clock: FrozenClock
) -> None:
    settings = {**dashboard_settings(), "ADMIN_LOGIN_MAX_FAILURES": 5}
    with (
        serving(tmp_path, clock, **settings) as (runtime, first),
        serving(tmp_path, clock, **settings) as (_, second),
        client(first, client_address="203.0.113.7") as one,
        client(second, client_address="203.0.113.7") as other,
        client(first, client_address="198.51.100.20") as bystander,
    ):
        for attempt in range(5):
            admin = one if attempt % 2 == 0 else other
            response = admin.login("wrong password " + str(attempt))
            assert response.status_code == 401
            assert "Wrong password" in response.text
            assert "wa_admin" not in admin.cookies
        throttled = one.login(PASSWORD)  # even the right password waits
        assert throttled.status_code == 429
        assert int(throttled.headers["retry-after"]) == 900
        assert "Too many wrong passwords" in throttled.text
        assert other.login(PASSWORD).status_code == 429
        assert bystander.login().status_code == 303  # another address is not held up
        with runtime.database.transaction() as session:
            assert len(session.scalars(select(LoginFailure)).all()) == 5
        clock.advance(901)
        assert one.login().status_code == 303
        with runtime.database.transaction() as session:  # a success clears its address
            assert session.scalars(select(LoginFailure)).all() == []


def test_parallel_guesses_get_no_more_tries_than_the_limit(
    tmp_path: Path, clock: FrozenClock
) -> None:
    settings = {**dashboard_settings(), "ADMIN_LOGIN_MAX_FAILURES": 5}
    with serving(tmp_path, clock, **settings) as (runtime, url):
        clients = [AdminClient(url, client_address="203.0.113.9") for _ in range(12)]
        try:
            for admin in clients:
                admin.get("/admin/login")  # each its own login form and nonce
            with ThreadPoolExecutor(max_workers=12) as pool:
                statuses = sorted(
                    pool.map(
                        lambda admin: admin.post("/admin/login", {"password": "guess"}).status_code,
                        clients,
                    )
                )
        finally:
            for admin in clients:
                admin.close()
        assert statuses == [401] * 5 + [429] * 7
        with runtime.database.transaction() as session:
            assert len(session.scalars(select(LoginFailure)).all()) == 5


def test_a_login_without_its_csrf_token_is_refused(tmp_path: Path, clock: FrozenClock) -> None:
    with serving(tmp_path, clock, **dashboard_settings()) as (runtime, url), client(url) as admin:
        admin.get("/admin/login")
        assert admin.post("/admin/login", {"password": PASSWORD}, token=False).status_code == 403
        forged = admin.post("/admin/login", {"password": PASSWORD, "csrf_token": "forged"})
        assert forged.status_code == 403
        admin.cookies.clear()  # a token without the cookie it belongs to
        assert admin.post("/admin/login", {"password": PASSWORD}).status_code == 403
        assert "wa_admin" not in admin.cookies
        with runtime.database.transaction() as session:
            assert session.scalars(select(LoginFailure)).all() == []  # nothing was counted


def failed_event(runtime: Runtime, event_id: str = "msg_failed_1") -> str:
    with runtime.database.transaction() as session:
        session.add(
            WebhookEvent(
                id=event_id,
                type="payment.succeeded",
                payload="{}",
                received_at=runtime.clock.now(),
                status=EventStatus.FAILED.value,
                attempts=5,
                last_error="boom",
            )
        )
    return event_id


def event_status(runtime: Runtime, event_id: str) -> str:
    with runtime.database.transaction() as session:
        stored = session.get(WebhookEvent, event_id)
        assert stored is not None
        return stored.status


def test_a_post_without_the_csrf_token_changes_nothing(tmp_path: Path, clock: FrozenClock) -> None:
    with serving(tmp_path, clock, **dashboard_settings()) as (runtime, url), client(url) as admin:
        event_id = failed_event(runtime)
        assert admin.login().status_code == 303
        action = f"/admin/events/{event_id}/ignore"
        assert admin.post(action, token=False).status_code == 403
        assert admin.post(action, {"csrf_token": "not-the-token"}).status_code == 403
        foreign = admin.post(action, headers={"Origin": "https://evil.example"})
        assert foreign.status_code == 403
        assert event_status(runtime, event_id) == EventStatus.FAILED.value
        same_origin = admin.post(action, headers={"Origin": url})
        assert same_origin.status_code == 303
        assert event_status(runtime, event_id) == EventStatus.IGNORED.value


def test_a_session_is_valid_on_another_process_and_after_a_restart(
    tmp_path: Path, clock: FrozenClock
) -> None:
    settings = dashboard_settings()
    with serving(tmp_path, clock, **settings) as (_, url), client(url) as admin:
        assert admin.login().status_code == 303
        cookies = dict(admin.cookies)
    with serving(tmp_path, clock, **settings) as (_, url), client(url) as admin:
        admin.cookies.update(cookies)
        assert admin.get("/admin").status_code == 200


def test_a_password_change_logs_everyone_out(tmp_path: Path, clock: FrozenClock) -> None:
    with serving(tmp_path, clock, **dashboard_settings()) as (_, url), client(url) as admin:
        assert admin.login().status_code == 303
        cookies = dict(admin.cookies)
    changed = dashboard_settings("a brand new password")
    with serving(tmp_path, clock, **changed) as (_, url), client(url) as admin:
        admin.cookies.update(cookies)
        assert admin.get("/admin").status_code == 303
        assert admin.login(PASSWORD).status_code == 401
        assert admin.login("a brand new password").status_code == 303


def test_a_session_expires_and_a_tampered_one_is_refused(
    tmp_path: Path, clock: FrozenClock
) -> None:
    settings = {**dashboard_settings(), "ADMIN_SESSION_MAX_AGE": 3600}
    with serving(tmp_path, clock, **settings) as (_, url), client(url) as admin:
        assert admin.login().status_code == 303
        good = admin.cookies["wa_admin"]
        admin.cookies["wa_admin"] = good[:-2] + ("AA" if not good.endswith("AA") else "BB")
        assert admin.get("/admin").status_code == 303
        admin.cookies["wa_admin"] = good
        clock.advance(3599)
        assert admin.get("/admin").status_code == 200
        clock.advance(2)
        assert admin.get("/admin").status_code == 303


def test_logout_forgets_the_session(tmp_path: Path, clock: FrozenClock) -> None:
    with serving(tmp_path, clock, **dashboard_settings()) as (_, url), client(url) as admin:
        assert admin.login().status_code == 303
        response = admin.post("/admin/logout")
        assert response.status_code == 303
        assert response.headers["location"] == "/admin/login"
        assert "wa_admin" not in admin.cookies
        assert admin.get("/admin").status_code == 303


def test_unknown_admin_pages_are_404_and_a_trailing_slash_is_fine(
    tmp_path: Path, clock: FrozenClock
) -> None:
    with serving(tmp_path, clock, **dashboard_settings()) as (_, url), client(url) as admin:
        admin.login()
        assert admin.get("/admin/nothing-here").status_code == 404
        slash = admin.get("/admin/")
        assert (slash.status_code, slash.headers["location"]) == (303, "/admin")


def test_an_event_id_with_a_slash_can_be_acted_on(tmp_path: Path, clock: FrozenClock) -> None:
    with serving(tmp_path, clock, **dashboard_settings()) as (runtime, url), client(url) as admin:
        event_id = failed_event(runtime, "msg/odd 1")
        admin.login()
        page = admin.get("/admin/events").text
        assert 'action="/admin/events/msg%2Fodd%201/ignore"' in page
        assert admin.post("/admin/events/msg%2Fodd%201/ignore").status_code == 303
        assert event_status(runtime, event_id) == EventStatus.IGNORED.value
