"""`build_message`'s bytes, read back by the standard library's modern parser."""

from __future__ import annotations

from email import message_from_bytes, policy
from email.message import EmailMessage

import pytest

from whop_autocancel.mail.smtp import build_message

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


def test_the_date_is_set_and_the_message_id_only_depends_on_its_key() -> None:
    one = parse(build_message("shop@shop.test", "b@example.com", "S", "x", None, "k").data)
    two = parse(build_message("shop@shop.test", "b@example.com", "S", "y", "<p>y</p>", "k").data)
    assert one["Message-ID"] == two["Message-ID"] == "<k@shop.test>"
    assert one["Date"].datetime is not None
