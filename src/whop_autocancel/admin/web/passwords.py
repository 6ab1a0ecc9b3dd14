"""The dashboard password: argon2id (argon2-cffi, RFC 9106's low-memory profile: 64 MiB, three
passes), so a leaked hash costs an attacker real memory per guess."""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from whop_autocancel.errors import WhopAutocancelError

MIN_PASSWORD_CHARS = 12
MAX_PASSWORD_CHARS = 1024  # a login form field longer than this is refused before hashing

_HASHER = PasswordHasher()


class PasswordRefused(WhopAutocancelError):
    """A new password that is too short or too long."""


def hash_password(password: str) -> str:
    """The PHC string of `password` (`$argon2id$v=19$m=65536,t=3,p=4$…`), with a random salt."""
    if len(password) < MIN_PASSWORD_CHARS:
        raise PasswordRefused(f"the password must be at least {MIN_PASSWORD_CHARS} characters long")
    if len(password) > MAX_PASSWORD_CHARS:
        raise PasswordRefused(f"the password must be at most {MAX_PASSWORD_CHARS} characters")
    return _HASHER.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    """Whether `password` is the one hashed. argon2 compares in constant time, and every wrong
    password costs the same full hash as a right one."""
    if len(password) > MAX_PASSWORD_CHARS:
        return False
    try:
        return _HASHER.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False
