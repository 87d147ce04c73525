"""An NBD server (newstyle fixed handshake) exporting one volume, recording every write.

Options: EXPORT_NAME, INFO, GO, LIST, ABORT, and STARTTLS when the export has TLS (then
mandatory: nbdtls.py); STRUCTURED_REPLY and others are answered unsupported, so clients use
simple replies. Commands: READ, WRITE, FLUSH, TRIM, WRITE_ZEROES, DISC. A WRITE is journaled
as the new content of whole blocks (an unaligned write is merged with the blocks' current
content first) and written to the volume; TRIM / WRITE_ZEROES journal an aligned zero range
(their unaligned edges are merged writes); FLUSH closes a consistency point. The journal is
durable (group commit) before the reply. Writes reach the volume on the event loop, in the
order they are journaled, so the journal replays to exactly the volume's content.
Protocol reference: the NBD protocol document (doc/proto.md of the NBD project).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import stat
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from replicator.capture.journal import ChangeJournal, GroupCommit, write_zeroes
from replicator.capture.nbdtls import OPT_STARTTLS, ExportTls, TlsSession

if TYPE_CHECKING:
    from replicator.transport.security import TlsConfig

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
    """One volume served over NBD; its writes go to a journal it may share with the other
    volumes of a consistency group (``index``: its place in that journal)."""

    def __init__(self, name: str, fd: int, block_size: int, journal: ChangeJournal,
                 commit: GroupCommit, index: int = 0,
                 on_change: Callable[[], None] | None = None) -> None:
        self.name = name
        self.block_size = block_size
        self.fd = fd
        self.size = os.lseek(fd, 0, os.SEEK_END)
        self.journal = journal
        self.commit = commit
        self.index = index
        self.on_change = on_change
        self.flags = (T_HAS_FLAGS | T_SEND_FLUSH | T_SEND_FUA | T_SEND_TRIM
                      | T_SEND_WRITE_ZEROES | T_CAN_MULTI_CONN)

    @classmethod
    def open_group(cls, volumes: list[tuple[str, str]], journal_path: str, block_size: int,
                   on_change: Callable[[], None] | None = None,
                   journal_limit: int = 1 << 30) -> list[NbdExport]:
        """Open the volumes ((name, path) in journal order) and their shared journal, which
        replays into them."""
        fds: list[int] = []
        try:
            for _name, path in volumes:
                fds.append(os.open(path, os.O_RDWR | os.O_CLOEXEC))
            journal = ChangeJournal(journal_path, block_size, fds, journal_limit)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        commit = GroupCommit(journal)
        return [cls(name, fd, block_size, journal, commit, i, on_change)
                for i, ((name, _path), fd) in enumerate(zip(volumes, fds, strict=True))]

    def close(self) -> None:
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
        n = self.journal.write(start, whole, self.index)
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
            n = self.journal.zero(head, tail - head, self.index)
            write_zeroes(self.fd, head, tail - head)
        if offset + length > tail:
            n = self.write(tail, bytes(offset + length - tail))
        return n


class NbdServer:
    """Serves one or more exports by name (the empty name: the only export, if just one);
    with ``tls`` (a site's certificate), over mandatory mutual TLS (nbdtls.py)."""

    def __init__(self, exports: list[NbdExport], tls: TlsConfig | None = None) -> None:
        self.exports = {e.name: e for e in exports}
        self.tls = ExportTls(tls) if tls is not None else None
        self.server: asyncio.Server | None = None
        self.clients: set[asyncio.Task[None]] = set()
        self.writers: set[asyncio.StreamWriter] = set()
        # The write barrier of a planned switchover: while it is up, writes (and trims) wait
        # unanswered, so the replica can drain to zero lag and nothing acknowledged after the
        # final point is lost; a fenced agent then ends the sessions without replying.
        self.writes_open = asyncio.Event()
        self.writes_open.set()

    def hold_writes(self) -> None:
        if self.writes_open.is_set():
            log.warning("nbd: write barrier up: new writes wait until it is lifted or the "
                        "export stops")
        self.writes_open.clear()

    def release_writes(self) -> None:
        if not self.writes_open.is_set():
            log.warning("nbd: write barrier lifted")
        self.writes_open.set()

    @property
    def barrier(self) -> bool:
        return not self.writes_open.is_set()

    async def start(self, host: str, port: int) -> int:
        self.server = await asyncio.start_server(self._client, host, port)
        return int(self.server.sockets[0].getsockname()[1])

    async def listen(self, spec: str) -> str:
        """Listen on ``HOST:PORT`` or ``unix:PATH`` (a socket only its owner may connect to);
        returns where. NBD without TLS has no authentication: the CLI refuses a non-loopback
        address unless the export has TLS (--nbd-tls) or asked (--insecure-nbd)."""
        if spec.startswith("unix:"):
            path = spec[len("unix:"):]
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)  # a stale socket of a previous run
            old = os.umask(0o177)
            try:
                self.server = await asyncio.start_unix_server(self._client, path)
            finally:
                os.umask(old)
            return f"unix:{path}"
        host, _, port = spec.rpartition(":")
        bound = await self.start(host.strip("[]"), int(port))
        return f"{host}:{bound}"

    async def close(self) -> None:
        """Stop accepting, then end every client's session (before the volumes close)."""
        if self.server is not None:
            self.server.close()
        # Abort the connections: each session ends on its failed read (requests waiting at
        # the write barrier are never answered); a session that does not end is cancelled.
        for w in list(self.writers):
            w.transport.abort()
        if self.clients:
            await asyncio.wait(list(self.clients), timeout=2.0)
        for task in list(self.clients):
            task.cancel()
        for task in list(self.clients):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.server is not None:
            await self.server.wait_closed()

    def _find(self, name: str) -> NbdExport | None:
        if name == "" and len(self.exports) == 1:
            return next(iter(self.exports.values()))
        return self.exports.get(name)

    async def _client(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        peer = w.get_extra_info("peername")
        task = asyncio.current_task()
        if task is not None:
            self.clients.add(task)
            task.add_done_callback(self.clients.discard)
        self.writers.add(w)
        try:
            export = await self._handshake(r, w)
            if export is not None:
                await self._transmission(r, w, export)
        except* (asyncio.IncompleteReadError, ConnectionError) as group:
            log.debug("nbd client %s went away: %s", peer, group.exceptions[0])
        except* (ssl.SSLError, TimeoutError) as group:  # before ValueError: a certificate
            # verification error is both
            log.warning("nbd client %s: TLS failed: %s", peer, group.exceptions[0])
        except* ValueError as group:
            log.warning("nbd client %s: protocol error: %s", peer, group.exceptions[0])
        finally:
            self.writers.discard(w)
            w.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await w.wait_closed()

    # -- handshake ------------------------------------------------------------------------

    async def _handshake(self, r: asyncio.StreamReader,
                         w: asyncio.StreamWriter) -> NbdExport | None:
        w.write(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        await w.drain()
        (cflags,) = struct.unpack(">I", await r.readexactly(4))
        no_zeroes = bool(cflags & C_NO_ZEROES)
        session = TlsSession(self.tls, w.get_extra_info("peername"))
        while True:
            magic, opt, length = struct.unpack(">QII", await r.readexactly(16))
            if magic != IHAVEOPT:
                raise ValueError("bad option magic")
            if length > 4096:
                raise ValueError("option too long")
            data = await r.readexactly(length)
            if opt == OPT_EXPORT_NAME and session.blocked:
                log.warning("nbd client %s: NBD_OPT_EXPORT_NAME %s: session ended", session.peer,
                            "without TLS" if not session.secure else "refused")
                return None  # this option cannot be answered with an error: hang up
            if await self._tls_option(w, session, opt, data):
                continue
            done, export = self._option(w, opt, data, no_zeroes)
            await w.drain()
            if done:
                return export

    def _option(self, w: asyncio.StreamWriter, opt: int, data: bytes,
                no_zeroes: bool) -> tuple[bool, NbdExport | None]:
        """Answer an option; (whether the haggling ends, the export to serve if so)."""
        if opt == OPT_EXPORT_NAME:
            export = self._find(data.decode(errors="replace"))
            if export is None:
                return True, None  # no way to report an error here: hang up (per protocol)
            w.write(struct.pack(">QH", export.size, export.flags))
            if not no_zeroes:
                w.write(bytes(124))
            return True, export
        if opt == OPT_ABORT:
            self._reply(w, opt, REP_ACK)
            return True, None
        if opt == OPT_LIST:
            for name in self.exports:
                raw = name.encode()
                self._reply(w, opt, REP_SERVER, struct.pack(">I", len(raw)) + raw)
            self._reply(w, opt, REP_ACK)
        elif opt in (OPT_INFO, OPT_GO):
            export = self._info(w, opt, data)
            if export is not None and opt == OPT_GO:
                return True, export
        else:
            self._reply(w, opt, REP_ERR_UNSUP)
        return False, None

    async def _tls_option(self, w: asyncio.StreamWriter, session: TlsSession, opt: int,
                          data: bytes) -> bool:
        """STARTTLS, and the refusals TLS makes (nbdtls.py): True if the option was answered
        here. STARTTLS is ACKed, then the handshake runs on this connection."""
        if opt == OPT_STARTTLS:
            if session.tls is None:
                self._reply(w, opt, REP_ERR_UNSUP, b"this export has no TLS")
            elif session.secure or data:
                self._reply(w, opt, REP_ERR_INVALID)
            else:
                self._reply(w, opt, REP_ACK)
                await w.drain()
                await session.start(w)
                return True
            await w.drain()
            return True
        refused = session.refuse() if opt != OPT_ABORT else None
        if refused is None:
            return False
        if not session.secure:
            log.info("nbd client %s: option %d refused: TLS required", session.peer, opt)
        self._reply(w, opt, *refused)
        await w.drain()
        return True

    def _info(self, w: asyncio.StreamWriter, opt: int, data: bytes) -> NbdExport | None:
        """Answer NBD_OPT_INFO / NBD_OPT_GO; the export if it was described."""
        if len(data) < 6:
            self._reply(w, opt, REP_ERR_INVALID)
            return None
        (nlen,) = struct.unpack(">I", data[:4])
        export = self._find(data[4 : 4 + nlen].decode(errors="replace"))
        if export is None:
            self._reply(w, opt, REP_ERR_UNKNOWN, b"no such export")
            return None
        self._reply(w, opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, export.size,
                                                 export.flags))
        self._reply(w, opt, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096,
                                                 MAX_REQUEST))
        self._reply(w, opt, REP_ACK)
        return export

    @staticmethod
    def _reply(w: asyncio.StreamWriter, opt: int, rtype: int, data: bytes = b"") -> None:
        w.write(struct.pack(">QIII", REPLY_MAGIC, opt, rtype, len(data)) + data)

    # -- transmission -----------------------------------------------------------------------

    async def _transmission(self, r: asyncio.StreamReader, w: asyncio.StreamWriter,
                            ex: NbdExport) -> None:
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
                tg.create_task(self._serve(ex, w, lock, cmd, handle, offset, length, data))

    async def _serve(self, ex: NbdExport, w: asyncio.StreamWriter, lock: asyncio.Lock, cmd: int,
                     handle: int, offset: int, length: int, data: bytes) -> None:
        try:
            if cmd == CMD_READ:
                payload = (os.pread(ex.fd, length, offset) if length <= INLINE_IO
                           else await asyncio.to_thread(os.pread, ex.fd, length, offset))
                await self._simple(w, lock, handle, 0, payload)
                return
            if cmd in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES) and not self.writes_open.is_set():
                await self.writes_open.wait()
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

