"""Webhook signature verification (DESIGN §5 ingest, §7 pitfalls; WHOP.md §5.1)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from whop_autocancel.webhooks.verify import SignatureError, VerifiedHeaders, sign, verify_signature

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "whop"
VECTOR: dict[str, Any] = json.loads(
    (FIXTURES / "signature-vector.payment.succeeded.legacy.json").read_bytes()
)
BODY = (FIXTURES / VECTOR["body_file"]).read_bytes()
SECRET = VECTOR["secret"].encode()
HEADERS: dict[str, str] = dict(VECTOR["headers"])
TIMESTAMP = int(HEADERS["webhook-timestamp"])
SIGNED_AT = datetime.fromtimestamp(TIMESTAMP, UTC)
TOLERANCE = 300.0
WRONG_SECRET = b"ws_this_is_not_the_secret_0000000000000000000000"


def verify(
    body: bytes = BODY,
    headers: dict[str, str] | None = None,
    secrets: list[bytes] | None = None,
    now: datetime = SIGNED_AT,
    tolerance: float = TOLERANCE,
) -> VerifiedHeaders:
    return verify_signature(
        body,
        HEADERS if headers is None else headers,
        [SECRET] if secrets is None else secrets,
        now,
        tolerance,
    )


def with_header(name: str, value: str) -> dict[str, str]:
    headers = dict(HEADERS)
    headers[name] = value
    return headers


def raw_hmac(secret: bytes, webhook_id: str, timestamp: str, body: bytes) -> str:
    """The Standard Webhooks signature computed by hand over raw bytes (no decoding)."""
    digest = hmac.new(secret, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


# ----- the fixture vector ---------------------------------------------------------------------


def test_fixture_body_is_byte_exact() -> None:
    assert hashlib.sha256(BODY).hexdigest() == VECTOR["body_sha256"]


def test_fixture_vector_verifies_with_clock_frozen_at_its_timestamp() -> None:
    verified = verify()
    assert verified == VerifiedHeaders(
        webhook_id="msg_2ZtQ8kLm4xVb7NcR1pWs9YdE", timestamp=SIGNED_AT
    )
    assert verified.timestamp.tzinfo is not None
    assert verified.timestamp.utcoffset() == timedelta(0)


def test_hand_computed_hmac_matches_the_vector() -> None:
    """The key is the raw bytes of the whole ws_… secret (not base64-decoded)."""
    expected = raw_hmac(SECRET, HEADERS["webhook-id"], HEADERS["webhook-timestamp"], BODY)
    assert expected == HEADERS["webhook-signature"]


def test_sign_reproduces_the_vector_headers() -> None:
    headers = sign(BODY, HEADERS["webhook-id"], SIGNED_AT, SECRET)
    assert headers == {
        "webhook-id": HEADERS["webhook-id"],
        "webhook-timestamp": HEADERS["webhook-timestamp"],
        "webhook-signature": HEADERS["webhook-signature"],
        "content-type": "application/json",
    }


def test_sign_then_verify_round_trip() -> None:
    moment = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    body = b'{"id":"msg_x","type":"payment.succeeded","data":{}}'
    headers = sign(body, "msg_round_trip", moment, b"ws_round")
    verified = verify_signature(body, headers, [b"ws_round"], moment, TOLERANCE)
    assert verified == VerifiedHeaders(webhook_id="msg_round_trip", timestamp=moment)


# ----- what is signed -------------------------------------------------------------------------


def test_reserialised_json_is_rejected() -> None:
    reserialised = json.dumps(json.loads(BODY)).encode()
    assert reserialised != BODY
    assert json.loads(reserialised) == json.loads(BODY)
    with pytest.raises(SignatureError):
        verify(body=reserialised)


def test_one_changed_byte_is_rejected() -> None:
    tampered = BODY.replace(b'"total": 25.0', b'"total": 26.0')
    assert tampered != BODY
    with pytest.raises(SignatureError):
        verify(body=tampered)


def test_trailing_newline_removed_is_rejected() -> None:
    assert BODY.endswith(b"\n")
    with pytest.raises(SignatureError):
        verify(body=BODY.rstrip(b"\n"))


def test_webhook_id_is_part_of_the_signed_content() -> None:
    with pytest.raises(SignatureError):
        verify(headers=with_header("webhook-id", "msg_someone_else"))


def test_timestamp_is_part_of_the_signed_content() -> None:
    with pytest.raises(SignatureError):
        verify(headers=with_header("webhook-timestamp", str(TIMESTAMP + 1)))


def test_wrong_secret_is_rejected() -> None:
    with pytest.raises(SignatureError, match="no signature matches"):
        verify(secrets=[WRONG_SECRET])


def test_secret_given_as_its_base64_decoding_is_rejected() -> None:
    """Whop's key is the raw secret string; decoding it (the library's str behaviour) is wrong."""
    decoded = base64.b64decode(VECTOR["secret"].removeprefix("ws_"))
    assert decoded != SECRET
    with pytest.raises(SignatureError):
        verify(secrets=[decoded])


# ----- rotation and fail-closed ---------------------------------------------------------------


@pytest.mark.parametrize(
    "secrets",
    [[WRONG_SECRET, SECRET], [SECRET, WRONG_SECRET], [WRONG_SECRET, b"ws_other", SECRET]],
    ids=["wrong-then-right", "right-then-wrong", "right-last-of-three"],
)
def test_rotation_any_configured_secret_verifies(secrets: list[bytes]) -> None:
    assert verify(secrets=secrets).webhook_id == HEADERS["webhook-id"]


def test_no_secret_fails_closed() -> None:
    with pytest.raises(SignatureError, match="no webhook secret"):
        verify(secrets=[])


def test_no_secret_fails_closed_even_without_headers() -> None:
    with pytest.raises(SignatureError, match="no webhook secret"):
        verify(headers={}, secrets=[])


# ----- timestamp window -----------------------------------------------------------------------


def test_stale_timestamp_is_rejected() -> None:
    now = SIGNED_AT + timedelta(seconds=TOLERANCE + 1)
    with pytest.raises(SignatureError, match="too old"):
        verify(now=now)


def test_future_timestamp_is_rejected() -> None:
    now = SIGNED_AT - timedelta(seconds=TOLERANCE + 1)
    with pytest.raises(SignatureError, match="future"):
        verify(now=now)


@pytest.mark.parametrize("offset", [-TOLERANCE, TOLERANCE, 0.0, 1.0, -1.0])
def test_timestamp_at_the_tolerance_boundary_is_accepted(offset: float) -> None:
    verified = verify(now=SIGNED_AT + timedelta(seconds=offset))
    assert verified.timestamp == SIGNED_AT


def test_tolerance_is_a_parameter_not_the_wall_clock() -> None:
    """A one-day tolerance accepts a day-old event; the library's own check would not."""
    now = SIGNED_AT + timedelta(days=1)
    assert verify(now=now, tolerance=86400).webhook_id == HEADERS["webhook-id"]
    with pytest.raises(SignatureError):
        verify(now=now, tolerance=86399)


