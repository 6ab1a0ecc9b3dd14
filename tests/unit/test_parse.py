"""Envelope and payload parsing, both shapes (DESIGN §5; WHOP.md §5.4, §5.5)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from whop_autocancel.whop.payloads import (
    Envelope,
    EventDataError,
    MembershipFacts,
    PayloadError,
    PaymentFacts,
    membership_facts,
    parse_envelope,
    payment_facts,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "whop"


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def fixture_data(name: str) -> dict[str, Any]:
    data = json.loads(fixture_bytes(name))["data"]
    assert isinstance(data, dict)
    return data


PAYMENT_FIXTURES = ["payment.succeeded.legacy.json", "payment.succeeded.pinned.json"]
CREATED_AT = datetime(2026, 11, 20, 14, 2, 58, 104000, tzinfo=UTC)
PAID_AT = datetime(2026, 11, 20, 14, 3, 9, 877000, tzinfo=UTC)


# ----- envelope -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "event_id", "event_type", "version"),
    [
        (
            "payment.succeeded.legacy.json",
            "msg_2ZtQ8kLm4xVb7NcR1pWs9YdE",
            "payment.succeeded",
            None,
        ),
        (
            "payment.succeeded.pinned.json",
            "msg_3AuS1eFg9cAh2ShW6uBx4DiJ",
            "payment.succeeded",
            "2026-09-29",
        ),
        (
            "membership.activated.legacy.json",
            "msg_2ZtQ9aBc5yWd8OdS2qXt0ZeF",
            "membership.activated",
            None,
        ),
        (
            "membership.deactivated.legacy.json",
            "msg_2ZtR3cDe7aYf0QfU4sZv2BgH",
            "membership.deactivated",
            None,
        ),
        (
            "membership.updated.pinned.canceled.json",
            "msg_3AuS4hIj2fDk5VkZ9xEa7GlM",
            "membership.updated",
            "2026-09-29",
        ),
    ],
)
def test_fixture_envelopes(name: str, event_id: str, event_type: str, version: str | None) -> None:
    envelope = parse_envelope(fixture_bytes(name))
    assert envelope.id == event_id
    assert envelope.type == event_type
    assert envelope.api_version_date == version
    assert isinstance(envelope.data, dict)
    assert envelope.data["id"].startswith(("pay_", "mem_"))


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "not JSON"),
        (b"not json", "not JSON"),
        (b'{"id": "msg_x", ', "not JSON"),
        (b"\xff\xfe\xfa", "not JSON"),
        (b"\x80abc", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'"msg_x"', "not a JSON object"),
        (b"null", "not a JSON object"),
        (b"42", "not a JSON object"),
        (b'{"type": "payment.succeeded", "data": {}}', "'id'"),
        (b'{"id": "", "type": "payment.succeeded", "data": {}}', "'id'"),
        (b'{"id": 7, "type": "payment.succeeded", "data": {}}', "'id'"),
        (b'{"id": "msg_x", "data": {}}', "'type'"),
        (b'{"id": "msg_x", "type": null, "data": {}}', "'type'"),
        (b'{"id": "msg_x", "type": "payment.succeeded"}', "'data'"),
        (b'{"id": "msg_x", "type": "payment.succeeded", "data": []}', "'data'"),
        (b'{"id": "msg_x", "type": "payment.succeeded", "data": "pay_x"}', "'data'"),
    ],
)
def test_parse_envelope_rejects(body: bytes, reason: str) -> None:
    with pytest.raises(PayloadError, match=reason):
        parse_envelope(body)


def test_unknown_type_and_empty_data_are_still_an_envelope() -> None:
    envelope = parse_envelope(b'{"id": "msg_x", "type": "something.new", "data": {}}')
    assert envelope == Envelope(id="msg_x", type="something.new", data={}, api_version_date=None)


@pytest.mark.parametrize(
    ("data", "object_id"),
    [
        ({"id": "pay_x"}, "pay_x"),
        ({"id": " mem_x\n"}, "mem_x"),  # stripped, as the facts read it
        ({}, None),
        ({"id": None}, None),
        ({"id": 7}, None),
        ({"id": "  "}, None),
        ({"id": {"id": "pay_x"}}, None),
    ],
)
def test_the_envelope_names_what_it_is_about(data: dict[str, Any], object_id: str | None) -> None:
    body = json.dumps({"id": "msg_x", "type": "payment.succeeded", "data": data}).encode()
    assert parse_envelope(body).object_id == object_id


def test_fixture_envelopes_are_about_their_payment_or_membership() -> None:
    assert parse_envelope(fixture_bytes("payment.succeeded.pinned.json")).object_id == (
        payment_facts(fixture_data("payment.succeeded.pinned.json")).payment_id
    )


def test_non_string_api_version_date_is_dropped() -> None:
    body = b'{"id": "m", "type": "t", "data": {}, "api_version_date": 20260929}'
    assert parse_envelope(body).api_version_date is None


def test_v2_era_envelope_without_id_and_type_is_a_payload_error() -> None:
    with pytest.raises(PayloadError):
        parse_envelope(b'{"action": "payment.succeeded", "data": {"id": "pay_x"}}')


def test_deeply_nested_json_is_a_payload_error() -> None:
    body = b'{"id": "m", "type": "t", "data": {"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"
    with pytest.raises(PayloadError):
        parse_envelope(body)


# ----- payment facts --------------------------------------------------------------------------


@pytest.mark.parametrize("name", PAYMENT_FIXTURES)
def test_payment_fixtures_give_the_same_facts(name: str) -> None:
    facts = payment_facts(fixture_data(name))
    assert facts.payment_id == "pay_9fKx2LqP7mWzR4"
    assert facts.status == "paid"
    assert facts.billing_reason == "one_time"
    assert facts.membership_id == "mem_Hc4Tq8Wn2ZkPa9"
    assert facts.plan_id == "plan_Bq2Wx9Zt4KmNr"
    assert facts.product_id == "prod_Gh5Jk8Lm2NpQs"
    assert facts.user_id == "user_Lm3Nq7Rt5VwXy"
    assert facts.email == "user@example.com"
    assert facts.checkout_configuration_id == "ch_Q7nV2xKp8LmTa1"
    assert facts.order_id == "ord_000123"
    assert facts.metadata == {"order_id": "ord_000123", "source": "web"}
    assert facts.amount == "25.00"
    assert facts.currency == "usd"
    assert facts.created_at == CREATED_AT
    assert facts.paid_at == PAID_AT
    assert facts.created_at is not None
    assert facts.created_at.utcoffset() == timedelta(0)


def test_legacy_and_pinned_payment_facts_are_equal() -> None:
    legacy, pinned = (payment_facts(fixture_data(name)) for name in PAYMENT_FIXTURES)
    assert legacy == pinned


def test_pinned_payment_with_null_membership_id() -> None:
    data = fixture_data("payment.succeeded.pinned.json")
    data["membership_id"] = None
    facts = payment_facts(data)
    assert facts.membership_id is None
    assert facts.payment_id == "pay_9fKx2LqP7mWzR4"
    assert facts.plan_id == "plan_Bq2Wx9Zt4KmNr"


def test_legacy_payment_with_null_membership() -> None:
    data = fixture_data("payment.succeeded.legacy.json")
    data["membership"] = None
    assert payment_facts(data).membership_id is None


@pytest.mark.parametrize(
    ("name", "field"),
    [
        ("payment.succeeded.legacy.json", ("user", "email")),
        ("payment.succeeded.pinned.json", ("customer_email",)),
    ],
)
def test_email_is_lower_cased_and_stripped(name: str, field: tuple[str, ...]) -> None:
    data = fixture_data(name)
    target = data
    for key in field[:-1]:
        target = target[key]
    target[field[-1]] = "  User@Example.COM "
    assert payment_facts(data).email == "user@example.com"


@pytest.mark.parametrize("value", [None, "", "   ", "not-an-email", 42])
def test_unusable_email_is_none(value: Any) -> None:
    data = fixture_data("payment.succeeded.pinned.json")
    data["customer_email"] = value
    assert payment_facts(data).email is None


def test_customer_email_wins_over_user_email() -> None:
    data = {"id": "pay_x", "customer_email": "a@x.io", "user": {"email": "b@y.io"}}
    assert payment_facts(data).email == "a@x.io"


def test_v2_era_bare_membership_string_is_the_id() -> None:
    assert payment_facts({"id": "pay_x", "membership": "mem_bare"}).membership_id == "mem_bare"


def test_minimal_payment() -> None:
    assert payment_facts({"id": " pay_x "}) == PaymentFacts(
        payment_id="pay_x",
        status=None,
        billing_reason=None,
        membership_id=None,
        plan_id=None,
        product_id=None,
        user_id=None,
        email=None,
        checkout_configuration_id=None,
        metadata={},
        amount=None,
        currency=None,
        created_at=None,
        paid_at=None,
    )


@pytest.mark.parametrize(
    ("total", "amount"),
    [
        (25.0, "25.00"),
        (23.48, "23.48"),
        (0.1, "0.10"),
        (25, "25.00"),
        ("25.00", "25.00"),
        ({"amount": "25.00", "currency": "usd"}, "25.00"),
        ({"amount": "1234567.5"}, "1234567.50"),
        (None, None),
        (True, None),
        ("abc", None),
        ({"amount": None}, None),
        ([25], None),
        (float("nan"), None),
        (float("inf"), None),
        ("Infinity", None),
    ],
)
def test_amount_as_exact_text(total: Any, amount: str | None) -> None:
    assert payment_facts({"id": "pay_x", "total": total}).amount == amount


@pytest.mark.parametrize(
    ("refunded", "amount"),
    [
        (0.0, None),  # legacy: nothing refunded
        (None, None),  # versioned: nothing refunded
        (25.0, "25.00"),  # legacy float
        (0.01, "0.01"),
        ({"amount": "5.00", "currency": "usd"}, "5.00"),  # versioned Money object
        ({"amount": "0.00", "currency": "usd"}, None),
        ("abc", None),
        (-1, None),
    ],
)
def test_refunded_amount_in_both_shapes(refunded: Any, amount: str | None) -> None:
    facts = payment_facts({"id": "pay_x", "refunded_amount": refunded})
    assert facts.refunded_amount == amount


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-11-20T14:02:58.104Z", CREATED_AT),
        ("2026-11-20T15:02:58.104+01:00", CREATED_AT),
        ("2026-11-20T14:02:58.104", CREATED_AT),
        (1795183378.104, CREATED_AT),
        (1795183391, datetime(2026, 11, 20, 14, 3, 11, tzinfo=UTC)),
        (None, None),
        ("", None),
    ],
)
def test_timestamps_become_aware_utc(value: Any, expected: datetime | None) -> None:
    facts = payment_facts({"id": "pay_x", "created_at": value, "paid_at": value})
    if expected is None:
        assert facts.created_at is None
        assert facts.paid_at is None
        return
    assert facts.created_at is not None
    assert abs(facts.created_at - expected) < timedelta(milliseconds=1)
    assert facts.created_at.utcoffset() == timedelta(0)
    assert facts.paid_at == facts.created_at


@pytest.mark.parametrize("field", ["created_at", "paid_at"])
@pytest.mark.parametrize(
    "value", ["yesterday", "2026-13-01", True, [1], {"at": 1}, float("nan"), 1e20, 10**30]
)
def test_unreadable_timestamp_is_event_data_error(field: str, value: Any) -> None:
    with pytest.raises(EventDataError, match="unreadable timestamp"):
        payment_facts({"id": "pay_x", field: value})


@pytest.mark.parametrize("value", [1e18, -(2**63)])
def test_out_of_range_numeric_timestamp_is_event_data_error(value: float) -> None:
    with pytest.raises(EventDataError):
        payment_facts({"id": "pay_x", "created_at": value})


@pytest.mark.parametrize("payment_id", [None, "", "   ", 123, {"id": "pay_x"}])
def test_payment_without_id_is_event_data_error(payment_id: Any) -> None:
    with pytest.raises(EventDataError, match="no id"):
        payment_facts({"id": payment_id, "plan_id": "plan_x"})


def test_payment_without_id_key_is_event_data_error() -> None:
    with pytest.raises(EventDataError):
        payment_facts({"plan_id": "plan_x"})


# ----- membership facts -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "status", "email"),
    [
        ("membership.activated.legacy.json", "completed", "user@example.com"),
        ("membership.deactivated.legacy.json", "canceled", "user@example.com"),
        ("membership.updated.pinned.canceled.json", "canceled", None),
    ],
)
def test_membership_fixtures(name: str, status: str, email: str | None) -> None:
    facts = membership_facts(fixture_data(name))
    assert facts == MembershipFacts(
        membership_id="mem_Hc4Tq8Wn2ZkPa9",
        status=status,
        plan_id="plan_Bq2Wx9Zt4KmNr",
        product_id="prod_Gh5Jk8Lm2NpQs",
        user_id="user_Lm3Nq7Rt5VwXy",
        email=email,
        checkout_configuration_id=(None if "pinned" in name else "ch_Q7nV2xKp8LmTa1"),
        metadata={"order_id": "ord_000123", "source": "web"},
    )
    assert facts.order_id == "ord_000123"


@pytest.mark.parametrize("membership_id", [None, "", 5])
def test_membership_without_id_is_event_data_error(membership_id: Any) -> None:
    with pytest.raises(EventDataError, match="no id"):
        membership_facts({"id": membership_id, "status": "canceled"})


def test_membership_metadata_not_an_object_is_empty() -> None:
    facts = membership_facts({"id": "mem_x", "metadata": ["order_id", "ord_1"]})
    assert facts.metadata == {}
    assert facts.order_id is None


def test_order_id_must_be_text() -> None:
    assert payment_facts({"id": "p", "metadata": {"order_id": 123}}).order_id is None
    assert payment_facts({"id": "p", "metadata": {"order_id": " ord_1 "}}).order_id == "ord_1"


# ----- properties -----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@example(body=b"\xef\xbb\xbf{}")
@example(body=b'{"id": "m", "type": "t", "data": {}}')
@example(body=b"NaN")
@given(body=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_arbitrary_bytes_give_an_envelope_or_payload_error(body: bytes) -> None:
    try:
        envelope = parse_envelope(body)
    except PayloadError:
        return
    assert isinstance(envelope, Envelope)
    assert envelope.id
    assert envelope.type
    assert isinstance(envelope.data, dict)


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=30),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=5,
)
# Numeric timestamps stay outside the range where datetime.fromtimestamp raises OSError: that
# case is pinned by test_out_of_range_numeric_timestamp_is_event_data_error above.
timestamp_values = st.one_of(
    st.none(),
    st.booleans(),
    st.text(max_size=30),
    st.lists(json_scalars, max_size=2),
    st.integers(-(10**16), 10**16),
    st.floats(-1e16, 1e16),
    st.floats(min_value=1e19),
    st.floats(max_value=-1e19),
    st.integers(min_value=10**19),
    st.integers(max_value=-(10**19)),
    st.sampled_from([float("nan"), "", "Z", "2026-02-30T00:00:00Z", "1795183391"]),
    st.datetimes().map(lambda moment: moment.isoformat()),
)
FIELDS = [
    "status",
    "billing_reason",
    "membership",
    "membership_id",
    "plan",
    "plan_id",
    "product",
    "product_id",
    "user",
    "user_id",
    "customer_email",
    "checkout_configuration_id",
    "metadata",
    "total",
    "currency",
]
payloads = st.tuples(
    st.dictionaries(st.sampled_from(["x", "data", "email", "amount"]), json_values, max_size=2),
    st.fixed_dictionaries(
        {},
        optional={
            "id": st.one_of(json_values, st.text(max_size=20)),
            "created_at": timestamp_values,
            "paid_at": timestamp_values,
            **{field: json_values for field in FIELDS},
        },
    ),
).map(lambda pair: {**pair[0], **pair[1]})


@settings(max_examples=80, deadline=None)
@given(data=payloads)
def test_arbitrary_data_gives_facts_or_event_data_error(data: dict[str, Any]) -> None:
    try:
        payment = payment_facts(data)
    except EventDataError:
        pass
    else:
        assert payment.payment_id == data["id"].strip()
        assert payment.email is None or (
            payment.email == payment.email.lower() and "@" in payment.email
        )
        for moment in (payment.created_at, payment.paid_at):
            assert moment is None or moment.utcoffset() == timedelta(0)
        assert isinstance(payment.metadata, dict)
    try:
        membership = membership_facts(data)
    except EventDataError:
        return
    assert membership.membership_id == data["id"].strip()
    assert (
        membership.order_id is None
        or membership.order_id == membership.metadata["order_id"].strip()
    )


@settings(max_examples=20, deadline=None)
@given(data=payloads)
def test_facts_survive_a_json_round_trip(data: dict[str, Any]) -> None:
    """What arrives over the wire is JSON text: parsing the envelope then the data agrees."""
    try:
        body = json.dumps({"id": "msg_x", "type": "payment.succeeded", "data": data}).encode()
    except ValueError:
        return
    envelope = parse_envelope(body)
    try:
        direct = payment_facts(data)
    except EventDataError:
        with pytest.raises(EventDataError):
            payment_facts(envelope.data)
        return
    assert payment_facts(envelope.data).payment_id == direct.payment_id
