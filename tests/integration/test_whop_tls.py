"""The Whop clients' TLS: one context for the whole process (loading the CA bundle costs about
20 ms of CPU, which every new client paid, and the cancellation command makes a client per
run), and that shared context still refuses a certificate it cannot verify, over a real TLS
handshake on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from whop_autocancel.clock import SystemClock
from whop_autocancel.whop.client import AsyncWhopClient, WhopClient, tls_context


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that no CA vouches for, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
def untrusted_server(tmp_path: Path) -> Iterator[str]:
    """A TLS server on loopback with a self-signed certificate: every handshake it is offered
    is counted, whatever its end."""
    cert, key = self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            # The client refuses the certificate mid-handshake: what the tests expect.
            with connection, contextlib.suppress(ssl.SSLError, OSError):
                context.wrap_socket(connection, server_side=True).close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"https://localhost:{port}/api/v1"
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def test_every_client_shares_one_context_that_verifies_certificates_and_hostnames() -> None:
    context = tls_context()
    assert context is tls_context()
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert context.cert_store_stats()["x509_ca"] > 0  # a CA bundle is loaded


def test_the_blocking_client_refuses_a_certificate_no_ca_vouches_for(
    untrusted_server: str,
) -> None:
    client = WhopClient(
        untrusted_server, "apik_test", version_date=None, timeout=5, clock=SystemClock()
    )
    try:
        reply = client.retrieve_plan("plan_X")
    finally:
        client.close()
    assert reply.status is None
    assert reply.transport_error is not None
    assert "CERTIFICATE_VERIFY_FAILED" in reply.transport_error


def test_the_non_blocking_client_refuses_a_certificate_no_ca_vouches_for(
    untrusted_server: str,
) -> None:
    async def call() -> tuple[int | None, str | None]:
        clients = [
            AsyncWhopClient(
                untrusted_server, "apik_test", version_date=None, timeout=5, clock=SystemClock()
            )
            for _ in range(2)
        ]
        try:
            reply = await clients[1].send(clients[1].api.retrieve_membership("mem_X"))
        finally:
            for client in clients:
                await client.aclose()
        return reply.status, reply.transport_error

    status, error = asyncio.run(call())
    assert status is None
    assert error is not None
    assert "CERTIFICATE_VERIFY_FAILED" in error
