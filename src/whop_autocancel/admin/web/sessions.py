"""The dashboard's session: a signed cookie, nothing stored on the server, so it survives a
restart and is valid on every web process that has the same settings.

The signing key is HMAC-SHA256(ADMIN_SESSION_SECRET, ADMIN_PASSWORD_HASH): a new password (a
new hash, with a new salt) or a new secret changes the key, and every session signed before is
void. The hash alone is not enough to forge one: the secret never leaves the server's settings.
The cookie carries when it was issued (checked against ADMIN_SESSION_MAX_AGE on the service's
clock) and the session's CSRF token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from itsdangerous import BadSignature, URLSafeSerializer

SESSION_COOKIE = "wa_admin"
LOGIN_COOKIE = "wa_admin_login"  # the login form's own CSRF nonce (before any session)
FLASH_COOKIE = "wa_admin_flash"  # one message for the next page (after a POST, then redirect)
COOKIE_PATH = "/admin"
LOGIN_FORM_MAX_AGE = 3600.0
FLASH_MAX_AGE = 120.0


@dataclass(frozen=True)
class AdminSession:
    issued_at: float  # Unix seconds
    csrf_token: str


class SessionCodec:
    """Signs and reads the dashboard's cookies with the key of the current password."""

    def __init__(self, password_hash: str, session_secret: str, max_age: float) -> None:
        key = hmac.new(
            session_secret.encode(),
            b"whop-autocancel admin session\x00" + password_hash.encode(),
            hashlib.sha256,
        ).digest()
        self._sessions = URLSafeSerializer(key, salt="whop-autocancel.admin.session")
        self._logins = URLSafeSerializer(key, salt="whop-autocancel.admin.login")
        self._flashes = URLSafeSerializer(key, salt="whop-autocancel.admin.flash")
        self.max_age = max_age

    # Sessions -------------------------------------------------------------------------------

    def new_session(self, now: datetime) -> tuple[AdminSession, str]:
        session = AdminSession(issued_at=now.timestamp(), csrf_token=secrets.token_urlsafe(32))
        value = self._sessions.dumps({"v": 1, "iat": session.issued_at, "csrf": session.csrf_token})
        return session, value

    def read_session(self, value: str | None, now: datetime) -> AdminSession | None:
        """The session in this cookie, or None: missing, forged, signed with an older password
        or secret, or older than the maximum age."""
        data = self._load(self._sessions, value)
        if data is None or data.get("v") != 1:
            return None
        issued, token = data.get("iat"), data.get("csrf")
        if not isinstance(issued, int | float) or not isinstance(token, str) or not token:
            return None
        age = now.timestamp() - issued
        if age < -60 or age > self.max_age:  # a little clock skew between machines is fine
            return None
        return AdminSession(issued_at=float(issued), csrf_token=token)

    # The login form's nonce -----------------------------------------------------------------

    def new_login_nonce(self, now: datetime) -> tuple[str, str]:
        """(the nonce for the form, the cookie that must come back with it)."""
        nonce = secrets.token_urlsafe(32)
        return nonce, self._logins.dumps({"n": nonce, "iat": now.timestamp()})

    def login_nonce(self, value: str | None, now: datetime) -> str | None:
        data = self._load(self._logins, value)
        if data is None:
            return None
        nonce, issued = data.get("n"), data.get("iat")
        if not isinstance(nonce, str) or not isinstance(issued, int | float):
            return None
        if not -60 <= now.timestamp() - issued <= LOGIN_FORM_MAX_AGE:
            return None
        return nonce

    # Flash messages -------------------------------------------------------------------------

    def flash(self, kind: str, text: str) -> str:
        return self._flashes.dumps({"k": kind, "t": text[:1000]})

    def read_flash(self, value: str | None) -> tuple[str, str] | None:
        data = self._load(self._flashes, value)
        if data is None or not isinstance(data.get("k"), str) or not isinstance(data.get("t"), str):
            return None
        return data["k"], data["t"]

    @staticmethod
    def _load(serializer: URLSafeSerializer, value: str | None) -> dict[str, Any] | None:
        if not value or len(value) > 4096:
            return None
        try:
            data = serializer.loads(value)
        except BadSignature:
            return None
        return data if isinstance(data, dict) else None


def same_token(expected: str, given: str | None) -> bool:
    """Constant-time comparison of a CSRF token."""
    return bool(given) and hmac.compare_digest(expected.encode(), str(given).encode())
