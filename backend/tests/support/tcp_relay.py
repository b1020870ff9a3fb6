"""A TCP relay on a free loopback port that a test can use to cut every open connection at once (a dropped network).

It runs an asyncio server on a thread of its own, so synchronous tests (Playwright's sync API) can drive it:
clients connect to `relay.url`, each connection is piped to the target, and `sever()` resets them all (RST, like a
phone changing networks) while the relay keeps accepting new ones, so a client that reconnects gets through.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from tests.support.real_servers import LOOPBACK

PIPE_CHUNK_BYTES = 65_536
CALL_TIMEOUT_S = 10.0
# SO_LINGER on with a zero timeout: close() then sends RST instead of FIN, and discards unsent data.
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)


@dataclass(eq=False)
class _Connection:
    client: asyncio.StreamWriter
    target: asyncio.StreamWriter

    def reset(self) -> None:
        for writer in (self.client, self.target):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):  # already closed by its peer
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
            writer.transport.abort()


@dataclass
class TcpRelay:
    """Point clients at `url`; `sever()` cuts every open connection; `accepted` counts connections so far.

    `handle` and `reset_all` run on `loop`, the relay's own event loop thread.
    """

    target_host: str
    target_port: int
    url: str = ""
    accepted: int = 0
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _open: set[_Connection] = field(default_factory=set)

    def sever(self) -> int:
        """Reset every open connection, both ways; returns how many there were."""
        return asyncio.run_coroutine_threadsafe(self.reset_all(), self.loop).result(CALL_TIMEOUT_S)

    async def reset_all(self) -> int:
        """`sever()` on the relay's own loop."""
        connections = list(self._open)
        for connection in connections:
            connection.reset()
        self._open.clear()
        return len(connections)

    async def handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            target_reader, target_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            client_writer.transport.abort()
            return
        connection = _Connection(client_writer, target_writer)
        self._open.add(connection)
        try:
            await asyncio.gather(_pipe(client_reader, target_writer), _pipe(target_reader, client_writer))
        finally:
            self._open.discard(connection)
            client_writer.transport.abort()
            target_writer.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until end of file (then pass the half-close on) or until either side fails."""
    with contextlib.suppress(OSError):
        while data := await reader.read(PIPE_CHUNK_BYTES):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()


@contextlib.contextmanager
def run_tcp_relay(target_url: str) -> Iterator[TcpRelay]:
    """A relay in front of `target_url` (http://HOST:PORT); `relay.url` is its own http://127.0.0.1:PORT."""
    parts = urlsplit(target_url)
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"target_url must be scheme://HOST:PORT, got {target_url!r}")
    relay = TcpRelay(parts.hostname, parts.port)
    started = threading.Event()
    server: asyncio.Server | None = None

    async def serve() -> None:
        nonlocal server
        server = await asyncio.start_server(relay.handle, LOOPBACK, 0)
        port = server.sockets[0].getsockname()[1]
        relay.url = f"{parts.scheme}://{LOOPBACK}:{port}"
        started.set()

    thread = threading.Thread(target=relay.loop.run_forever, name="tcp-relay", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(serve(), relay.loop).result(CALL_TIMEOUT_S)
        started.wait(CALL_TIMEOUT_S)
        yield relay
    finally:

        async def shutdown() -> None:
            if server is not None:
                server.close()
            await relay.reset_all()
            if server is not None:
                await server.wait_closed()

        asyncio.run_coroutine_threadsafe(shutdown(), relay.loop).result(CALL_TIMEOUT_S)
        relay.loop.call_soon_threadsafe(relay.loop.stop)
        thread.join(CALL_TIMEOUT_S)
        relay.loop.close()