# ----- malformed headers ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_missing_header_is_rejected(name: str) -> None:
    headers = dict(HEADERS)
    del headers[name]
    with pytest.raises(SignatureError, match="missing"):
        verify(headers=headers)


@pytest.mark.parametrize("name", ["webhook-id", "webhook-timestamp", "webhook-signature"])
@pytest.mark.parametrize("value", ["", "   "])
def test_blank_header_is_rejected(name: str, value: str) -> None:
    with pytest.raises(SignatureError, match="missing"):
        verify(headers=with_header(name, value))


def test_no_headers_at_all_is_rejected() -> None:
    with pytest.raises(SignatureError):
        verify(headers={})


@pytest.mark.parametrize(
    "timestamp",
    [
        "abc",
        "-5",
        "+1795183391",
        "1795183391.0",
        "1.795e9",
        "0x6AFF",
        "1795 183391",
        "1234567890123",
    ],
)
def test_non_digit_timestamp_is_rejected(timestamp: str) -> None:
    with pytest.raises(SignatureError, match="Unix seconds"):
        verify(headers=with_header("webhook-timestamp", timestamp), tolerance=1e12)


def test_overlong_webhook_id_is_rejected() -> None:
    with pytest.raises(SignatureError, match="too long"):
        verify(headers=with_header("webhook-id", "msg_" + "x" * 300))


