"""The NBD export's per-request path (replicator/capture/nbdio.py, commit.py), in process: a
raw client pipelines requests and matches the replies by handle."""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from replicator.capture import nbdio
from replicator.capture.journal import ChangeJournal
from replicator.capture.nbd import NbdExport, NbdServer

BS = 4096
SIZE = 4 << 20
REQ = struct.Struct(">IHHQQI")
REPLY = struct.Struct(">IIQ")
READ, WRITE, DISC, FLUSH, TRIM = 0, 1, 2, 3, 4


class Client:
    """Requests without waiting for replies; ``replies`` collects them by handle."""

    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.r, self.w = r, w
        self.handle = 0
        self.reads: dict[int, int] = {}  # handle -> length of a read

    @classmethod
    async def connect(cls, port: int) -> Client:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        await r.readexactly(18)
        w.write(struct.pack(">I", 3))
        name = b"v"
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        w.write(struct.pack(">QII", 0x49484156454F5054, 7, len(data)) + data)
        while True:
            _m, _o, rtype, length = struct.unpack(">QIII", await r.readexactly(20))
            await r.readexactly(length)
            if rtype == 1:
                return cls(r, w)

    def send(self, cmd: int, offset: int, length: int, data: bytes = b"",
             magic: int = 0x25609513) -> int:
        self.handle += 1
        if cmd == READ:
            self.reads[self.handle] = length
        self.w.write(REQ.pack(magic, 0, cmd, self.handle, offset, length) + data)
        return self.handle

    async def reply(self, timeout: float = 10.0) -> tuple[int, int, bytes]:
        """(handle, error, data of a read)."""
        magic, error, handle = REPLY.unpack(await asyncio.wait_for(
            self.r.readexactly(REPLY.size), timeout))
        assert magic == 0x67446698
        n = self.reads.pop(handle, 0)
        if error:
            n = 0  # an error reply carries no data
        return handle, error, await self.r.readexactly(n) if n else b""

    async def replies(self, n: int) -> dict[int, tuple[int, bytes]]:
        out = {}
        for _ in range(n):
            handle, error, data = await self.reply()
            out[handle] = (error, data)
        return out


Connect = Callable[[], Awaitable[Client]]


@pytest.fixture
async def export(tmp_path: str) -> AsyncIterator[tuple[NbdServer, NbdExport, Connect]]:
    vol = os.path.join(tmp_path, "vol.img")
    with open(vol, "wb") as fh:
        fh.write(os.urandom(SIZE))
    (ex,) = NbdExport.open_group([("v", vol)], os.path.join(tmp_path, "journal"), BS)
    server = NbdServer([ex])
    port = await server.start("127.0.0.1", 0)
    clients: list[Client] = []

    async def connect() -> Client:
        clients.append(await Client.connect(port))
        return clients[-1]

    try:
        yield server, ex, connect
    finally:
        for c in clients:
            c.w.close()
            with contextlib.suppress(ConnectionError):
                await c.w.wait_closed()
        await server.close()
        ex.journal.close()
        ex.close()


def _volume(ex: NbdExport) -> bytes:
    return os.pread(ex.fd, ex.size, 0)


async def test_pipelined_requests_reach_volume_and_journal_in_arrival_order(
        export: tuple[NbdServer, NbdExport, Connect]) -> None:
    """Small writes (done on the loop), large ones (received into their own buffer, done on
    the writer's thread), unaligned ones (merged), trims and a flush, all in flight at once
    and overlapping: the volume and the journal's points end with the last of each, and
    every request is answered."""
    _server, ex, connect = export
    model = bytearray(_volume(ex))
    c = await connect()
    sent = 0
    for i in range(40):
        if i % 5 == 0:
            off, data = (i * 7 * BS) % (SIZE - (1 << 20)), os.urandom(1 << 20)
        elif i % 5 == 1:
            off, data = (i * 13 * BS + 100) % (SIZE - BS), os.urandom(3000)
        elif i % 5 == 2:
            off, data = 0, bytes([i]) * BS  # block 0, rewritten over and over
        else:
            off, data = (i * 3 * BS) % SIZE, os.urandom(BS * (i % 3 + 1))
        c.send(WRITE, off, len(data), data)
        model[off : off + len(data)] = data
        sent += 1
        if i % 9 == 8:
            c.send(TRIM, 5 * BS, 2 * BS)
            model[5 * BS : 7 * BS] = bytes(2 * BS)
            sent += 1
    c.send(FLUSH, 0, 0)
    got = await c.replies(sent + 1)
    assert all(err == 0 for err, _ in got.values())
    assert _volume(ex) == model
    c.send(READ, 0, 1 << 20)
    c.send(READ, 100, 5000)
    got = await c.replies(2)
    assert got[c.handle - 1] == (0, bytes(model[: 1 << 20]))
    assert got[c.handle] == (0, bytes(model[100:5100]))
    blocks: dict[int, bytes | None] = {}
    for point in ex.journal.extract():
        blocks.update({k: bytes(v) if v is not None else None for k, v in point.blocks.items()})
    for b, content in blocks.items():
        assert (content or bytes(BS)) == model[b * BS : (b + 1) * BS], b


