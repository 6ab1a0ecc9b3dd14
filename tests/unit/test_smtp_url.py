"""`SMTP_URL` parsing (`parse_smtp_url`) and its password-free description."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from whop_autocancel.settings import SmtpConfig, parse_smtp_url

PASSWORD = "Zq9-SECRET-pw-71"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "smtp://mail.example.com:2525",
            SmtpConfig("mail.example.com", 2525, None, None, False, False),
        ),
        ("smtp://mail.example.com", SmtpConfig("mail.example.com", 25, None, None, False, False)),
        ("smtps://mail.example.com", SmtpConfig("mail.example.com", 465, None, None, True, False)),
        (
            "smtps://mail.example.com:2465",
            SmtpConfig("mail.example.com", 2465, None, None, True, False),
        ),
        (
            "smtp://mail.example.com:587?starttls=required",
            SmtpConfig("mail.example.com", 587, None, None, False, True),
        ),
        (
            "SMTP://Mail.Example.COM:25",
            SmtpConfig("mail.example.com", 25, None, None, False, False),
        ),
        ("smtp://127.0.0.1:1025", SmtpConfig("127.0.0.1", 1025, None, None, False, False)),
        ("smtp://[::1]:1025", SmtpConfig("::1", 1025, None, None, False, False)),
        (
            "smtp://shop@mail.example.com",
            SmtpConfig("mail.example.com", 25, "shop", None, False, False),
        ),
    ],
)
def test_parse(url: str, expected: SmtpConfig) -> None:
    assert parse_smtp_url(url) == expected


def test_user_and_password_with_percent_encoding() -> None:
    config = parse_smtp_url("smtps://us%40er%2Bx:p%40ss%3Aw%2F%25rd@mail.example.com")
    assert config.username == "us@er+x"
    assert config.password == "p@ss:w/%rd"
    assert config.host == "mail.example.com"
    assert config.port == 465


def test_plus_in_password_is_not_a_space() -> None:
    assert parse_smtp_url("smtp://u:a+b@h").password == "a+b"


def test_empty_password_is_none() -> None:
    config = parse_smtp_url("smtp://shop:@mail.example.com")
    assert config.username == "shop"
    assert config.password is None


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://mail.example.com", "smtp:// or smtps://"),
        ("smtp+tls://mail.example.com", "smtp:// or smtps://"),
        ("mail.example.com:25", "smtp:// or smtps://"),
        ("", "smtp:// or smtps://"),
        ("smtp://", "no host"),
        ("smtp://:25", "no host"),
        ("smtp://user:pw@", "no host"),
        ("smtp://mail.example.com:abc", "invalid port"),
        ("smtp://mail.example.com:99999", "invalid port"),
        ("smtp://mail.example.com?tls=1", "unknown options: tls"),
        ("smtp://mail.example.com?starttls=required&b=1&a=2", "unknown options: a, b"),
        ("smtp://mail.example.com?starttls=optional", "only starttls=required"),
        ("smtp://mail.example.com?starttls=required&starttls=no", "only starttls=required"),
        ("smtps://mail.example.com?starttls=required", "already TLS"),
    ],
)
def test_errors(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_smtp_url(url)


@pytest.mark.parametrize(
    ("url", "description"),
    [
        ("smtp://mail.example.com", "smtp://mail.example.com:25"),
        ("smtps://mail.example.com", "smtps://mail.example.com:465"),
        (
            f"smtp://shop:{PASSWORD}@mail.example.com:587?starttls=required",
            "smtp://shop:***@mail.example.com:587?starttls=required",
        ),
        (f"smtps://shop:{PASSWORD}@mail.example.com", "smtps://shop:***@mail.example.com:465"),
    ],
)
def test_describe(url: str, description: str) -> None:
    text = parse_smtp_url(url).describe()
    assert text == description
    assert PASSWORD not in text


def test_describe_round_trips_without_the_password() -> None:
    config = parse_smtp_url(f"smtp://shop:{PASSWORD}@mail.example.com:587?starttls=required")
    again = parse_smtp_url(config.describe())
    assert again == SmtpConfig("mail.example.com", 587, "shop", "***", False, True)


@settings(max_examples=100, deadline=None)
@given(
    username=st.text(min_size=1, max_size=12),
    secret=st.text(min_size=1, max_size=20),
    tls=st.booleans(),
)
def test_describe_never_contains_the_password(username: str, secret: str, tls: bool) -> None:
    password = f"PW<{secret}>PW"
    scheme = "smtps" if tls else "smtp"
    url = f"{scheme}://{quote(username, safe='')}:{quote(password, safe='')}@mail.example.com:2525"
    config = parse_smtp_url(url)
    assert config.username == username
    assert config.password == password
    assert "PW<" not in config.describe()
    assert ">PW" not in config.describe()


# ----- known bugs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "smtp://shop:pw@mail.example.com:587?starttls",
        "smtp://shop:pw@mail.example.com:587?starttls=",
        "smtp://shop:pw@mail.example.com:587?tls",
    ],
)
def test_option_without_value_is_an_error(url: str) -> None:
    with pytest.raises(ValueError, match=r"starttls|tls|option|value"):
        parse_smtp_url(url)


def test_port_zero_is_an_error() -> None:
    with pytest.raises(ValueError, match="port"):
        parse_smtp_url("smtp://mail.example.com:0")
