"""`build_message`'s bytes, read back by the standard library's modern parser."""

from __future__ import annotations

from email import message_from_bytes, policy
from email.message import EmailMessage
from functools import partial

import pytest

from support.calls import python_calls
from whop_autocancel.mail.smtp import OutgoingMessage, build_message

SUBJECT = "Votre commande — café ☕"


def content(part: EmailMessage) -> str:
    """A text part's content with its line ends as Python writes them (SMTP's are CRLF)."""
    return str(part.get_content()).replace("\r\n", "\n")


def parse(data: bytes) -> EmailMessage:
    message = message_from_bytes(data, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


def test_a_display_name_and_subject_in_utf8_are_encoded_words() -> None:
    built = build_message(
        "Boutique Café <shop@shop.test>", "buyer@example.com", SUBJECT, "Bonjour", None, "m.1"
    )
    raw_headers = built.data.split(b"\r\n\r\n", 1)[0]
    assert raw_headers.isascii()  # RFC 2047: no raw 8-bit in headers
    message = parse(built.data)
    assert message["Subject"] == SUBJECT
    [sender] = message["From"].addresses
    assert (sender.display_name, sender.addr_spec) == ("Boutique Café", "shop@shop.test")
    assert built.sender == "shop@shop.test"
    assert built.recipients == ("buyer@example.com",)


def test_text_only_is_one_text_part() -> None:
    built = build_message("shop@shop.test", "buyer@example.com", "Hi", "Hello\n", None, "m.2")
    message = parse(built.data)
    assert message.get_content_type() == "text/plain"
    assert message.get_content_charset() == "utf-8"
    assert content(message) == "Hello\n"
    assert message["Message-ID"] == "<m.2@shop.test>"
    assert message["MIME-Version"] == "1.0"


@pytest.mark.parametrize(
    "text",
    [
        "plain ascii\n",
        "no newline at the end",
        "é" * 700 + "\n",  # one line over 998 bytes
        "x" * 1200 + "\n",  # ascii, but too long a line for 7bit
        ".\n..\nFrom here\n",  # lines SMTP and mbox treat specially
        "crlf\r\nand\rcr\n",
        "--boundary-like\n",
    ],
)
def test_any_text_and_html_come_back_as_they_went(text: str) -> None:
    html = f"<p>{text}</p>"
    built = build_message("shop@shop.test", "b@example.com", "S", text, html, "m.3")
    assert all(len(line) <= 998 for line in built.data.split(b"\r\n"))
    message = parse(built.data)
    assert message.get_content_type() == "multipart/alternative"
    plain, rich = message.iter_parts()
    normalised = text.replace("\r\n", "\n").replace("\r", "\n")
    if not normalised.endswith("\n"):
        normalised += "\n"  # a text part ends its last line, as `set_content` does
    assert content(plain) == normalised
    assert content(rich) == html.replace("\r\n", "\n").replace("\r", "\n") + "\n"


def test_a_long_subject_is_folded_and_read_back_whole() -> None:
    subject = "Commande " + " ".join(["café"] * 60)
    built = build_message("shop@shop.test", "b@example.com", subject, "x", None, "m.4")
    assert all(len(line) <= 998 for line in built.data.split(b"\r\n"))
    assert parse(built.data)["Subject"] == subject
    ascii_subject = "Order " + " ".join(["word"] * 80)
    built = build_message("shop@shop.test", "b@example.com", ascii_subject, "x", None, "m.5")
    assert parse(built.data)["Subject"] == ascii_subject


@pytest.mark.parametrize(
    "subject",
    [
        "Delivered: Test Pack to buyer-1@example.com (ord_ldfHx8DAdxaPzTwxmudrxyrS)",
        "Two  spaces,   three, and " + "w" * 70 + " then more words " * 5,
        " leading and trailing spaces " * 4,
    ],
)
def test_a_long_ascii_subject_is_folded_at_spaces_to_lines_of_78(subject: str) -> None:
    built = build_message("shop@shop.test", "b@example.com", subject, "x", None, "m.6")
    head = built.data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert all(len(line) <= 78 for line in head)
    assert all(line.strip() for line in head)  # (a line of white space would end the header)
    # (Read back whole, but for its leading spaces: a header's value starts at its first word.)
    assert parse(built.data)["Subject"] == subject.lstrip(" ")


def test_the_date_is_set_and_the_message_id_only_depends_on_its_key() -> None:
    one = parse(build_message("shop@shop.test", "b@example.com", "S", "x", None, "k").data)
    two = parse(build_message("shop@shop.test", "b@example.com", "S", "y", "<p>y</p>", "k").data)
    assert one["Message-ID"] == two["Message-ID"] == "<k@shop.test>"
    assert one["Date"].datetime is not None


def test_a_message_costs_tens_of_calls_not_thousands() -> None:
    """Two messages go out for each purchase (the customer's, the admin's). Built with the
    standard library's `email.mime` classes and written by its generator, the delivery
    email below took 3,142 calls, 1.2 ms of CPU of the ~20 ms a purchase's jobs took on the
    bench machine (`bench/purchase_cpu.py`)."""
    text = "Order ord_1 was delivered.\n\nPlan:  Test Pack (plan_1)\nAmount:  25.00 USD\n" * 3
    html = f"<!DOCTYPE html>\n<html><body><h2>Order ord_1</h2><pre>{text}</pre></body></html>\n"
    subject = "Delivered: Test Pack to buyer-1@example.com (ord_ldfHx8DAdxaPzTwxmudrxyrS)"

    def build(to: str) -> OutgoingMessage:
        return build_message("Shop <shop@shop.test>", to, subject, text, html, "m")

    build("buyer-1@example.com")  # (what a first call sets up once: the sender's address)
    assert python_calls(partial(build, "buyer-2@example.com")) <= 150
    message = parse(build("buyer-3@example.com").data)
    assert message["Subject"] == subject
    assert [content(part) for part in message.iter_parts()] == [text, html]


@pytest.mark.parametrize(
    ("to", "name", "address"),
    [
        ("buyer@example.com", "", "buyer@example.com"),
        ("first.last+tag@mail.example.co.uk", "", "first.last+tag@mail.example.co.uk"),
        ("o'neil@example.com", "", "o'neil@example.com"),
        ("Jane Doe <jane@example.com>", "Jane Doe", "jane@example.com"),
        ('"Doe, Jane" <jane@example.com>', "Doe, Jane", "jane@example.com"),
        ("Zoë <zoe@example.com>", "Zoë", "zoe@example.com"),
    ],
)
def test_the_recipient_is_read_back_as_given(to: str, name: str, address: str) -> None:
    built = build_message("shop@shop.test", to, "S", "x", None, "m.7")
    [recipient] = parse(built.data)["To"].addresses
    assert (recipient.display_name, recipient.addr_spec) == (name, address)
    assert built.recipients == (address,)
