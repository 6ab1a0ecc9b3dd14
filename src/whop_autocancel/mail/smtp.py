"""Sending messages over SMTP (smtplib), as `SMTP_URL` says, on connections kept open between
messages (`SmtpPool`)."""

from __future__ import annotations

import base64
import re
import secrets
import smtplib
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.header import Header
from email.policy import compat32
from email.utils import formataddr, formatdate, parseaddr
from functools import lru_cache
from typing import TypeVar, cast

from whop_autocancel.errors import WhopAutocancelError
from whop_autocancel.settings import SmtpConfig

T = TypeVar("T")

# A connection left unused this long is closed rather than reused: servers drop idle clients
# (often after a minute or more), and an idle worker should not hold one open.
SMTP_IDLE_SECONDS = 30.0
# How long a polite QUIT may take when a kept connection is closed (idle, or on shutdown).
_QUIT_TIMEOUT = 2.0
_NEWLINES = re.compile(r"\r\n|\r|\n")
# A bare address of the usual kind (RFC 5322's dot-atoms, ASCII): its header is itself.
_BARE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+")
_WIRE = compat32.clone(linesep="\r\n")  # what SMTP sends: CRLF line ends


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


def _mail_error(error: smtplib.SMTPException | OSError, config: SmtpConfig) -> MailError:
    """`MailRejected` for a permanent rejection, else `MailError`; naming the server, never
    the password."""
    if isinstance(error, smtplib.SMTPException):
        rejected = _rejection(error)
        if rejected is not None:
            return MailRejected(f"{rejected} ({config.describe()})")
    return MailError(f"{type(error).__name__}: {error} ({config.describe()})")


@dataclass(frozen=True)
class OutgoingMessage:
    """A message ready for SMTP: its envelope and its bytes (CRLF line ends)."""

    sender: str  # MAIL FROM
    recipients: tuple[str, ...]  # RCPT TO
    data: bytes

    @property
    def international(self) -> bool:
        """An address that is not ASCII: needs the server's SMTPUTF8."""
        return not (self.sender.isascii() and all(r.isascii() for r in self.recipients))


def _one_line(value: str) -> str:
    return " ".join(value.splitlines())  # no header injection, whatever the text


@lru_cache(maxsize=1024)
def _address(address: str) -> tuple[str, str]:
    """(the header's value, the bare address) of `Name <addr>` or `addr`; a display name
    outside ASCII as an RFC 2047 word. An address itself outside ASCII stays raw UTF-8 (it is
    sent with SMTPUTF8). Kept for the next message: the sender and the admin are in most."""
    address = _one_line(address)
    if _BARE.fullmatch(address):  # (most of them: what parsing would give back)
        return address, address
    display, addr = parseaddr(address)
    addr = addr or address
    if not addr.isascii():
        return (formataddr((display, addr)) if display else addr), addr
    return formataddr((display, addr), charset="utf-8"), addr


def _lines(content: str) -> str:
    """`content` with CRLF line ends (the canonical form of text, RFC 2045), its last line
    ended."""
    lines = _NEWLINES.split(content)
    if lines[-1] == "":
        lines.pop()
    return "\r\n".join(lines) + "\r\n"


# The longest header line a message should have (RFC 5322 2.1.1; 998 is the limit).
_LINE = 78


def _header(name: str, value: str | Header) -> bytes:
    """One header line (or more, folded) as SMTP sends it. ASCII folded here, at spaces, so
    that no line is longer than 78 characters where a space allows it; a value not in ASCII
    (a `Header`, RFC 2047 words) or with a word too long to fit a line encoded and folded by
    the standard library's compat32 policy, as its generator would."""
    if isinstance(value, Header) or not value.isascii():
        # (compat32 folds a `Header` by its own rules: the type stubs only know a str.)
        return _WIRE.fold_binary(name, cast(str, value))
    line = f"{name}:"
    if len(line) + 1 + len(value) <= _LINE:
        return f"{line} {value}\r\n".encode("ascii")
    words = value.split(" ")
    if max(map(len, words)) > _LINE - 2:
        return _WIRE.fold_binary(name, value)
    lines: list[str] = []
    filled = False  # the line holds a word: a line of nothing but spaces would end the header
    for word in words:
        if filled and word and len(line) + 1 + len(word) > _LINE:
            lines.append(line)
            line, filled = "", False
        line += " " + word
        filled = filled or word != ""
    lines.append(line)
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def _base64(content: str) -> bytes:
    """A text's body: UTF-8 in base64, 76 characters a line."""
    return base64.encodebytes(_lines(content).encode("utf-8")).replace(b"\n", b"\r\n")


