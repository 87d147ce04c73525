"""An NBD server (newstyle fixed handshake) exporting one volume, recording every write.

Options: EXPORT_NAME, INFO, GO, LIST, ABORT, and STARTTLS when the export has TLS (then
mandatory: nbdtls.py); STRUCTURED_REPLY and others are answered unsupported, so clients use
simple replies. Commands: READ, WRITE, FLUSH, TRIM, WRITE_ZEROES, DISC. A WRITE is journaled
as the new content of whole blocks (an unaligned write is merged with the blocks' current
content first) and written to the volume; TRIM / WRITE_ZEROES journal an aligned zero range
(their unaligned edges are merged writes); FLUSH closes a consistency point. The journal is
durable (group commit) before the reply. Writes reach the volume in the order they are
journaled, so the journal replays to exactly the volume's content. This module does the
handshake; the transmission phase (the per-request path) is nbdio.py, its journaling and
group commit commit.py. Protocol reference: the NBD protocol document (doc/proto.md of the
NBD project).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import stat
import struct
from typing import TYPE_CHECKING

from replicator.capture.nbdio import MAX_REQUEST, NbdExport, Transmission, WriteBarrier
from replicator.capture.nbdtls import OPT_STARTTLS, ExportTls, TlsSession

if TYPE_CHECKING:
    from replicator.transport.security import TlsConfig

log = logging.getLogger(__name__)

__all__ = ["NbdExport", "NbdServer"]

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x0003E889045565A9

FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
C_FIXED_NEWSTYLE, C_NO_ZEROES = 1, 2

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO = 1, 2, 3, 6, 7
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR_UNSUP, REP_ERR_INVALID, REP_ERR_UNKNOWN = 2**31 + 1, 2**31 + 3, 2**31 + 6
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3


class NbdServer:
    """Serves one or more exports by name (the empty name: the only export, if just one);
    with ``tls`` (a site's certificate), over mandatory mutual TLS (nbdtls.py)."""

    def __init__(self, exports: list[NbdExport], tls: TlsConfig | None = None,
                 operators: frozenset[str] = frozenset()) -> None:
        self.exports = {e.name: e for e in exports}
        self.tls = ExportTls(tls, operators) if tls is not None else None
        self.server: asyncio.Server | None = None
        self.clients: set[asyncio.Task[None]] = set()
        self.writers: set[asyncio.StreamWriter] = set()
        self.reads: set[asyncio.Future[None]] = set()  # large reads on threads
        # The write barrier of a planned switchover: while it is up, writes (and trims) wait
        # unanswered, so the replica can drain to zero lag and nothing acknowledged after the
        # final point is lost; a fenced agent then ends the sessions without replying.
        self.write_barrier = WriteBarrier()

    def hold_writes(self) -> None:
        if not self.write_barrier.up:
            log.warning("nbd: write barrier up: new writes wait until it is lifted or the "
                        "export stops")
        self.write_barrier.up = True

    def release_writes(self) -> None:
        if self.write_barrier.up:
            log.warning("nbd: write barrier lifted")
        self.write_barrier.lift()

    @property
    def barrier(self) -> bool:
        return self.write_barrier.up

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
        # Nothing may touch the journal or a volume once this returns (they close next):
        # wait for the large reads, the writer's queued jobs and the sync thread.
        if self.reads:
            await asyncio.wait(list(self.reads))
        for e in self.exports.values():
            await asyncio.to_thread(e.stop_io)

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
                await Transmission.serve(export, r, w, self.write_barrier, self.reads)
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
        session = TlsSession(self.tls, w.get_extra_info("peername"), r)
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
