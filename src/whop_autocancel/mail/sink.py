"""A real SMTP server on loopback that keeps what it receives (demo and tests)."""

from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


@dataclass(frozen=True)
class ReceivedEmail:
    sender: str
    recipients: tuple[str, ...]
    message: EmailMessage
    peer: str = ""  # the client's address and port: one per SMTP connection

    @property
    def subject(self) -> str:
        return str(self.message["Subject"])

    @property
    def text(self) -> str:
        part = self.message.get_body(preferencelist=("plain",))
        return part.get_content() if part is not None else ""

    @property
    def html(self) -> str:
        part = self.message.get_body(preferencelist=("html",))
        return part.get_content() if part is not None else ""


def _hang_up(server: Any) -> None:
    """Close the client's connection from the server's side, after what is being written."""
    asyncio.get_running_loop().call_soon(server.transport.close)


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self._sink = sink

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: Any
    ) -> str:
        if self._sink.take_hang_up_at_mail():
            _hang_up(server)
            return "421 4.3.2 sink is closing this connection"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        self._sink.count_quit()
        return "221 Bye"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any
    ) -> str:
        if address.lower() in self._sink.rejected:
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self._sink.refusing:
            return "451 4.3.0 sink is refusing mail for now"
        message = message_from_bytes(envelope.content, policy=policy.default)
        assert isinstance(message, EmailMessage)
        host, port, *_ = session.peer
        self._sink.add(
            ReceivedEmail(
                sender=envelope.mail_from,
                recipients=tuple(envelope.rcpt_tos),
                message=message,
                peer=f"{host}:{port}",
            )
        )
        if self._sink.hang_up_after_data:
            # Kept, but the connection drops before the answer: the client cannot know.
            server.transport.close()
        return "250 OK"


class _Authenticator:
    def __init__(self, username: str, password: str) -> None:
        self._expected = (username.encode(), password.encode())

    def __call__(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and (
                auth_data.login,
                auth_data.password,
            )
            == self._expected
        )
        return AuthResult(success=ok, handled=False)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (aiosmtpd's Controller cannot take port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class SmtpSink:
    """`with SmtpSink() as sink:` … `sink.url` is an `SMTP_URL`; `sink.messages` what arrived."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.refusing = False  # every message answered 451 (a transient refusal)
        self.rejected: set[str] = set()  # recipients answered 550 (a permanent rejection)
        # Keep each message but close the connection before answering its DATA.
        self.hang_up_after_data = False
        self._hang_ups_at_mail = 0  # answer 421 to the next MAIL FROMs and close
        self._quits = 0
        self._messages: list[ReceivedEmail] = []
        self._lock = threading.Lock()
        options: dict[str, Any] = {}
        if credentials is not None:
            # AUTH over plain loopback: a test of the login, not of TLS.
            options.update(authenticator=_Authenticator(*credentials), auth_require_tls=False)
        self._controller = Controller(_Handler(self), hostname=host, port=self.port, **options)

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"

    def reject(self, address: str) -> None:
        """Answer `550 … User unknown` to RCPT TO this address, as a real server would."""
        self.rejected.add(address.lower())

    def accept(self, address: str) -> None:
        self.rejected.discard(address.lower())

    def hang_up_at_next_mail(self, times: int = 1) -> None:
        """Answer `421` to the next `times` MAIL FROMs and close those connections, as a
        server closing an idle connection does."""
        with self._lock:
            self._hang_ups_at_mail = times

    def take_hang_up_at_mail(self) -> bool:
        with self._lock:
            if self._hang_ups_at_mail <= 0:
                return False
            self._hang_ups_at_mail -= 1
            return True

    def count_quit(self) -> None:
        with self._lock:
            self._quits += 1

    @property
    def quits(self) -> int:
        """How many clients said QUIT (closed their connection politely)."""
        with self._lock:
            return self._quits

    def add(self, email: ReceivedEmail) -> None:
        with self._lock:
            self._messages.append(email)

    @property
    def messages(self) -> list[ReceivedEmail]:
        with self._lock:
            return list(self._messages)

    def to(self, address: str) -> list[ReceivedEmail]:
        return [m for m in self.messages if address in m.recipients]

    def start(self) -> SmtpSink:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
