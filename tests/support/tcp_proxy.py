"""A TCP proxy on an ephemeral loopback port that can cut its connections: a dropped network path.

It forwards bytes unchanged (gRPC's HTTP/2 included), so a client behind it sees exactly what it
sees when a connection breaks under it: no status from the server, just a socket that closed. A
cut is armed on a marker: the first connection whose server-to-client bytes contain it is cut
right after forwarding them (HTTP/2 leaves DATA frames uncompressed, so an answer's words are
visible in the stream). Several markers make several cuts, one after the other; once they are used
up, connections (such as the client's reconnections) are forwarded whole.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

_CHUNK = 65536


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `upstream`; counts connections and cuts."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._markers: list[bytes] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None
        self.connections = 0
        self.cuts = 0
        self.all_cut = asyncio.Event()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cut_after(self, *markers: bytes) -> None:
        """Cut the first connection that forwards the first marker from the server to the client, then
        the first that forwards the next one (after the first cut), and so on."""
        self._markers = list(markers)
        self.all_cut.clear()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            client_writer.transport.abort()
            return
        pair = (client_writer, upstream_writer)
        self._writers.update(pair)
        loop = asyncio.get_running_loop()
        pumps = [
            loop.create_task(self._pump(client_reader, upstream_writer, pair, watch=False)),
            loop.create_task(self._pump(upstream_reader, client_writer, pair, watch=True)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self._tasks.difference_update(pumps)
            for writer in pair:
                writer.transport.abort()
                self._writers.discard(writer)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
        *,
        watch: bool,
    ) -> None:
        tail = b""  # a marker may straddle two reads
        try:
            while data := await reader.read(_CHUNK):
                writer.write(data)
                await writer.drain()
                if watch and self._markers:
                    seen = tail + data
                    if self._markers[0] in seen:
                        self._markers.pop(0)
                        self.cuts += 1
                        if not self._markers:
                            self.all_cut.set()
                        for each in pair:
                            each.transport.abort()
                        return
                    tail = seen[-len(self._markers[0]) :]
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.transport.abort()


@asynccontextmanager
async def tcp_proxy(upstream_host: str, upstream_port: int) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy(upstream_host, upstream_port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()