_TEXT_HEADERS = (
    'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: base64\r\n'
)


def build_message(
    sender: str, to: str, subject: str, text: str, html: str | None, message_id: str
) -> OutgoingMessage:
    """An RFC 5322 message from `sender` to `to`: the text, and the HTML as its alternative
    when there is one; UTF-8 throughout, each text in base64.

    Written here rather than by the standard library's `email.mime` classes and generator,
    which took about 3,000 function calls a message (a millisecond of CPU; two messages go out
    for each purchase): the shape is fixed, and what needs care, encoding and folding the
    headers, is still the standard library's (`_header`). The boundary cannot occur in a
    part: base64 has no `_`, and none of its lines starts with `--`."""
    from_header, envelope_from = _address(sender)
    to_header, recipient = _address(to)
    subject = _one_line(subject)
    domain = envelope_from.rpartition("@")[2] or "localhost"
    headers = [
        _header("From", from_header),
        _header("To", to_header),
        _header("Subject", subject if subject.isascii() else Header(subject, "utf-8")),
        _header("Date", formatdate(localtime=False)),
        # The same for every try of one outbox row, so a resend after a crash (at-least-once)
        # is recognisably the same message to mail servers and clients.
        _header("Message-ID", f"<{message_id}@{domain}>"),
        b"MIME-Version: 1.0\r\n",
    ]
    if html:
        boundary = f"=_{secrets.token_hex(16)}"
        headers.append(_header("Content-Type", f'multipart/alternative; boundary="{boundary}"'))
        plain = _TEXT_HEADERS.format(subtype="plain").encode("ascii")
        rich = _TEXT_HEADERS.format(subtype="html").encode("ascii")
        delimiter = f"\r\n--{boundary}\r\n".encode("ascii")
        ending = f"\r\n--{boundary}--\r\n".encode("ascii")
        parts = [delimiter, plain, b"\r\n", _base64(text), delimiter, rich, b"\r\n"]
        parts += [_base64(html), ending]
    else:
        headers.append(_TEXT_HEADERS.format(subtype="plain").encode("ascii"))
        parts = [b"\r\n", _base64(text)]
    return OutgoingMessage(envelope_from, (recipient,), b"".join((*headers, *parts)))


def _open(config: SmtpConfig, timeout: float) -> smtplib.SMTP:
    """A new session as `SMTP_URL` says (TLS, STARTTLS, login), ready for MAIL FROM. Raises
    smtplib's and the socket's errors."""
    client: smtplib.SMTP
    if config.implicit_tls:
        client = smtplib.SMTP_SSL(
            config.host, config.port, timeout=timeout, context=ssl.create_default_context()
        )
    else:
        client = smtplib.SMTP(config.host, config.port, timeout=timeout)
    try:
        client.ehlo()
        if config.starttls:
            client.starttls(context=ssl.create_default_context())
            client.ehlo()
        if config.username:
            client.login(config.username, config.password or "")
    except BaseException:
        client.close()
        raise
    return client


def _quit(client: smtplib.SMTP) -> None:
    """End a session politely if the server still listens, else just close it."""
    try:
        if client.sock is not None:
            client.sock.settimeout(_QUIT_TIMEOUT)
        client.quit()
    except (smtplib.SMTPException, OSError):
        client.close()


def _session(config: SmtpConfig, timeout: float, work: Callable[[smtplib.SMTP], T]) -> T:
    """Open a fresh session, run `work`, quit. Every failure becomes a `MailError` that names
    the server but never the password."""
    try:
        client = _open(config, timeout)
        with client:
            return work(client)
    except (smtplib.SMTPException, OSError) as error:
        raise _mail_error(error, config) from None


class _NotSent(Exception):
    """The transaction failed before any of the content was handed to the server: sending the
    message again cannot duplicate it."""

    def __init__(self, cause: smtplib.SMTPException | OSError) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _closed_by_server(error: smtplib.SMTPException | OSError) -> bool:
    """The server ended the session (hung up, or said 421): a new one may work."""
    if isinstance(error, smtplib.SMTPServerDisconnected | OSError):
        return True
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        return any(code == 421 for code, _ in error.recipients.values())
    return isinstance(error, smtplib.SMTPResponseException) and error.smtp_code == 421


