"""Standard Webhooks signature verification, on the raw body, with our own clock.

The `standardwebhooks` package computes the HMAC (`Webhook.sign`); we parse the headers and check
the timestamp ourselves because its `verify` reads the wall clock, lets one malformed signature
entry hide a later valid one, and raises assorted exceptions on malformed headers.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from standardwebhooks import Webhook

from whop_autocancel.errors import WhopAutocancelError


class SignatureError(WhopAutocancelError):
    """The request is not a genuine, fresh Whop webhook (answered 401)."""


@dataclass(frozen=True)
class VerifiedHeaders:
    webhook_id: str
    timestamp: datetime


def verify_signature(
    body: bytes,
    headers: Mapping[str, str],
    secrets: Sequence[bytes],
    now: datetime,
    tolerance_seconds: float,
) -> VerifiedHeaders:
    """Check `webhook-signature` against every configured secret; raise `SignatureError`."""
    if not secrets:
        raise SignatureError("no webhook secret is configured (WHOP_WEBHOOK_SECRET): refusing all")
    lowered = {key.lower(): value for key, value in headers.items()}
    webhook_id = lowered.get("webhook-id", "").strip()
    raw_timestamp = lowered.get("webhook-timestamp", "").strip()
    raw_signatures = lowered.get("webhook-signature", "").strip()
    if not (webhook_id and raw_timestamp and raw_signatures):
        raise SignatureError("missing webhook-id, webhook-timestamp or webhook-signature header")
    if len(webhook_id) > 255:
        raise SignatureError("webhook-id header is too long")
    # ASCII digits only ("²".isdigit() is true), and no more than Unix seconds can hold.
    if not (raw_timestamp.isascii() and raw_timestamp.isdigit()) or len(raw_timestamp) > 11:
        raise SignatureError("webhook-timestamp is not Unix seconds")
    try:
        timestamp = datetime.fromtimestamp(int(raw_timestamp), UTC)
    except (ValueError, OverflowError, OSError):
        raise SignatureError("webhook-timestamp is out of range") from None
    age = (now - timestamp).total_seconds()
    if age > tolerance_seconds:
        raise SignatureError("webhook-timestamp is too old (replay or clock skew)")
    if -age > tolerance_seconds:
        raise SignatureError("webhook-timestamp is in the future (clock skew)")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise SignatureError("body is not UTF-8") from None

    offered = _offered_signatures(raw_signatures)
    if not offered:
        raise SignatureError("webhook-signature has no well-formed v1 signature")
    for secret in secrets:
        expected = _expected_signature(secret, webhook_id, timestamp, text)
        if any(hmac.compare_digest(expected, candidate) for candidate in offered):
            return VerifiedHeaders(webhook_id=webhook_id, timestamp=timestamp)
    raise SignatureError("no signature matches the configured webhook secret(s)")


def _offered_signatures(header: str) -> list[bytes]:
    """Every well-formed `v1,<base64>` entry; malformed entries are skipped, not fatal."""
    signatures = []
    for entry in header.split():
        version, comma, encoded = entry.partition(",")
        if version != "v1" or not comma:
            continue
        try:
            signatures.append(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            continue
    return signatures


def _expected_signature(secret: bytes, webhook_id: str, timestamp: datetime, text: str) -> bytes:
    # bytes, not str: the library base64-decodes a str secret, and Whop's key is the raw bytes.
    signed = Webhook(secret).sign(msg_id=webhook_id, timestamp=timestamp, data=text)
    return base64.b64decode(signed.partition(",")[2])


def sign(body: bytes, webhook_id: str, timestamp: datetime, secret: bytes) -> dict[str, str]:
    """The headers Whop would send with `body` (used by tests and the demo's tools)."""
    signature = Webhook(secret).sign(msg_id=webhook_id, timestamp=timestamp, data=body.decode())
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
    }
