"""Secrets at rest: stock items (accounts, license keys) and the emails that carry them are
stored encrypted with Fernet (AES-128-CBC + HMAC-SHA256, from `cryptography`).

`STOCK_ENCRYPTION_KEY` holds one key, or several separated by spaces for rotation: the first
encrypts, every one decrypts. Duplicates are found without decrypting: each item also stores a
keyed fingerprint (HMAC-SHA256 under a key derived from the first Fernet key), so the database
alone does not reveal whether it holds a given account.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from whop_autocancel.errors import ConfigurationError, WhopAutocancelError

SETTING = "STOCK_ENCRYPTION_KEY"
_FINGERPRINT_CONTEXT = b"whop-autocancel stock fingerprint v1"


class SealError(WhopAutocancelError):
    """A stored secret cannot be decrypted with the configured key(s)."""


def generate_key() -> str:
    """A new random key for `STOCK_ENCRYPTION_KEY`."""
    return Fernet.generate_key().decode()


def _parse_key(text: str, position: int) -> bytes:
    try:
        raw = base64.urlsafe_b64decode(text.encode())
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ConfigurationError(
            f"{SETTING}: key {position} is not a Fernet key (44 characters of url-safe base64); "
            "create one with `whop-autocancel stock keygen`"
        )
    return text.encode()


class Sealer:
    """Encrypts and decrypts text with the configured key(s); never logs what it handles."""

    def __init__(self, keys: str) -> None:
        parts = keys.split()
        if not parts:
            raise ConfigurationError(f"{SETTING} is empty")
        parsed = [_parse_key(part, number) for number, part in enumerate(parts, start=1)]
        self._fernet = MultiFernet([Fernet(key) for key in parsed])
        self._fingerprint_keys = [
            hmac.new(base64.urlsafe_b64decode(key), _FINGERPRINT_CONTEXT, hashlib.sha256).digest()
            for key in parsed
        ]

    def __repr__(self) -> str:  # never show the keys
        return f"Sealer(keys={self.key_count})"

    @property
    def key_count(self) -> int:
        return len(self._fingerprint_keys)

    def seal(self, text: str) -> str:
        return self._fernet.encrypt(text.encode("utf-8")).decode("ascii")

    def open(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode("ascii")).decode("utf-8")
        except (InvalidToken, UnicodeError):
            raise SealError(
                f"a stored secret cannot be decrypted with {SETTING}: was the key changed? Put "
                "the old key after the new one (space-separated) so both decrypt"
            ) from None

    def fingerprint(self, text: str) -> str:
        """The fingerprint stored with a new item (under the first key)."""
        return self.fingerprints(text)[0]

    def fingerprints(self, text: str) -> list[str]:
        """The item's fingerprint under every configured key (to find duplicates stored
        before a key rotation)."""
        data = text.encode("utf-8")
        return [hmac.new(key, data, hashlib.sha256).hexdigest() for key in self._fingerprint_keys]