@pytest.mark.parametrize(
    "malformed",
    ["v1,%%%notbase64", "v2,abc", "garbage", "v1,", "v1", ",abc", "v1,YWJj"],
)
def test_malformed_first_signature_entry_does_not_hide_a_valid_one(malformed: str) -> None:
    header = f"{malformed} {HEADERS['webhook-signature']}"
    assert (
        verify(headers=with_header("webhook-signature", header)).webhook_id == HEADERS["webhook-id"]
    )


def test_valid_signature_followed_by_malformed_entries_verifies() -> None:
    header = f"{HEADERS['webhook-signature']} v1,%%% garbage v2,abc"
    assert verify(headers=with_header("webhook-signature", header)).timestamp == SIGNED_AT


@pytest.mark.parametrize("header", ["v1,%%%notbase64", "v2,abc garbage", "v1"])
def test_only_malformed_signatures_are_rejected(header: str) -> None:
    with pytest.raises(SignatureError, match="no well-formed"):
        verify(headers=with_header("webhook-signature", header))


def test_v2_entry_carrying_the_right_digest_is_not_accepted() -> None:
    """Only `v1,` entries count, whatever bytes follow another version tag."""
    digest = HEADERS["webhook-signature"].partition(",")[2]
    with pytest.raises(SignatureError):
        verify(headers=with_header("webhook-signature", f"v2,{digest}"))


def test_body_that_is_not_utf8_is_a_signature_error() -> None:
    body = b'{"id": "msg_x", "note": "\xff\xfe not utf-8"}'
    headers = {
        "webhook-id": "msg_x",
        "webhook-timestamp": str(TIMESTAMP),
        "webhook-signature": raw_hmac(SECRET, "msg_x", str(TIMESTAMP), body),
    }
    with pytest.raises(SignatureError, match="UTF-8"):
        verify(body=body, headers=headers)


@pytest.mark.parametrize(
    "transform",
    [str.upper, str.title, lambda name: name.replace("webhook", "WebHook")],
    ids=["upper", "title", "mixed"],
)
def test_header_names_in_any_case(transform: Any) -> None:
    headers = {transform(name): value for name, value in HEADERS.items()}
    assert "webhook-id" not in headers
    assert verify(headers=headers).webhook_id == HEADERS["webhook-id"]


def test_header_values_are_stripped() -> None:
    headers = {name: f"  {value} " for name, value in HEADERS.items()}
    assert verify(headers=headers).webhook_id == HEADERS["webhook-id"]


# ----- known bugs -----------------------------------------------------------------------------


def test_unicode_digit_timestamp_is_a_signature_error() -> None:
    with pytest.raises(SignatureError):
        verify(headers=with_header("webhook-timestamp", "²"))


def test_timestamp_beyond_year_9999_is_a_signature_error() -> None:
    with pytest.raises(SignatureError):
        verify(headers=with_header("webhook-timestamp", "999999999999"))


# ----- property: nothing but SignatureError ---------------------------------------------------

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
NOW_TS = int(NOW.timestamp())

