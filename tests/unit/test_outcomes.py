"""What a Whop reply means for a cancellation (DESIGN §5 outcome classes; WHOP.md §3, §7)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from whop_autocancel.whop.client import WhopReply
from whop_autocancel.whop.outcomes import INACTIVE_STATUSES, Outcome, classify, may_have_acted

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "whop"


def test_transport_error_is_retryable() -> None:
    assert classify(WhopReply(status=None, transport_error="timeout (ReadTimeout)")) == (
        Outcome.RETRYABLE
    )


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.SUCCESS),
        (201, Outcome.SUCCESS),
        (204, Outcome.SUCCESS),
        (299, Outcome.SUCCESS),
        (408, Outcome.RETRYABLE),
        (500, Outcome.RETRYABLE),
        (502, Outcome.RETRYABLE),
        (503, Outcome.RETRYABLE),
        (504, Outcome.RETRYABLE),
        (599, Outcome.RETRYABLE),
        (429, Outcome.THROTTLED),
        (401, Outcome.CONFIGURATION),
        (403, Outcome.CONFIGURATION),
        (404, Outcome.PERMANENT),
        (400, Outcome.CONFLICT),
        (409, Outcome.CONFLICT),
        (422, Outcome.CONFLICT),
    ],
)
def test_classify_by_status(status: int, outcome: Outcome) -> None:
    assert classify(WhopReply(status=status)) == outcome


def test_every_2xx_is_success_and_every_5xx_retryable() -> None:
    assert {classify(WhopReply(status=status)) for status in range(200, 300)} == {Outcome.SUCCESS}
    assert {classify(WhopReply(status=status)) for status in range(500, 600)} == {Outcome.RETRYABLE}


def test_other_4xx_are_conflicts() -> None:
    """Anything unexpected costs a read-back of the membership, never a silent success."""
    others = set(range(400, 500)) - {401, 403, 404, 408, 429}
    assert {classify(WhopReply(status=status)) for status in others} == {Outcome.CONFLICT}


def test_classification_ignores_the_body() -> None:
    body = {"error": {"type": "rate_limited", "message": "slow down"}}
    assert classify(WhopReply(status=409, body=body)) == Outcome.CONFLICT
    assert classify(WhopReply(status=200, body=body)) == Outcome.SUCCESS


def test_inactive_statuses() -> None:
    assert frozenset({"canceled", "expired"}) == INACTIVE_STATUSES
    assert "completed" not in INACTIVE_STATUSES


# ----- WhopReply ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "text"),
    [
        (
            WhopReply(
                status=422,
                body={"error": {"type": "invalid_request_error", "message": "Already canceled"}},
            ),
            "HTTP 422: Already canceled",
        ),
        (
            WhopReply(status=403, body={"error": {"type": "unauthorized"}}),
            "HTTP 403: unauthorized",
        ),
        (
            WhopReply(status=400, body={"error": {"type": "bad", "message": ""}}),
            "HTTP 400: bad",
        ),
        (WhopReply(status=404, body={"message": "Not found"}), "HTTP 404: Not found"),
        (WhopReply(status=500, body=None), "HTTP 500"),
        (WhopReply(status=502, body="<html>Bad gateway</html>"), "HTTP 502"),
        (WhopReply(status=409, body={"error": "conflict"}), "HTTP 409"),
        (WhopReply(status=429, body=[1, 2]), "HTTP 429"),
        (WhopReply(status=200, body={"id": "mem_x", "status": "canceled"}), "HTTP 200"),
        (
            WhopReply(status=None, transport_error="timeout (ConnectTimeout)"),
            "no answer from Whop (timeout (ConnectTimeout))",
        ),
    ],
)
def test_describe(reply: WhopReply, text: str) -> None:
    assert reply.describe() == text


def test_describe_does_not_dump_the_membership() -> None:
    reply = WhopReply(status=200, body={"id": "mem_x", "user": {"email": "buyer@example.com"}})
    assert "buyer@example.com" not in reply.describe()


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"id": "mem_x", "status": "canceled"}, "canceled"),
        ({"id": "mem_x", "status": "completed"}, "completed"),
        ({"id": "mem_x", "status": None}, None),
        ({"id": "mem_x", "status": 3}, None),
        ({"id": "mem_x"}, None),
        ({"error": {"type": "not_found"}}, None),
        (None, None),
        ([{"status": "canceled"}], None),
        ("canceled", None),
    ],
)
def test_membership_status(body: Any, status: str | None) -> None:
    assert WhopReply(status=200, body=body).membership_status == status


@pytest.mark.parametrize(
    ("body", "membership_id"),
    [
        ({"id": "mem_x", "status": "canceled"}, "mem_x"),
        ({"id": "", "status": "canceled"}, None),
        ({"id": 7, "status": "canceled"}, None),
        ({"status": "canceled"}, None),
        ({"error": {"type": "not_found"}}, None),
        (None, None),
        ([{"id": "mem_x"}], None),
        ("mem_x", None),
    ],
)
def test_membership_id(body: Any, membership_id: str | None) -> None:
    assert WhopReply(status=200, body=body).membership_id == membership_id


@pytest.mark.parametrize(
    "fixture", ["membership.deactivated.legacy.json", "membership.updated.pinned.canceled.json"]
)
def test_membership_id_of_both_shapes(fixture: str) -> None:
    """The legacy and the versioned membership object both name the membership at the top."""
    data = json.loads((FIXTURES / fixture).read_text())["data"]
    reply = WhopReply(status=200, body=data)
    assert reply.membership_id == data["id"]
    assert reply.membership_id.startswith("mem_")
    assert reply.membership_status == "canceled"


@pytest.mark.parametrize(
    ("status", "ok"), [(None, False), (199, False), (200, True), (299, True), (300, False)]
)
def test_ok(status: int | None, ok: bool) -> None:
    assert WhopReply(status=status).ok is ok


@pytest.mark.parametrize(
    ("status", "acted"),
    [
        (None, True),  # timeout or connection error: nobody knows
        (200, True),
        (204, True),
        (408, True),
        (500, True),
        (503, True),
        (504, True),
        (400, False),
        (401, False),
        (403, False),
        (404, False),
        (409, False),
        (422, False),
        (429, False),
    ],
)
def test_may_have_acted(status: int | None, acted: bool) -> None:
    """Only a refusal proves that a cancel call of ours did nothing."""
    assert may_have_acted(status) is acted