async def test_the_shipper_is_woken_once_per_point_not_per_write(
        export: tuple[NbdServer, NbdExport, Connect]) -> None:
    _server, ex, connect = export
    woken = 0

    def wake() -> None:
        nonlocal woken
        woken += 1

    ex.on_change = wake
    c = await connect()
    for i in range(8):  # one point opened, then written into
        c.send(WRITE, i * BS, BS, bytes([i]) * BS)
    assert all(err == 0 for err, _ in (await c.replies(8)).values())
    assert woken == 1
    ex.journal.cut()  # the shipper's own cut: it knows
    for cmd in (WRITE, FLUSH, WRITE):  # one at a time
        c.send(cmd, 0, BS if cmd == WRITE else 0, bytes(BS) if cmd == WRITE else b"")
        assert (await c.replies(1))[c.handle][0] == 0
    assert woken == 4  # a point opened, closed by the FLUSH, the next one opened
    for i in range(3):  # the same news answered together (one sync): one wake-up for them
        c.send(WRITE, i * BS, BS, bytes(BS))
        c.send(FLUSH, 0, 0)
    assert all(err == 0 for err, _ in (await c.replies(6)).values())
    assert 5 <= woken <= 7


async def test_no_write_is_answered_before_its_journal_record_is_durable(
        export: tuple[NbdServer, NbdExport, Connect], monkeypatch: pytest.MonkeyPatch) -> None:
    """Nor a large one (kept by reference, not copied into the journal) before its volume
    write is synced."""
    _server, ex, connect = export
    journal = ex.journal
    durable = [0]  # the record clock when the last finished sync started
    record: dict[int, int] = {}  # offset -> the record number of its write
    volume_syncs = [0]  # volume syncs started
    before: dict[int, int] = {}  # offset -> volume syncs started when its volume write ended
    sync, write = ChangeJournal.sync, ChangeJournal.write
    sync_volumes, ex_write = ChangeJournal._sync_volumes, NbdExport.write

    def slow_sync(self: ChangeJournal, upto: int | None = None) -> None:
        at = self.seq
        threading.Event().wait(0.01)
        sync(self, upto)
        durable[0] = max(durable[0], at)

    def noted_write(self: ChangeJournal, offset: int, data: bytes, vol: int = 0) -> int:
        n = write(self, offset, data, vol)
        record[offset] = n
        return n

    def counted_sync_volumes(self: ChangeJournal, vols: Any = None) -> None:
        volume_syncs[0] += 1
        sync_volumes(self, vols)

    def noted_ex_write(self: NbdExport, offset: int, data: bytes) -> int:
        n = ex_write(self, offset, data)
        before[offset] = volume_syncs[0]
        return n

    monkeypatch.setattr(ChangeJournal, "sync", slow_sync)
    monkeypatch.setattr(ChangeJournal, "write", noted_write)
    monkeypatch.setattr(ChangeJournal, "_sync_volumes", counted_sync_volumes)
    monkeypatch.setattr(NbdExport, "write", noted_ex_write)
    c = await connect()
    offsets = {}
    for i in range(30):
        size = (1 << 20) if i % 10 == 0 else BS
        off = i * 32 * BS
        offsets[c.send(WRITE, off, size, os.urandom(size))] = off
        if i % 4 == 0:
            await asyncio.sleep(0.003)
    for _ in range(30):
        handle, error, _data = await c.reply()
        assert error == 0
        off = offsets[handle]
        assert record[off] <= durable[0]
        if off % (320 * BS) == 0:  # the 1 MiB writes
            assert volume_syncs[0] > before[off]
    assert journal.seq >= 30
    assert journal.ref_bytes == 3 << 20  # the large writes were kept, not journaled
    assert journal.size < 1 << 20
    after = volume_syncs[0]
    for i in range(5):  # small writes after them: their syncs leave the volume alone
        c.send(WRITE, (1000 + i) * BS, BS, os.urandom(BS))
        assert (await c.reply())[1] == 0
    assert volume_syncs[0] == after


async def test_writers_in_flight_share_syncs_and_the_loop_never_waits_for_one(
        export: tuple[NbdServer, NbdExport, Connect], monkeypatch: pytest.MonkeyPatch) -> None:
    """The journal's syncs run on the sync thread only (the loop goes on shipping while the
    disk works), and writes in flight together share them."""
    _server, _ex, connect = export
    syncs: list[bool] = []  # on the loop's thread?
    loop_thread = threading.get_ident()
    sync = ChangeJournal.sync

    def counted_sync(self: ChangeJournal, upto: int | None = None) -> None:
        syncs.append(threading.get_ident() == loop_thread)
        threading.Event().wait(0.005)
        sync(self, upto)

    monkeypatch.setattr(ChangeJournal, "sync", counted_sync)
    c = await connect()
    for i in range(5):  # one at a time: a sync each
        c.send(WRITE, i * BS, BS, os.urandom(BS))
        assert (await c.reply())[1] == 0
    assert syncs == [False] * 5
    syncs.clear()
    for i in range(64):  # all in flight: grouped
        c.send(WRITE, i * BS, BS, os.urandom(BS))
    assert all(err == 0 for err, _ in (await c.replies(64)).values())
    assert 0 < len(syncs) < 32 and not any(syncs)


