"""`serve`'s web port: the listener it binds before anything else starts (cli/service.py)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from whop_autocancel.cli.service import _listen


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_accepted_connections_send_at_once(host: str) -> None:
    """Each connection accepted on the listener gets TCP_NODELAY, as uvicorn's own sockets do.
    asyncio sets it only on connections of a listener made with proto IPPROTO_TCP; without
    it a response written in two parts (head, then body) held its second part until the
    client's delayed ACK, ~40 ms later: a keep-alive client (Whop, a proxy, the benchmarks'
    load) waited that long for every answer after the first."""
    try:
        listener = _listen(host, 0)
    except Exception as error:  # (a machine without IPv6 on loopback)
        pytest.skip(f"cannot listen on {host}: {error}")
    accepted: list[int] = []

    async def exchange() -> None:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connection = writer.get_extra_info("socket")
            accepted.append(connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.write(b"bye")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(answer, sock=listener)
        port = listener.getsockname()[1]
        async with server:
            reader, writer = await asyncio.open_connection(host, port)
            assert await reader.read() == b"bye"
            writer.close()

    asyncio.run(exchange())
    assert len(accepted) == 1
    assert accepted[0] != 0
