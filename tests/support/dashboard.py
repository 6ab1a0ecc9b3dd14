"""The dashboard in tests: a cheap argon2 hash of a known password, and an HTTP client that
keeps the admin cookies itself (they are `Secure`, which http.cookiejar never sends over
http://127.0.0.1, while Chromium does: loopback counts as a secure origin)."""

from __future__ import annotations

import re
from http.cookies import SimpleCookie
from typing import Any

import httpx
from argon2 import PasswordHasher

PASSWORD = "correct horse battery staple"
SESSION_SECRET = "test-session-secret-0123456789-0123456789"
# Low cost (the hash carries its parameters, so verifying it is fast too): tests only.
_CHEAP = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


def password_hash(password: str = PASSWORD) -> str:
    return _CHEAP.hash(password)


def dashboard_settings(password: str = PASSWORD) -> dict[str, str]:
    return {"ADMIN_PASSWORD_HASH": password_hash(password), "ADMIN_SESSION_SECRET": SESSION_SECRET}


_TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_token(html: str) -> str:
    found = _TOKEN.search(html)
    assert found is not None, "no csrf_token in the page"
    return found.group(1)


class AdminClient:
    """httpx without redirects, with the cookies the dashboard sets kept by hand."""

    def __init__(self, base_url: str, *, client_address: str | None = None) -> None:
        headers = {"X-Forwarded-For": client_address} if client_address else {}
        self.http = httpx.Client(base_url=base_url, timeout=10, headers=headers)
        self.cookies: dict[str, str] = {}
        self.token: str | None = None

    def close(self) -> None:
        self.http.close()

    def _keep(self, response: httpx.Response) -> httpx.Response:
        for header in response.headers.get_list("set-cookie"):
            parsed: SimpleCookie = SimpleCookie()
            parsed.load(header)
            for name, morsel in parsed.items():
                if morsel["max-age"] == "0" or not morsel.value:
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
        return response

    def _cookie_header(self) -> dict[str, str]:
        if not self.cookies:
            return {}
        return {"Cookie": "; ".join(f"{name}={value}" for name, value in self.cookies.items())}

    def get(self, path: str, **options: Any) -> httpx.Response:
        headers = {**self._cookie_header(), **options.pop("headers", {})}
        response = self._keep(self.http.get(path, headers=headers, **options))
        if response.status_code == 200 and "csrf_token" in response.text:
            self.token = csrf_token(response.text)
        return response

    def post(
        self, path: str, data: dict[str, str] | None = None, *, token: bool = True, **options: Any
    ) -> httpx.Response:
        form = dict(data or {})
        if token and self.token is not None:
            form.setdefault("csrf_token", self.token)
        headers = {**self._cookie_header(), **options.pop("headers", {})}
        return self._keep(self.http.post(path, data=form, headers=headers, **options))

    def login(self, password: str = PASSWORD) -> httpx.Response:
        page = self.get("/admin/login")
        assert page.status_code == 200, page.text
        response = self.post("/admin/login", {"password": password})
        if response.status_code == 303:
            self.get("/admin")  # the session's own CSRF token
        return response
