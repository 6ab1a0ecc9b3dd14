"""What a Whop reply means for a cancellation (DESIGN §5, outcome classes)."""

from __future__ import annotations

import enum

from whop_autocancel.whop.client import WhopReply

INACTIVE_STATUSES = frozenset({"canceled", "expired"})


class Outcome(enum.StrEnum):
    SUCCESS = "success"  # 2xx: read the membership in the body
    RETRYABLE = "retryable"  # connection error, timeout, 408, 5xx: back off and try again
    THROTTLED = "throttled"  # 429: wait for Retry-After, no attempt used
    CONFLICT = "conflict"  # 409/422/400 (and other 4xx): re-read the membership to decide
    PERMANENT = "permanent"  # 404: the membership does not exist for this key
    CONFIGURATION = "configuration"  # 401/403: the API key is wrong or lacks a permission


def classify(reply: WhopReply) -> Outcome:
    status = reply.status
    if status is None or status == 408 or status >= 500:
        return Outcome.RETRYABLE
    if 200 <= status < 300:
        return Outcome.SUCCESS
    if status == 429:
        return Outcome.THROTTLED
    if status in (401, 403):
        return Outcome.CONFIGURATION
    if status == 404:
        return Outcome.PERMANENT
    return Outcome.CONFLICT


def may_have_acted(status: int | None) -> bool:
    """Whether a cancel call answered with this HTTP status (None: no answer) may have been
    carried out by Whop: yes for a 2xx, and for an answer that does not say (timeout,
    connection error, 408, 5xx); no for a refusal (any other 4xx, 429 included)."""
    if status is None or status == 408 or status >= 500:
        return True
    return 200 <= status < 300