near_now = st.integers(NOW_TS - 400, NOW_TS + 400).map(str)
any_digits = st.text(alphabet="0123456789", min_size=1, max_size=14)
signature_entries = st.one_of(
    st.binary(min_size=0, max_size=40).map(lambda raw: "v1," + base64.b64encode(raw).decode()),
    st.text(max_size=20).map(lambda text: "v1," + text),
    st.sampled_from(["v1,%%%notbase64", "v2,abc", "garbage", "v1,", ","]),
    st.text(max_size=20),
)
signature_headers = st.one_of(st.text(), st.lists(signature_entries, max_size=4).map(" ".join))
HEADER_NAMES = st.sampled_from(
    ["webhook-id", "Webhook-Id", "webhook-timestamp", "WEBHOOK-TIMESTAMP", "webhook-signature"]
)


def _header_maps(timestamps: st.SearchStrategy[str]) -> st.SearchStrategy[dict[str, str]]:
    known = st.fixed_dictionaries(
        {},
        optional={
            "webhook-id": st.one_of(st.text(max_size=300), st.just("msg_x")),
            "webhook-timestamp": timestamps,
            "webhook-signature": signature_headers,
        },
    )
    extra = st.dictionaries(st.one_of(HEADER_NAMES, st.text(max_size=20)), st.text(), max_size=3)
    return st.tuples(extra, known).map(lambda pair: {**pair[0], **pair[1]})


all_timestamps = st.one_of(st.text(), near_now, any_digits)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    body=st.binary(max_size=64),
    headers=_header_maps(all_timestamps),
    secrets=st.lists(st.binary(min_size=1, max_size=20), max_size=3),
)
def test_arbitrary_headers_raise_only_signature_error(
    body: bytes, headers: dict[str, str], secrets: list[bytes]
) -> None:
    try:
        verified = verify_signature(body, headers, secrets, NOW, TOLERANCE)
    except SignatureError:
        return
    # Accepting is possible only if some configured secret really signed it.
    expected = {
        raw_hmac(secret, verified.webhook_id, str(int(verified.timestamp.timestamp())), body)
        for secret in secrets
    }
    offered = {
        "v1," + base64.b64encode(base64.b64decode(entry.partition(",")[2])).decode()
        for value in headers.values()
        for entry in value.split()
        if entry.startswith("v1,") and _decodes_base64(entry.partition(",")[2])
    }
    assert expected & offered


@settings(max_examples=100, deadline=None)
@example(
    body=b"{}",
    headers={"webhook-id": "msg_x", "webhook-timestamp": "²", "webhook-signature": "v1,AAAA"},
)
@example(
    body=b"{}",
    headers={
        "webhook-id": "msg_x",
        "webhook-timestamp": "999999999999",
        "webhook-signature": "v1,AAAA",
    },
)
@given(body=st.binary(max_size=32), headers=_header_maps(all_timestamps))
def test_arbitrary_headers_unrestricted_raise_only_signature_error(
    body: bytes, headers: dict[str, str]
) -> None:
    with contextlib.suppress(SignatureError):
        verify_signature(body, headers, [SECRET], NOW, TOLERANCE)


@settings(max_examples=100, deadline=None)
@given(
    body=st.text(max_size=64).map(str.encode),
    webhook_id=st.text(min_size=1, max_size=60).filter(lambda text: text == text.strip() != ""),
    offset=st.integers(-int(TOLERANCE), int(TOLERANCE)),
)
def test_signed_utf8_bodies_always_verify(body: bytes, webhook_id: str, offset: int) -> None:
    moment = NOW + timedelta(seconds=offset)
    headers = sign(body, webhook_id, moment, b"ws_prop")
    verified = verify_signature(body, headers, [b"ws_other", b"ws_prop"], NOW, TOLERANCE)
    assert verified.webhook_id == webhook_id
    assert verified.timestamp == moment


def _decodes_base64(text: str) -> bool:
    try:
        base64.b64decode(text, validate=True)
    except ValueError:
        return False
    return True
