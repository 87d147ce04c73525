"""The NBD export's per-request path: the volume's side (``NbdExport``) and the transmission
phase of one connection (``Transmission``, after nbd.py's handshake).

A connection's bytes arrive in a buffer of the protocol's own (``asyncio.BufferedProtocol``):
requests are parsed in place; a write's payload that is already there is journaled and
written to the volume straight from that buffer, and a large one is received directly into
a buffer of its size (one copy from the socket). Nothing runs as a task per request: a write
is journaled (commit.py: on the loop when small and nothing is queued, else on the writer's
thread, always in arrival order), its durability is waited for by the group commit's thread,
and the reply goes out from the callback that thread schedules on the loop. A read is served
from the volume into a buffer that already holds its reply header (on the loop up to
``INLINE_IO``, on a thread above). Replies are written whole; requests may complete in any
order (NBD allows it), every write only once it is durable in the journal.

Activity log (activity.py, ``NbdExport.activity``): a write's extents are listed in it before
the volume is written (a set lookup once they are; a write to an extent not listed yet is done
on the writer's thread, where listing it syncs the log).

Flow control: reading stops while more than ``MAX_INFLIGHT`` bytes of requests are
unanswered or while the client does not read its replies (the transport's write buffer is
full), and the writes held by the write barrier count as unanswered.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import struct
import threading
from collections import deque
from collections.abc import Callable

from replicator.activity import ActivityLog
from replicator.capture.commit import GroupCommit, OrderedWriter
from replicator.capture.journal import ChangeJournal
from replicator.capture.journal_records import write_zeroes

log = logging.getLogger(__name__)

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
T_HAS_FLAGS, T_SEND_FLUSH, T_SEND_FUA, T_SEND_TRIM, T_SEND_WRITE_ZEROES = 1, 4, 8, 32, 64
T_CAN_MULTI_CONN = 256
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 6
EIO, EINVAL, ENOSPC, ENOTSUP = 5, 22, 28, 95
MAX_REQUEST = 32 << 20
INLINE_IO = 64 << 10  # smaller reads and writes are done on the loop (page cache copies)
MAX_INFLIGHT = 64 << 20  # bytes of unanswered requests before reading stops
RECV_BUFFER = 256 << 10  # a connection's receive buffer (larger payloads get their own)
WRITE_BUFFER_HIGH = 8 << 20  # the transport's write buffer before the client counts as slow

_REQ = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")


class NbdExport:
    """One volume served over NBD; its writes go to a journal it may share with the other
    volumes of a consistency group (``index``: its place in that journal), and so do the
    group commit and the ordered writer."""

    def __init__(self, name: str, fd: int, block_size: int, journal: ChangeJournal,
                 commit: GroupCommit, index: int = 0,
                 on_change: Callable[[], None] | None = None,
                 writer: OrderedWriter | None = None) -> None:
        self.name = name
        self.block_size = block_size
        self.fd = fd
        self.size = os.lseek(fd, 0, os.SEEK_END)
        self.journal = journal
        self.commit = commit
        self.writer = writer if writer is not None else OrderedWriter(journal.order)
        self.index = index
        self.on_change = on_change
        self.flags = (T_HAS_FLAGS | T_SEND_FLUSH | T_SEND_FUA | T_SEND_TRIM
                      | T_SEND_WRITE_ZEROES | T_CAN_MULTI_CONN)
        self.activity: ActivityLog | None = None  # the volume's (the capture agent sets it)

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
        writer = OrderedWriter(journal.order)
        return [cls(name, fd, block_size, journal, commit, i, on_change, writer)
                for i, ((name, _path), fd) in enumerate(zip(volumes, fds, strict=True))]

    def stop_io(self) -> None:
        """Let the writer's queued jobs finish and stop its thread and the sync thread (before
        the journal and the volume close)."""
        self.writer.close()
        self.commit.close()

    def close(self) -> None:
        self.stop_io()
        os.close(self.fd)

    def _whole_blocks(self, offset: int, data: bytes | bytearray | memoryview
                      ) -> tuple[int, bytes | bytearray | memoryview]:
        """``data`` at ``offset`` widened to whole blocks with the volume's current content."""
        bs = self.block_size
        start = offset - offset % bs
        end = min(self.size, -(-(offset + len(data)) // bs) * bs)
        if start == offset and end == offset + len(data):
            return offset, data
        merged = bytearray(os.pread(self.fd, end - start, start))
        merged[offset - start : offset - start + len(data)] = data
        return start, merged

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Journal then write (in arrival order: on the loop or the writer's thread). Returns
        the journal record number to wait for."""
        start, whole = self._whole_blocks(offset, data)
        self._log(start, len(whole))
        n = self.journal.write(start, whole, self.index)
        view = memoryview(whole)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], start + done)
        return n

    def _log(self, offset: int, length: int) -> None:
        """Before the volume is written (under the journal's order lock: a checkpoint begins
        under it too): the extents of [offset, offset + length) listed in the activity log."""
        al = self.activity
        if al is not None:
            bs = self.block_size
            al.ensure_blocks(offset // bs, -(-(offset % bs + length) // bs))

    def listed(self, offset: int, length: int) -> bool:
        """Would writing [offset, offset + length) leave the activity log as it is?"""
        al, bs = self.activity, self.block_size
        return al is None or al.listed(offset // bs, -(-(offset % bs + length) // bs))

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
            self._log(head, tail - head)
            n = self.journal.zero(head, tail - head, self.index)
            write_zeroes(self.fd, head, tail - head)
        if offset + length > tail:
            n = self.write(tail, bytes(offset + length - tail))
        return n


class WriteBarrier:
    """The write barrier of a planned switchover: while it is up, writes (and trims) wait
    unanswered; the connections holding some are told when it is lifted."""

    def __init__(self) -> None:
        self.up = False
        self._waiting: set[Transmission] = set()

    def hold(self, conn: Transmission) -> None:
        self._waiting.add(conn)

    def forget(self, conn: Transmission) -> None:
        self._waiting.discard(conn)

    def lift(self) -> None:
        self.up = False
        waiting, self._waiting = self._waiting, set()
        for conn in waiting:
            conn.barrier_lifted()


class BufferPool:
    """Payload buffers of large writes, reused: a fresh bytearray of 1 MiB costs a zero fill
    and its page faults each time. ``take(n)`` gives one of exactly n bytes (not zeroed: it is
    filled from the socket); ``give`` returns it once the write is journaled and made (from
    any thread)."""

    def __init__(self, keep: int = 8) -> None:
        self._lock = threading.Lock()
        self._free: dict[int, list[bytearray]] = {}
        self._keep = keep

    def take(self, n: int) -> bytearray:
        with self._lock:
            free = self._free.get(n)
            if free:
                return free.pop()
        return bytearray(n)

    def give(self, buf: bytearray) -> None:
        with self._lock:
            free = self._free.setdefault(len(buf), [])
            if len(free) < self._keep:
                free.append(buf)


def _preadv(fd: int, buf: bytearray, skip: int, offset: int) -> None:
    """Read the volume into ``buf`` after its first ``skip`` bytes (the reply header)."""
    view = memoryview(buf)
    done = skip
    while done < len(buf):
        got = os.preadv(fd, [view[done:]], offset + done - skip)
        if got == 0:
            break  # past the end of a shrunken file: the rest stays zero
        done += got


class Transmission(asyncio.BufferedProtocol):
    """One connection after the handshake. ``done`` resolves when it ends (the client
    disconnected, sent DISC and got its replies, or broke the protocol)."""

    def __init__(self, export: NbdExport, barrier: WriteBarrier, peer: object,
                 reads: set[asyncio.Future[None]]) -> None:
        self.ex = export
        self.barrier = barrier
        self.peer = peer
        self.reads = reads  # large reads running on threads (the server waits for them)
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.previous: asyncio.BaseProtocol | None = None
        self._buf = bytearray(RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._start = self._end = 0
        self._pool = BufferPool()
        self._direct: bytearray | None = None  # a large write's payload being received
        self._direct_got = 0
        self._direct_req = (0, 0)  # (handle, offset)
        self._skip = 0  # bytes of a refused write's payload still to drop
        self._inflight = 0  # bytes of requests not answered yet
        # requests waiting for the write barrier to lift: (cmd, handle, offset, length,
        # payload of a write)
        self._held: deque[tuple[int, int, int, int, bytes | bytearray | None]] = deque()
        self._paused_reading = False
        self._writes_blocked = False
        self._disc = False
        self._corked = False  # replies are gathered in _out and written together
        self._out: list[bytes | bytearray] = []

    # -- attaching ------------------------------------------------------------------------

    @classmethod
    async def serve(cls, export: NbdExport, r: asyncio.StreamReader, w: asyncio.StreamWriter,
                    barrier: WriteBarrier, reads: set[asyncio.Future[None]]) -> None:
        """Take over the connection of ``r``/``w`` (at the end of the handshake) until it
        ends."""
        proto = cls(export, barrier, w.get_extra_info("peername"), reads)
        transport = w.transport
        assert isinstance(transport, asyncio.Transport)
        if transport.is_closing():
            return
        export.commit.start(proto.loop)
        # Clients send no request before the handshake's last reply, but take any that came
        # (the stream's buffer: StreamReader has no public way to hand it over).
        leftover = bytes(getattr(r, "_buffer", b""))
        proto.previous = transport.get_protocol()
        proto.transport = transport
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        transport.set_protocol(proto)
        if leftover:
            proto._feed(leftover)
        await proto.done

    def _feed(self, data: bytes) -> None:
        pos = 0
        while pos < len(data) and not self.done.done():
            buf = self.get_buffer(len(data) - pos)
            k = min(len(buf), len(data) - pos)
            buf[:k] = data[pos : pos + k]
            pos += k
            self.buffer_updated(k)

    # -- asyncio.BufferedProtocol ---------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._direct is not None:
            return memoryview(self._direct)[self._direct_got:]
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._buf) - self._end < INLINE_IO + _REQ.size:  # room for a whole request
            n = self._end - self._start
            self._buf[:n] = self._buf[self._start : self._end]
            self._start, self._end = 0, n
        return self._view[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        if self._direct is not None:
            self._direct_got += nbytes
            if self._direct_got == len(self._direct):
                payload, self._direct = self._direct, None
                handle, offset = self._direct_req
                self._write(handle, offset, payload, owned=True)
                self._parse()
            return
        self._end += nbytes
        self._parse()

    def eof_received(self) -> bool | None:
        return None  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.barrier.forget(self)
        self._held.clear()
        if self.previous is not None:  # the stream's protocol: its writer's wait_closed()
            self.previous.connection_lost(exc)
            self.previous = None
        if exc is not None:
            log.debug("nbd client %s went away: %s", self.peer, exc)
        if not self.done.done():
            self.done.set_result(None)

    def pause_writing(self) -> None:
        self._writes_blocked = True
        self._flow()

    def resume_writing(self) -> None:
        self._writes_blocked = False
        self._flow()

    # -- requests -------------------------------------------------------------------------

    def _parse(self) -> None:
        corked, self._corked = self._corked, True  # the replies of these requests: at once
        try:
            while not self._disc and self._next():
                pass
        finally:
            if not corked:
                self._uncork()
        if self._start == self._end:
            self._start = self._end = 0
        self._flow()

    def _next(self) -> bool:
        """Take the next request from the buffer; False when more bytes are needed (or the
        session is ending)."""
        avail = self._end - self._start
        if self._skip:  # a refused write's payload, dropped as it arrives
            k = min(self._skip, avail)
            self._start += k
            self._skip -= k
            return not self._skip
        if avail < _REQ.size:
            return False
        magic, _flags, cmd, handle, offset, length = _REQ.unpack_from(self._buf, self._start)
        if magic != REQUEST_MAGIC:
            self._protocol_error("bad request magic")
            return False
        bad = EINVAL if length > MAX_REQUEST else ENOSPC if offset + length > self.ex.size else 0
        if cmd == CMD_WRITE and not bad:
            return self._take_write(handle, offset, length, avail)
        self._start += _REQ.size
        if cmd == CMD_WRITE:
            self._skip = length
            self._reply(handle, bad)
        elif cmd == CMD_DISC:  # answer what is in flight, then close
            self._disc = True
            if self.transport is not None:
                self.transport.pause_reading()
            return False
        elif bad:
            self._reply(handle, bad)
        else:
            self._command(cmd, handle, offset, length)
        return True

    def _take_write(self, handle: int, offset: int, length: int, avail: int) -> bool:
        at = self._start + _REQ.size
        have = avail - _REQ.size
        if have >= length:  # all here: journaled from the buffer (or copied for the thread)
            self._start = at + length
            self._write(handle, offset, self._view[at : at + length], owned=False)
            return True
        if length > INLINE_IO:  # its own buffer, filled straight from the socket
            payload = self._pool.take(length)
            payload[:have] = self._view[at : at + have]
            self._start = self._end
            self._direct, self._direct_got, self._direct_req = payload, have, (handle, offset)
        return False

    def _command(self, cmd: int, handle: int, offset: int, length: int) -> None:
        if cmd == CMD_READ:
            self._read(handle, offset, length)
        elif cmd == CMD_FLUSH:
            self._ordered(cmd, handle, self.ex.journal.flush, small=True)
        elif cmd in (CMD_TRIM, CMD_WRITE_ZEROES):
            if self.barrier.up or self._held:
                self._hold(cmd, handle, offset, length, None)
            else:
                self._ordered(cmd, handle, functools.partial(self.ex.zero, offset, length),
                              small=length <= INLINE_IO and self.ex.listed(offset, length))
        else:
            self._reply(handle, ENOTSUP)

    def _read(self, handle: int, offset: int, length: int) -> None:
        self._inflight += length
        buf = bytearray(_REPLY.size + length)
        _REPLY.pack_into(buf, 0, SIMPLE_REPLY_MAGIC, 0, handle)
        if length <= INLINE_IO:
            try:
                _preadv(self.ex.fd, buf, _REPLY.size, offset)
            except OSError as exc:
                self._failed(CMD_READ, handle, offset, length, exc)
                return
            self._send(buf, length)
            return
        fut = self.loop.run_in_executor(None, _preadv, self.ex.fd, buf, _REPLY.size, offset)
        self.reads.add(fut)

        def read(f: asyncio.Future[None]) -> None:
            self.reads.discard(f)
            exc = f.exception()
            if exc is not None:
                self._failed(CMD_READ, handle, offset, length, exc)
            else:
                self._send(buf, length)

        fut.add_done_callback(read)

    def _write(self, handle: int, offset: int, data: bytes | bytearray | memoryview,
               owned: bool) -> None:
        """``owned``: ``data`` is the request's own buffer, not a view of the receive buffer
        (which is reused once this returns)."""
        self._inflight += len(data)
        small = len(data) <= INLINE_IO and self.ex.listed(offset, len(data))
        if not owned and (self.barrier.up or self._held or not self.ex.writer.idle
                          or not small):
            data = bytes(data)  # kept past this call
        if self.barrier.up or self._held:
            assert not isinstance(data, memoryview)
            self._hold(CMD_WRITE, handle, offset, len(data), data)
            return
        self._ordered(CMD_WRITE, handle, functools.partial(self.ex.write, offset, data),
                      small=small, length=len(data),
                      buf=data if owned and isinstance(data, bytearray) else None)

    def _ordered(self, cmd: int, handle: int, job: Callable[[], int], small: bool,
                 length: int = 0, buf: bytearray | None = None) -> None:
        """Journal (and write) in arrival order, then reply once durable; ``buf``: the
        payload's buffer, back to the pool once the job is done."""
        commit = self.ex.commit
        done = functools.partial(self._durable, cmd, handle, length)

        if small and self.ex.writer.idle:
            try:
                n = self.ex.writer.run(job)
            except OSError as exc:
                done(exc)
                return
            commit.when_durable(n, done)
            return

        def then(result: int | Exception) -> None:  # on the writer's thread
            if buf is not None:
                self._pool.give(buf)
            if isinstance(result, Exception):
                self.loop.call_soon_threadsafe(done, result)
            else:
                commit.when_durable(result, done)

        self.ex.writer.submit(job, then)

    def _durable(self, cmd: int, handle: int, length: int, err: BaseException | None) -> None:
        if err is not None:
            self._failed(cmd, handle, 0, length, err)
            return
        if self.ex.on_change is not None and self.ex.journal.take_news():
            self.ex.on_change()  # a point opened or FLUSHed, an overflow, bitmap mode (a
            # write into an open point decides nothing: ChangeJournal.news)
        self._inflight -= length
        self._reply(handle, 0)

    # -- the write barrier ----------------------------------------------------------------

    def _hold(self, cmd: int, handle: int, offset: int, length: int,
              data: bytes | bytearray | None) -> None:
        self._held.append((cmd, handle, offset, length, data))
        self.barrier.hold(self)

    def barrier_lifted(self) -> None:
        """Run the held writes and trims, in order (unless the barrier went up again)."""
        while self._held and not self.barrier.up:
            cmd, handle, offset, length, data = self._held.popleft()
            if cmd == CMD_WRITE:
                assert data is not None
                self._ordered(cmd, handle, functools.partial(self.ex.write, offset, data),
                              small=length <= INLINE_IO, length=length)
            else:
                self._ordered(cmd, handle, functools.partial(self.ex.zero, offset, length),
                              small=length <= INLINE_IO)
        if self._held:
            self.barrier.hold(self)

    # -- replies --------------------------------------------------------------------------

    def _failed(self, cmd: int, handle: int, offset: int, length: int,
                exc: BaseException) -> None:
        log.error("nbd: %s at %d+%d failed: %s", cmd, offset, length, exc)
        self._inflight -= length
        self._reply(handle, EIO)

    def _reply(self, handle: int, error: int) -> None:
        self._send(_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle), 0)

    def _send(self, data: bytes | bytearray, answered: int) -> None:
        """Write a whole reply; ``answered``: bytes of the request it ends (reads). While a
        batch of requests is parsed or a group commit's replies go out, small replies are
        gathered and written in one system call at its end."""
        self._inflight -= answered
        if len(data) <= INLINE_IO + _REPLY.size:
            if not self._corked and self.ex.commit.delivering:
                self._corked = True
                self.ex.commit.after_delivery(self._uncork)
            if self._corked:
                self._out.append(data)
                return
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(data)
        self._flow()

    def _uncork(self) -> None:
        self._corked = False
        out, self._out = self._out, []
        t = self.transport
        if out and t is not None and not t.is_closing():
            t.write(out[0] if len(out) == 1 else b"".join(out))
        self._flow()

    def _flow(self) -> None:
        """Stop reading while too much is unanswered or the client does not read; end the
        session after DISC once every request is answered."""
        t = self.transport
        if t is None or t.is_closing():
            return
        if self._disc:
            if self._inflight <= 0 and not self._held:
                t.close()
            return
        stop = self._writes_blocked or self._inflight > MAX_INFLIGHT
        if stop != self._paused_reading:
            self._paused_reading = stop
            if stop:
                t.pause_reading()
            else:
                t.resume_reading()

    def _protocol_error(self, why: str) -> None:
        log.warning("nbd client %s: protocol error: %s", self.peer, why)
        self._disc = True
        if self.transport is not None:
            self.transport.abort()
