"""An NBD server (newstyle fixed handshake) exporting one volume, recording every write.

Options: EXPORT_NAME, INFO, GO, LIST, ABORT (STRUCTURED_REPLY and others are answered
unsupported, so clients use simple replies). Commands: READ, WRITE, FLUSH, TRIM,
WRITE_ZEROES, DISC. A WRITE is journaled as the new content of whole blocks (an unaligned
write is merged with the blocks' current content first) and written to the volume; TRIM /
WRITE_ZEROES journal an aligned zero range (their unaligned edges are merged writes); FLUSH
closes a consistency point. The journal is durable (group commit) before the reply. Writes reach
the volume on the event loop, in the order they are journaled, so the journal replays to exactly
the volume's content.
Protocol reference: the NBD protocol document (doc/proto.md of the NBD project).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections.abc import Callable

from replicator.capture.journal import ChangeJournal, GroupCommit

log = logging.getLogger(__name__)

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
C_FIXED_NEWSTYLE, C_NO_ZEROES = 1, 2

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO = 1, 2, 3, 6, 7
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR_UNSUP, REP_ERR_INVALID, REP_ERR_UNKNOWN = 2**31 + 1, 2**31 + 3, 2**31 + 6
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3

T_HAS_FLAGS, T_SEND_FLUSH, T_SEND_FUA, T_SEND_TRIM, T_SEND_WRITE_ZEROES = 1, 4, 8, 32, 64
T_CAN_MULTI_CONN = 256
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 6
EIO, EINVAL, ENOSPC, ENOTSUP = 5, 22, 28, 95
MAX_REQUEST = 32 << 20
INLINE_IO = 64 << 10  # smaller reads and writes are done on the loop (page cache copies)

_REQ = struct.Struct(">IHHQQI")


class NbdExport:
    def __init__(self, name: str, path: str, journal_path: str, block_size: int,
                 on_change: Callable[[], None] | None = None,
                 journal_limit: int = 1 << 30) -> None:
        self.name = name
        self.block_size = block_size
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        self.journal = ChangeJournal(journal_path, block_size, self.fd, self.size,
                                     journal_limit)  # replays into the fd
        self.commit = GroupCommit(self.journal)
        self.on_change = on_change
        self.flags = (T_HAS_FLAGS | T_SEND_FLUSH | T_SEND_FUA | T_SEND_TRIM
                      | T_SEND_WRITE_ZEROES | T_CAN_MULTI_CONN)

    def close(self) -> None:
        self.journal.close()
        os.close(self.fd)

    def _whole_blocks(self, offset: int, data: bytes | bytearray) -> tuple[int, bytes | bytearray]:
        """``data`` at ``offset`` widened to whole blocks with the volume's current content."""
        bs = self.block_size
        start = offset - offset % bs
        end = min(self.size, -(-(offset + len(data)) // bs) * bs)
        if start == offset and end == offset + len(data):
            return offset, data
        merged = bytearray(os.pread(self.fd, end - start, start))
        merged[offset - start : offset - start + len(data)] = data
        return start, merged

    def write(self, offset: int, data: bytes) -> int:
        """Journal then write (on the loop: no other request interleaves). Returns the
        journal record number to wait for."""
        start, whole = self._whole_blocks(offset, data)
        n = self.journal.write(start, whole)
        done = 0
        while done < len(whole):
            done += os.pwrite(self.fd, memoryview(whole)[done:], start + done)
        return n

    def zero(self, offset: int, length: int) -> int:
        bs = self.block_size
        head = min(offset + length, -(-offset // bs) * bs)  # first block boundary
        tail = max(head, (offset + length) // bs * bs)
        if (offset + length) == self.size:
            tail = offset + length  # the volume's last, partial block counts as whole
        n = 0
        if head > offset:
            n = self.write(offset, bytes(head - offset))
        if tail > head:
            n = self.journal.zero(head, tail - head)
            _zero(self.fd, head, tail - head)
        if offset + length > tail:
            n = self.write(tail, bytes(offset + length - tail))
        return n


class NbdServer:
    def __init__(self, export: NbdExport) -> None:
        self.export = export
        self.server: asyncio.Server | None = None
        self.clients: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        self.server = await asyncio.start_server(self._client, host, port)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _client(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        peer = w.get_extra_info("peername")
        try:
            if await self._handshake(r, w):
                await self._transmission(r, w)
        except* (asyncio.IncompleteReadError, ConnectionError) as group:
            log.debug("nbd client %s went away: %s", peer, group.exceptions[0])
        except* ValueError as group:
            log.warning("nbd client %s: protocol error: %s", peer, group.exceptions[0])
        finally:
            w.close()
            with contextlib.suppress(ConnectionError):
                await w.wait_closed()

    # -- handshake ------------------------------------------------------------------------

    async def _handshake(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        await w.drain()
        (cflags,) = struct.unpack(">I", await r.readexactly(4))
        no_zeroes = bool(cflags & C_NO_ZEROES)
        while True:
            magic, opt, length = struct.unpack(">QII", await r.readexactly(16))
            if magic != IHAVEOPT:
                raise ValueError("bad option magic")
            if length > 4096:
                raise ValueError("option too long")
            data = await r.readexactly(length)
            if opt == OPT_EXPORT_NAME:
                if data.decode(errors="replace") not in ("", self.export.name):
                    return False  # no way to report an error here: hang up (per protocol)
                w.write(struct.pack(">QH", self.export.size, self.export.flags))
                if not no_zeroes:
                    w.write(bytes(124))
                await w.drain()
                return True
            if opt == OPT_ABORT:
                self._reply(w, opt, REP_ACK)
                await w.drain()
                return False
            if opt == OPT_LIST:
                export = self.export.name.encode()
                self._reply(w, opt, REP_SERVER, struct.pack(">I", len(export)) + export)
                self._reply(w, opt, REP_ACK)
            elif opt in (OPT_INFO, OPT_GO):
                if self._info(w, opt, data) and opt == OPT_GO:
                    await w.drain()
                    return True
            else:
                self._reply(w, opt, REP_ERR_UNSUP)
            await w.drain()

    def _info(self, w: asyncio.StreamWriter, opt: int, data: bytes) -> bool:
        """Answer NBD_OPT_INFO / NBD_OPT_GO; True if the export was described."""
        if len(data) < 6:
            self._reply(w, opt, REP_ERR_INVALID)
            return False
        (nlen,) = struct.unpack(">I", data[:4])
        name = data[4 : 4 + nlen].decode(errors="replace")
        if name not in ("", self.export.name):
            self._reply(w, opt, REP_ERR_UNKNOWN, b"no such export")
            return False
        self._reply(w, opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, self.export.size,
                                                 self.export.flags))
        self._reply(w, opt, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096,
                                                 MAX_REQUEST))
        self._reply(w, opt, REP_ACK)
        return True

    @staticmethod
    def _reply(w: asyncio.StreamWriter, opt: int, rtype: int, data: bytes = b"") -> None:
        w.write(struct.pack(">QIII", REPLY_MAGIC, opt, rtype, len(data)) + data)

    # -- transmission -----------------------------------------------------------------------

    async def _transmission(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ex = self.export
        lock = asyncio.Lock()  # replies are written whole
        async with asyncio.TaskGroup() as tg:
            while True:
                magic, _flags, cmd, handle, offset, length = _REQ.unpack(
                    await r.readexactly(_REQ.size))
                if magic != REQUEST_MAGIC:
                    raise ValueError("bad request magic")
                if cmd == CMD_DISC:
                    return
                data = await r.readexactly(length) if cmd == CMD_WRITE else b""
                if length > MAX_REQUEST or offset + length > ex.size:
                    await self._simple(w, lock, handle, EINVAL if length > MAX_REQUEST
                                       else ENOSPC)
                    continue
                tg.create_task(self._serve(w, lock, cmd, handle, offset, length, data))

    async def _serve(self, w: asyncio.StreamWriter, lock: asyncio.Lock, cmd: int, handle: int,
                     offset: int, length: int, data: bytes) -> None:
        ex = self.export
        try:
            if cmd == CMD_READ:
                payload = (os.pread(ex.fd, length, offset) if length <= INLINE_IO
                           else await asyncio.to_thread(os.pread, ex.fd, length, offset))
                await self._simple(w, lock, handle, 0, payload)
                return
            if cmd == CMD_WRITE:
                n = ex.write(offset, data)
            elif cmd in (CMD_TRIM, CMD_WRITE_ZEROES):
                n = ex.zero(offset, length)
            elif cmd == CMD_FLUSH:
                n = ex.journal.flush()
            else:
                await self._simple(w, lock, handle, ENOTSUP)
                return
            await ex.commit.wait_durable(n)  # durable before the reply
            if ex.on_change is not None:
                ex.on_change()
            await self._simple(w, lock, handle, 0)
        except OSError as exc:
            log.error("nbd: %s at %d+%d failed: %s", cmd, offset, length, exc)
            await self._simple(w, lock, handle, EIO)

    @staticmethod
    async def _simple(w: asyncio.StreamWriter, lock: asyncio.Lock, handle: int, error: int,
                      payload: bytes = b"") -> None:
        async with lock:
            w.write(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, handle) + payload)
            await w.drain()


def _zero(fd: int, offset: int, length: int) -> None:
    chunk = memoryview(bytes(min(length, 8 << 20)))
    done = 0
    while done < length:
        done += os.pwrite(fd, chunk[: length - done], offset + done)
