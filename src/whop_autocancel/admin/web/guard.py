"""The dashboard's door: who is logged in, the CSRF token and Origin of every POST, bounded
form bodies, and the route class that turns refusals into pages with the security headers."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import urlsplit

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response
from fastapi.routing import APIRoute
from starlette.datastructures import FormData, UploadFile

from whop_autocancel.admin.web.render import Pages, secure
from whop_autocancel.admin.web.sessions import (
    COOKIE_PATH,
    FLASH_COOKIE,
    FLASH_MAX_AGE,
    SESSION_COOKIE,
    AdminSession,
    SessionCodec,
    same_token,
)
from whop_autocancel.clock import Clock
from whop_autocancel.orders.routes import BodyTooLarge, read_capped

PAGES = Pages()
MAX_FORM_BYTES = 64 * 1024
LOGIN_PATH = "/admin/login"


class Refusal(Exception):
    """A request the dashboard refuses: shown as a small page with this status."""

    def __init__(
        self,
        status: int,
        title: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        link: str = "/admin",
        link_text: str = "Back to the dashboard",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.title = title
        self.message = message
        self.headers = headers or {}
        self.link = link
        self.link_text = link_text

    def response(self) -> Response:
        response = PAGES.render(
            "error.html",
            status=self.status,
            title=self.title,
            message=self.message,
            link=self.link,
            link_text=self.link_text,
            nav=None,
            flash=None,
        )
        response.headers.update(self.headers)
        return response


class SignIn(Exception):
    """A page asked for without a session: go to the login form."""


class AdminRoute(APIRoute):
    """Every admin response, refusals included, gets the security headers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                response = await handle(request)
            except SignIn:
                response = RedirectResponse(LOGIN_PATH, status_code=303)
            except Refusal as refusal:
                response = refusal.response()
            except RequestValidationError:
                response = Refusal(
                    400, "Bad request", "That request is not one of ours."
                ).response()
            return secure(response)

        return guarded


def check_origin(request: Request) -> None:
    """A browser names the page a POST comes from: it must be this site (SameSite=Strict
    already keeps the cookie off other sites' requests; this refuses them outright)."""
    origin = request.headers.get("origin")
    if origin is not None:
        host = (request.headers.get("host") or "").lower()
        if origin == "null" or urlsplit(origin).netloc.lower() != host:
            raise Refusal(403, "Refused", "This form was not sent from this dashboard.")
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        raise Refusal(403, "Refused", "This form was not sent from this dashboard.")


async def read_form(request: Request, limit: int = MAX_FORM_BYTES) -> FormData:
    """The form of a POST, refused over `limit` bytes before it is parsed."""
    try:
        body = await read_capped(request, limit)
    except BodyTooLarge:
        raise Refusal(413, "Too large", f"The form is larger than {limit} bytes.") from None

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return await Request(request.scope, receive=replay).form(max_part_size=limit)


def text_field(form: FormData, name: str) -> str:
    value = form.get(name)
    return "" if value is None or isinstance(value, UploadFile) else value


class Guard:
    """Sessions of the current password, on the service's clock."""

    def __init__(self, codec: SessionCodec, clock: Clock) -> None:
        self.codec = codec
        self.clock = clock

    def session(self, request: Request) -> AdminSession | None:
        return self.codec.read_session(request.cookies.get(SESSION_COOKIE), self.clock.now())

    def page_session(self, request: Request) -> AdminSession:
        session = self.session(request)
        if session is None:
            raise SignIn
        return session

    async def posted(self, request: Request, limit: int = MAX_FORM_BYTES) -> FormData:
        """The form of an admin action, once its origin, session and CSRF token are checked:
        anything missing or wrong is a 403 and nothing runs."""
        check_origin(request)
        session = self.session(request)
        if session is None:
            raise Refusal(
                403, "Not logged in", "Log in first.", link=LOGIN_PATH, link_text="Log in"
            )
        form = await read_form(request, limit)
        if not same_token(session.csrf_token, text_field(form, "csrf_token")):
            raise Refusal(
                403,
                "Refused",
                "The form's security token is missing or out of date: reload the page and "
                "try again. Nothing was changed.",
            )
        return form

    def flash_and_go(self, location: str, kind: str, text: str) -> RedirectResponse:
        """After an action: back to a page, with one message for it (POST, redirect, GET)."""
        response = RedirectResponse(location, status_code=303)
        set_cookie(response, FLASH_COOKIE, self.codec.flash(kind, text), FLASH_MAX_AGE)
        return response

    def take_flash(self, request: Request) -> tuple[str, str] | None:
        return self.codec.read_flash(request.cookies.get(FLASH_COOKIE))


def set_cookie(response: Response, name: str, value: str, max_age: float) -> None:
    response.set_cookie(
        name,
        value,
        max_age=int(max_age),
        path=COOKIE_PATH,
        secure=True,
        httponly=True,
        samesite="strict",
    )


def clear_cookie(response: Response, name: str) -> None:
    response.delete_cookie(name, path=COOKIE_PATH, secure=True, httponly=True, samesite="strict")
