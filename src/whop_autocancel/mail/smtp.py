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


class MailRejected(MailError):
    """The SMTP server rejected this message for good (a 5xx answer to its recipient or its
    content): sending the same message again cannot succeed."""


def _answer(code: int, text: bytes | str) -> str:
    reply = text.decode(errors="replace") if isinstance(text, bytes) else text
    return f"{code} {reply}".strip()


def _rejection(error: smtplib.SMTPException) -> str | None:
    """The server's answer when `error` rejects this message permanently, else None.

    Permanent: a 5xx to RCPT (every recipient refused, e.g. `550 User unknown`) or to DATA (the
    content refused). Not permanent, whatever the code: the connection, HELO, STARTTLS, the
    login and the sender (MAIL FROM) — those are the server's or our settings, fixed by the
    admin, after which the same message goes through."""
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        replies = list(error.recipients.values())  # (code, reply) per address
        if replies and all(code >= 500 for code, _ in replies):
            return "; ".join(_answer(code, text) for code, text in replies)
        return None
    if isinstance(error, smtplib.SMTPDataError) and error.smtp_code >= 500:
        return _answer(error.smtp_code, error.smtp_error)
    return None


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
    except smtplib.SMTPException as error:
        rejected = _rejection(error)
        if rejected is not None:
            raise MailRejected(f"{rejected} ({config.describe()})") from None
        raise MailError(f"{type(error).__name__}: {error} ({config.describe()})") from None
    except OSError as error:
        raise MailError(f"{type(error).__name__}: {error} ({config.describe()})") from None


def send_message(config: SmtpConfig, message: EmailMessage, timeout: float) -> None:
    """Deliver `message`; raise `MailRejected` when the server rejects it for good (5xx to the
    recipient or the content), `MailError` on any other failure (retried)."""
    _session(config, timeout, lambda client: client.send_message(message))


def check_connection(config: SmtpConfig, timeout: float) -> str:
    """Connect and log in as `send_message` would, then quit without sending (for `check`)."""

    def greeting(client: smtplib.SMTP) -> str:
        code, text = client.noop()
        return f"{code} {text.decode(errors='replace')}"

    return _session(config, timeout, greeting)
