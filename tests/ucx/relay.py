"""A TCP relay for the control connection: a host without the secret that forwards bytes both ways.

Used by the relay test and the security run: the relay records everything it
forwards (``seen``) and keeps the writers towards the target (``upstream``) so
that it can add messages of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs


@attrs.define
class Relay:
    port: int
    seen: bytearray = attrs.field(factory=bytearray)
    upstream: list[asyncio.StreamWriter] = attrs.field(factory=list)


@asynccontextmanager
async def tcp_relay(target_address: str) -> AsyncIterator[Relay]:
    """Listen on 127.0.0.1 and relay every connection to ``target_address`` ("host:port")."""
    host, port = target_address.rsplit(":", 1)
    state = Relay(port=0)

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            state.seen.extend(data)
            writer.write(data)
        writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        t_reader, t_writer = await asyncio.open_connection(host, int(port))
        state.upstream.append(t_writer)
        await asyncio.gather(pump(reader, t_writer), pump(t_reader, writer), return_exceptions=True)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