def _transact(client: smtplib.SMTP, message: OutgoingMessage) -> None:
    """One mail transaction (MAIL, RCPT, DATA) on an open session, as `smtplib.sendmail`.
    A failure before DATA raises `_NotSent`; from DATA on, smtplib's own error (the server may
    have kept the message)."""
    try:
        options: list[str] = []
        if client.does_esmtp and client.has_extn("size"):
            options.append(f"SIZE={len(message.data)}")
        if message.international:
            if not client.has_extn("smtputf8"):
                raise smtplib.SMTPNotSupportedError(
                    "an address is not ASCII and the server does not support SMTPUTF8"
                )
            options += ["SMTPUTF8", "BODY=8BITMIME"]
        code, reply = client.mail(message.sender, options)
        if code != 250:
            raise smtplib.SMTPSenderRefused(code, reply, message.sender)
        refused: dict[str, tuple[int, bytes]] = {}
        for recipient in message.recipients:
            code, reply = client.rcpt(recipient)
            if code not in (250, 251):
                refused[recipient] = (code, reply)
        if len(refused) == len(message.recipients):
            raise smtplib.SMTPRecipientsRefused(refused)
    except (smtplib.SMTPException, OSError) as error:
        raise _NotSent(error) from None
    code, reply = client.data(message.data)
    if code != 250:
        raise smtplib.SMTPDataError(code, reply)


@dataclass
class _Kept:
    client: smtplib.SMTP
    idle_since: float


class SmtpPool:
    """Logged-in SMTP sessions kept open between messages, per `SmtpConfig`: the next message
    reuses one (MAIL FROM after the last transaction) instead of a new connection, EHLO,
    STARTTLS and login. A session idle for `idle_seconds` is closed, as is one that failed;
    `close` ends them all. Thread-safe: a session serves one sender at a time."""

    def __init__(
        self,
        *,
        idle_seconds: float = SMTP_IDLE_SECONDS,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self._idle_seconds = idle_seconds
        self._now = now
        self._lock = threading.Lock()
        self._kept: dict[SmtpConfig, list[_Kept]] = {}
        self._closed = False

    def send(self, config: SmtpConfig, message: OutgoingMessage, timeout: float) -> None:
        """Deliver `message`; raise `MailRejected` when the server rejects it for good (5xx to
        the recipient or the content), `MailError` on any other failure (retried).

        On a kept session the server closed (hung up, 421) before taking any of the content,
        the message is sent once more on a new session; never after DATA (the server may have
        kept it: a second try could duplicate it, so it is left to the outbox's retries)."""
        client = self._take(config)
        if client is not None:
            try:
                _transact(client, message)
            except _NotSent as not_sent:
                client.close()
                if not _closed_by_server(not_sent.cause):
                    raise _mail_error(not_sent.cause, config) from None
            except (smtplib.SMTPException, OSError) as error:
                client.close()
                raise _mail_error(error, config) from None
            else:
                self._give_back(config, client)
                return
        try:
            client = _open(config, timeout)
        except (smtplib.SMTPException, OSError) as error:
            raise _mail_error(error, config) from None
        try:
            _transact(client, message)
        except _NotSent as not_sent:
            client.close()
            raise _mail_error(not_sent.cause, config) from None
        except (smtplib.SMTPException, OSError) as error:
            client.close()
            raise _mail_error(error, config) from None
        self._give_back(config, client)

    def _take(self, config: SmtpConfig) -> smtplib.SMTP | None:
        """The most recently used kept session for `config` (None: open one); ends those idle
        too long, for every config."""
        now = self._now()
        expired: list[smtplib.SMTP] = []
        found: smtplib.SMTP | None = None
        with self._lock:
            for key, kept in list(self._kept.items()):
                fresh = [k for k in kept if now - k.idle_since < self._idle_seconds]
                expired += [k.client for k in kept if now - k.idle_since >= self._idle_seconds]
                if key == config and fresh:
                    found = fresh.pop().client
                if fresh:
                    self._kept[key] = fresh
                else:
                    del self._kept[key]
        for client in expired:
            _quit(client)
        return found

    def _give_back(self, config: SmtpConfig, client: smtplib.SMTP) -> None:
        with self._lock:
            if not self._closed:
                self._kept.setdefault(config, []).append(_Kept(client, self._now()))
                return
        _quit(client)

    def close(self) -> None:
        """End every kept session (QUIT); a session in use is ended when its send is done."""
        with self._lock:
            self._closed = True
            kept = [k.client for sessions in self._kept.values() for k in sessions]
            self._kept.clear()
        for client in kept:
            _quit(client)


def check_connection(config: SmtpConfig, timeout: float) -> str:
    """Connect and log in on a new session, as a send would, then quit without sending (for
    `check`): a kept session would not test the connection or the login."""

    def greeting(client: smtplib.SMTP) -> str:
        code, text = client.noop()
        return f"{code} {text.decode(errors='replace')}"

    return _session(config, timeout, greeting)
