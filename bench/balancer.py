"""A round-robin TCP load balancer for the benchmarks: what stands in front of several `serve
--no-worker` processes in a scale-out deployment, so that Whop's one webhook URL reaches all of
them. Each new connection goes to the next backend; bytes are copied both ways as they come.

    python bench/balancer.py --port 8000 --backend 8001 --backend 8002

asyncio, standard library only; it prints `listening` once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import socket


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def serve(port: int, backends: list[int]) -> None:
    turn = itertools.cycle(backends)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                "127.0.0.1", next(turn)
            )
        except OSError:
            writer.close()
            return
        await asyncio.gather(_copy(reader, upstream_writer), _copy(upstream_reader, writer))

    # proto=IPPROTO_TCP: asyncio then sets TCP_NODELAY on accepted connections (no delayed-ACK
    # stalls on keep-alive requests).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    server = await asyncio.start_server(handle, sock=sock, backlog=1024)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", type=int, action="append", required=True)
    options = parser.parse_args()
    asyncio.run(serve(options.port, options.backend))


if __name__ == "__main__":
    main()
