"""A TCP proxy that flips one byte inside one HTTP/2 DATA frame going to the server.

Frames are parsed (9-byte header: 24-bit length, type, flags, stream id) so the flip lands in
a DATA frame payload, i.e. in a gRPC message, never in framing the transport itself would
reject. Used to show that a payload corrupted in flight is detected and resent.
"""

from __future__ import annotations

import asyncio
import contextlib

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class CorruptingProxy:
    def __init__(self, upstream_port: int, corrupt_data_frame: int, min_frame: int = 8192) -> None:
        self.upstream_port = upstream_port
        self.target_frame = corrupt_data_frame
        self.min_frame = min_frame
        self.seen_frames = 0
        self.corrupted = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> CorruptingProxy:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _client(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            cw.close()
            return
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._to_server(cr, uw))
            tg.create_task(self._pipe(ur, cw))

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await r.read(1 << 16):
                w.write(data)
                await w.drain()
        w.close()

    async def _to_server(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            w.write(await r.readexactly(len(PREFACE)))
            while True:
                header = await r.readexactly(9)
                length = int.from_bytes(header[:3], "big")
                body = bytearray(await r.readexactly(length))
                if header[3] == 0 and length >= self.min_frame:  # DATA
                    self.seen_frames += 1
                    if self.seen_frames == self.target_frame:
                        body[length // 2] ^= 0x5A
                        self.corrupted += 1
                w.write(header + body)
                await w.drain()
        w.close()
