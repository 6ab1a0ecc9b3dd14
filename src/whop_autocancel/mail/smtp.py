"""Sending one message over SMTP (smtplib), as `SMTP_URL` says."""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import formatdate
from typing import TypeVar

from whop_autocancel.errors import WhopAutocancelError
from whop_autocancel.settings import SmtpConfig

T = TypeVar("T")


class MailError(WhopAutocancelError):
    """The SMTP server could not be reached or refused the message (retried later)."""


def build_message(
    sender: str, to: str, subject: str, text: str, html: str | None, message_id: str
) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    message["Date"] = formatdate(localtime=False)
    domain = sender.rpartition("@")[2] or "localhost"
    # The same for every try of one outbox row, so a resend after a crash (at-least-once) is
    # recognisably the same message to mail servers and clients.
    message["Message-ID"] = f"<{message_id}@{domain}>"
    message.set_content(text)
    if html:
        message.add_alternative(html, subtype="html")
    return message


def _session(config: SmtpConfig, timeout: float, work: Callable[[smtplib.SMTP], T]) -> T:
    """Open a session as `SMTP_URL` says (TLS, STARTTLS, login), run `work`, quit. Every
    failure becomes a `MailError` that names the server but never the password."""
    try:
        client: smtplib.SMTP
        if config.implicit_tls:
            client = smtplib.SMTP_SSL(
                config.host, config.port, timeout=timeout, context=ssl.create_default_context()
            )
        else:
            client = smtplib.SMTP(config.host, config.port, timeout=timeout)
        with client:
            client.ehlo()
            if config.starttls:
                client.starttls(context=ssl.create_default_context())
            if config.username:
                client.login(config.username, config.password or "")
            return work(client)
    except (OSError, smtplib.SMTPException) as error:
        raise MailError(f"{type(error).__name__}: {error} ({config.describe()})") from None


def send_message(config: SmtpConfig, message: EmailMessage, timeout: float) -> None:
    """Deliver `message`; raise `MailError` on any failure."""
    _session(config, timeout, lambda client: client.send_message(message))


def check_connection(config: SmtpConfig, timeout: float) -> str:
    """Connect and log in as `send_message` would, then quit without sending (for `check`)."""

    def greeting(client: smtplib.SMTP) -> str:
        code, text = client.noop()
        return f"{code} {text.decode(errors='replace')}"

    return _session(config, timeout, greeting)