async def test_a_large_write_does_not_hold_up_a_read_behind_it(
        export: tuple[NbdServer, NbdExport, Connect], monkeypatch: pytest.MonkeyPatch) -> None:
    _server, ex, connect = export
    write = NbdExport.write
    loop_thread = threading.get_ident()
    threads: list[bool] = []

    def slow_write(self: NbdExport, offset: int, data: bytes) -> int:
        threads.append(threading.get_ident() == loop_thread)
        if len(data) > nbdio.INLINE_IO:
            threading.Event().wait(0.3)
        return write(self, offset, data)

    monkeypatch.setattr(NbdExport, "write", slow_write)
    c = await connect()
    big = c.send(WRITE, 0, 2 << 20, os.urandom(2 << 20))
    small = c.send(WRITE, 3 << 20, BS, b"\x01" * BS)  # ordered after the large one
    read = c.send(READ, 3 << 20, BS)
    first = await c.reply()
    assert first[0] == read  # the read was answered while the large write was being made
    rest = await c.replies(2)
    assert set(rest) == {big, small} and all(e == 0 for e, _ in rest.values())
    assert threads == [False, False]  # the small write queued behind the large one
    assert os.pread(ex.fd, BS, 3 << 20) == b"\x01" * BS


async def test_the_write_barrier_holds_writes_and_trims_in_order_and_lets_reads_pass(
        export: tuple[NbdServer, NbdExport, Connect]) -> None:
    server, ex, connect = export
    c = await connect()
    server.hold_writes()
    assert server.barrier
    w1 = c.send(WRITE, 0, BS, b"\x01" * BS)
    t1 = c.send(TRIM, 0, BS)
    w2 = c.send(WRITE, 0, BS, b"\x02" * BS)
    r = c.send(READ, BS, BS)
    first = await c.reply()
    assert first[0] == r
    with pytest.raises(TimeoutError):
        await c.reply(timeout=0.3)
    before = ex.journal.seq
    server.release_writes()
    got = await c.replies(3)
    assert set(got) == {w1, t1, w2} and all(e == 0 for e, _ in got.values())
    assert os.pread(ex.fd, BS, 0) == b"\x02" * BS and ex.journal.seq > before


async def test_refused_requests_leave_the_session_usable(
        export: tuple[NbdServer, NbdExport, Connect], monkeypatch: pytest.MonkeyPatch) -> None:
    _server, ex, connect = export
    monkeypatch.setattr(nbdio, "MAX_REQUEST", 64 << 10)
    c = await connect()
    past = c.send(WRITE, SIZE - BS, 2 * BS, b"\x09" * (2 * BS))  # past the end: ENOSPC
    big = c.send(WRITE, 0, 128 << 10, b"\x08" * (128 << 10))  # too large: EINVAL
    ok = c.send(WRITE, BS, BS, b"\x07" * BS)  # after the dropped payloads
    got = await c.replies(3)
    assert got[past][0] == 28 and got[big][0] == 22 and got[ok][0] == 0
    assert os.pread(ex.fd, BS, BS) == b"\x07" * BS
    assert os.pread(ex.fd, BS, 0) != b"\x08" * BS


async def test_disc_answers_what_is_in_flight_then_closes(
        export: tuple[NbdServer, NbdExport, Connect]) -> None:
    _server, ex, connect = export
    c = await connect()
    handles = {c.send(WRITE, i * BS, BS, bytes([i + 1]) * BS) for i in range(8)}
    handles.add(c.send(WRITE, 1 << 20, 1 << 20, b"\x05" * (1 << 20)))
    c.send(DISC, 0, 0)
    got = await c.replies(len(handles))
    assert set(got) == handles and all(e == 0 for e, _ in got.values())
    assert await asyncio.wait_for(c.r.read(), 5) == b""
    assert os.pread(ex.fd, BS, 7 * BS) == b"\x08" * BS


@pytest.mark.parametrize("damage", [
    lambda c: c.send(WRITE, 0, BS, bytes(BS), magic=0x12345678),
    lambda c: c.w.write(b"\x00" * 100),
])
async def test_a_broken_request_ends_the_session(
        export: tuple[NbdServer, NbdExport, Connect], damage: Callable[[Client], object]) -> None:
    _server, _ex, connect = export
    c = await connect()
    damage(c)
    assert await asyncio.wait_for(c.r.read(), 5) == b""
