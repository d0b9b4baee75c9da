"""A tiny TCP proxy on loopback with a download bandwidth cap and a kill switch.

Between dockerd and a registry it makes pulls slow enough to observe progress, cancel them,
or cut the registry away mid-transfer.
"""

from __future__ import annotations

import asyncio
import contextlib


class ThrottledProxy:
    """Forwards 127.0.0.1:<port> to target; server->client bytes capped at `bytes_per_s`."""

    def __init__(self, target_host: str, target_port: int, *, bytes_per_s: float | None) -> None:
        self.target = (target_host, target_port)
        self.bytes_per_s = bytes_per_s
        self.port = 0
        self.bytes_down = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._next_free = 0.0  # pacing shared by all connections: the cap is for the link

    @property
    def open_connections(self) -> int:
        return len(self._handlers)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> ThrottledProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def cut(self) -> None:
        """The registry goes away: stop listening and reset every open connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        # Aborted transports end the pumps; cancelling the handlers instead would make
        # asyncio's stream callback log the CancelledError.
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=2.0)
        for task in list(self._handlers):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    close = cut

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            self._writers.discard(writer)
            self._handlers.discard(task)
            return
        self._writers.add(up_writer)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._pump(reader, up_writer, throttle=False))
                tg.create_task(self._pump(up_reader, writer, throttle=True))
        except* (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (writer, up_writer):
                w.transport.abort()
                self._writers.discard(w)
            self._handlers.discard(task)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, throttle: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        while data := await reader.read(16384):
            if throttle and self.bytes_per_s:
                now = loop.time()
                start = max(now, self._next_free)
                self._next_free = start + len(data) / self.bytes_per_s
                await asyncio.sleep(self._next_free - now)
                self.bytes_down += len(data)
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
