"""The source's change journal: consistency points, release, overflow to a bitmap, replay."""

from __future__ import annotations

import os
import threading

import pytest

from drctl.files import SMALL_SYNC, WRITE_AHEAD
from replicator.capture.journal import ChangeJournal
from replicator.capture.journal_records import HEAD, KIND_WRITE, record

BS = 4096


def _journal(tmp_path: object, size: int = 64 * BS, limit: int = 1 << 30) -> ChangeJournal:
    vol = os.path.join(str(tmp_path), "vol.img")
    if not os.path.exists(vol):
        with open(vol, "wb") as fh:
            fh.truncate(size)
    fd = os.open(vol, os.O_RDWR)
    return ChangeJournal(os.path.join(str(tmp_path), "journal"), BS, fd, limit)


def _records_bytes(path: str) -> int:
    """How far the journal file's records reach (the file is written with zeroes past them:
    a replay stops at the first header that is not a record)."""
    with open(path, "rb") as fh:
        raw = fh.read()
    pos = 0
    while pos + HEAD.size <= len(raw):
        kind, offset, length, _check = HEAD.unpack_from(raw, pos)
        end = pos + HEAD.size + (length if kind == KIND_WRITE else 0)
        if end > len(raw) or record(kind, offset, length, raw[pos + HEAD.size:end]) \
                != raw[pos:end]:
            break
        pos = end
    return pos


def _write(j: ChangeJournal, block: int, byte: int, blocks: int = 1) -> None:
    data = bytes([byte]) * (BS * blocks)
    j.write(block * BS, data)
    os.pwrite(j.fds[0], data, block * BS)


def test_points_close_at_flush_and_cut_and_keep_each_blocks_last_content(tmp_path: object
                                                                         ) -> None:
    j = _journal(tmp_path)
    _write(j, 1, 0xA1)
    _write(j, 1, 0xA2)  # rewritten inside the point: shipped once, last content
    j.zero(2 * BS, 2 * BS)
    j.flush()
    _write(j, 5, 0xB1, blocks=2)
    assert not any(p.cp == 2 for p in j.closed)  # still open
    cut = j.cut()
    points = j.extract()
    assert [p.cp for p in points] == [1, cut] == [1, 2]
    assert points[0].blocks == {1: b"\xa2" * BS, 2: None, 3: None}
    assert points[1].blocks == {5: b"\xb1" * BS, 6: b"\xb1" * BS}
    assert j.extract() == []  # each point is extracted once
    assert j.first_dirty_at is not None
    j.release(2)
    assert j.first_dirty_at is None and not j.closed


def test_a_flush_with_nothing_new_makes_no_point(tmp_path: object) -> None:
    j = _journal(tmp_path)
    j.flush()
    assert not j.closed and j.next_cp == 1
    _write(j, 0, 1)
    j.flush()
    j.flush()
    assert [p.cp for p in j.closed] == [1]


def test_the_shipper_hears_of_points_not_of_every_write(tmp_path: object) -> None:
    """take_news: a point opened, a client FLUSH that closed one, an overflow, every change in
    bitmap mode; not a write into an open point, an empty FLUSH or the shipper's own cut."""
    j = _journal(tmp_path, limit=40 * BS)
    assert not j.take_news()
    _write(j, 0, 1)
    assert j.take_news() and not j.take_news()  # read once
    _write(j, 1, 1)
    _write(j, 0, 2)
    assert not j.take_news()  # into the open point
    j.cut()
    assert not j.take_news()  # the shipper's own
    _write(j, 2, 1)
    assert j.take_news()
    j.flush()
    assert j.take_news()  # a client FLUSH closed it
    j.flush()
    assert not j.take_news()  # nothing to close
    _write(j, 3, 1, blocks=40)  # past the limit: bitmap mode
    assert j.overflowed and j.take_news()
    _write(j, 50, 1)
    assert j.take_news()  # each change in bitmap mode
    j.close()


def test_replay_after_a_crash_redoes_writes_and_lists_them_dirty(tmp_path: object) -> None:
    j = _journal(tmp_path)
    j.write(3 * BS, b"\x33" * BS)  # journaled, never written to the volume (crash)
    j.flush()
    _write(j, 4, 0x44)
    os.close(j.fd)
    vol_fd = j.fds[0]
    j2 = ChangeJournal(j.path, BS, vol_fd)
    assert os.pread(vol_fd, BS, 3 * BS) == b"\x33" * BS
    assert j2.dirty == {3, 4} and j2.replayed == 2
    assert j2.next_cp == 2  # the numbering goes on after point 1
    assert j2.begin_resync() == {3, 4}
    j2.end_resync({3, 4})
    assert j2.first_dirty_at is None


def test_a_torn_tail_is_cut_off(tmp_path: object) -> None:
    j = _journal(tmp_path)
    _write(j, 1, 0x11)
    size = _records_bytes(j.path)
    j.write(2 * BS, b"\x22" * BS)
    os.truncate(j.path, size + 100)  # the second record half written
    j2 = ChangeJournal(j.path, BS, j.fds[0])
    assert j2.dirty == {1}


def test_a_sync_writes_space_ahead_that_appends_fill_without_growing_the_file(
        tmp_path: object) -> None:
    """After a sync the file is written (zeroes) past its last record; the next records are
    written into that space, the file's size unchanged; a replay stops at the zeroes, and at
    a record torn inside that space, as at the end of a file."""
    j = _journal(tmp_path)
    _write(j, 1, 0x11)
    j.sync()
    grown = os.path.getsize(j.path)
    assert grown >= _records_bytes(j.path) + WRITE_AHEAD // 2
    with open(j.path, "rb") as fh:
        assert fh.read()[_records_bytes(j.path):] == bytes(grown - _records_bytes(j.path))
    _write(j, 2, 0x22)
    j.flush()
    assert os.path.getsize(j.path) == grown  # written into the space, nothing appended
    j2 = ChangeJournal(j.path, BS, j.fds[0])
    assert j2.dirty == {1, 2} and j2.next_cp == 2
    assert os.pread(j.fds[0], BS, 2 * BS) == b"\x22" * BS
    j2.sync()
    at = _records_bytes(j2.path)
    _write(j2, 3, 0x33)
    with open(j2.path, "r+b") as fh:  # the record half written, the space after it zeroes
        fh.seek(at + 100)
        fh.write(bytes(BS))
    j3 = ChangeJournal(j2.path, BS, j2.fds[0])
    assert j3.dirty == {1, 2}


def test_no_space_is_written_ahead_while_syncs_cover_much(tmp_path: object) -> None:
    """Writing zeroes first would double the bytes of a stream of larger writes, whose syncs
    the metadata hardly slows: while a sync covers SMALL_SYNC or more, the file grows."""
    j = _journal(tmp_path, size=512 * BS)
    for rnd in range(3):
        for b in range(0, SMALL_SYNC // BS + 8, 16):  # 64 KiB writes, by copy
            _write(j, b, 0x40 + rnd, blocks=16)
        j.sync()
        assert os.path.getsize(j.path) == _records_bytes(j.path) == j.size
    _write(j, 1, 0x98)
    j.sync(periodic=True)  # the checkpoint's: covers little, says nothing of the writes
    assert os.path.getsize(j.path) == j.size
    _write(j, 1, 0x99)
    j.sync()  # small again
    assert os.path.getsize(j.path) >= j.size + WRITE_AHEAD // 2


def test_overflow_folds_unreleased_writes_into_the_bitmap_and_resync_returns_them(
        tmp_path: object) -> None:
    j = _journal(tmp_path, limit=6 * BS)
    _write(j, 1, 1)
    j.flush()
    in_flight = j.extract()  # shipped, not yet acknowledged
    _write(j, 2, 2)
    _write(j, 3, 3, blocks=4)  # past the limit: bitmap mode
    assert j.overflowed and j.overflows == 1
    assert j.dirty == {1, 2, 3, 4, 5, 6}
    assert _records_bytes(j.path) < 2 * BS  # DIRTY records only, no data
    _write(j, 9, 9)  # in bitmap mode: a DIRTY record
    assert 9 in j.dirty and not j.closed
    j.release(in_flight[-1].cp)  # the old point's ack changes nothing now
    blocks = j.begin_resync()
    assert blocks == {1, 2, 3, 4, 5, 6, 9} and not j.overflowed
    _write(j, 7, 7)  # journaled with data again
    end = j.cut()
    assert [p.cp for p in j.extract(end)] == [end]
    j.release(end)
    assert j.first_dirty_at is not None  # the resync is not committed yet
    j.end_resync(blocks)
    assert j.first_dirty_at is None
    # a crash now keeps nothing to resend: the rewritten journal has no records left
    j2 = ChangeJournal(j.path, BS, j.fds[0])
    assert j2.dirty == set()


def test_release_rewrites_the_journal_keeping_unreleased_points(tmp_path: object) -> None:
    import replicator.capture.journal as mod

    j = _journal(tmp_path, size=4096 * BS)
    old = mod.REWRITE_BYTES
    mod.REWRITE_BYTES = 8 * BS
    try:
        for b in range(10):
            _write(j, b, b + 1)
            j.flush()
        _write(j, 100, 0xEE)  # open point
        j.release(9)
        assert _records_bytes(j.path) < 3 * BS
        j.flush()
        pts = j.extract()
        assert [p.cp for p in pts] == [10, 11]
        assert pts[0].blocks == {9: bytes([10]) * BS}
        assert pts[1].blocks == {100: b"\xee" * BS}
    finally:
        mod.REWRITE_BYTES = old


def test_points_closed_before_a_resync_survive_its_rewrite(tmp_path: object) -> None:
    """Clients write and flush while the agent starts; the start-up resync must keep those
    points (a rewrite that dropped their records left stale offsets: garbage batches)."""
    j = _journal(tmp_path)
    _write(j, 1, 0x11)
    j.flush()
    _write(j, 2, 0x22)  # still open
    blocks = j.begin_resync()
    _write(j, 3, 0x33)
    end = j.cut()
    pts = j.extract(end)
    assert [p.cp for p in pts] == [1, 2]
    assert pts[0].blocks == {1: b"\x11" * BS}
    assert pts[1].blocks == {2: b"\x22" * BS, 3: b"\x33" * BS}
    j.release(end)
    j.end_resync(blocks)
    assert j.first_dirty_at is None


def test_a_replay_counts_only_what_the_target_did_not_acknowledge(tmp_path: object) -> None:
    """Released points are recorded in the journal: after a crash (no rewrite in between),
    only the writes of points the target never acknowledged are dirty, which is what a
    demoted old primary sets aside and reports."""
    j = _journal(tmp_path)
    _write(j, 1, 0xA1)
    _write(j, 2, 0xA2)
    first = j.cut()
    j.extract()
    j.release(first)  # acknowledged by the target
    _write(j, 3, 0xB1)
    second = j.cut()
    j.extract()  # shipped, never acknowledged
    _write(j, 4, 0xC1)  # open point
    j.zero(5 * BS, BS)
    j.close()
    again = _journal(tmp_path)
    assert again.dirty == {3, 4, 5}
    assert again.released_cp == first and second == first + 1
    again.close()
    # and once more: the rewritten journal keeps exactly that set
    third = _journal(tmp_path)
    assert third.dirty == {3, 4, 5}
    third.close()


@pytest.mark.parametrize("ahead", [False, True])
def test_compaction_off_the_loop_keeps_points_appended_while_it_copies(
        tmp_path: object, monkeypatch: object, ahead: bool) -> None:
    """The stream's compaction copies the unreleased records and fsyncs the copy without the
    lock; records appended meanwhile are carried over at the swap, offsets stay right, and a
    replay of the compacted journal lists exactly the unacknowledged blocks. ``ahead``: syncs
    covered little, so the new file has space written ahead, and the records appended
    meanwhile go before it, where a replay reads them."""
    import replicator.capture.journal as mod

    j = _journal(tmp_path, size=4096 * BS)
    monkeypatch.setattr(mod, "REWRITE_BYTES", 8 * BS)  # type: ignore[attr-defined]
    for b in range(10):
        _write(j, b, b + 1)
        j.cut()
    if ahead:
        j.sync()
        assert j.ahead.on
    j.extract()
    _write(j, 100, 0xEE)  # open point
    assert j.release(8, inline=False)  # asks for a compaction, does not rewrite
    size_before = _records_bytes(j.path)
    real_fsync = os.fsync
    me = threading.get_ident()
    hits: list[int] = []

    def fsync_while_clients_write(fd: int) -> None:  # phase 1: appends go on meanwhile
        if threading.get_ident() == me and not hits:  # not another test's leftover thread
            hits.append(fd)
            _write(j, 101, 0xEF)
            j.cut()
            _write(j, 102, 0xF0)
        real_fsync(fd)

    monkeypatch.setattr(mod.os, "fsync", fsync_while_clients_write)  # type: ignore[attr-defined]
    assert j.compact()
    monkeypatch.setattr(mod.os, "fsync", real_fsync)  # type: ignore[attr-defined]
    assert hits
    assert _records_bytes(j.path) < size_before
    if ahead:  # the new file's zeroes follow the records carried over at the swap
        assert os.path.getsize(j.path) >= _records_bytes(j.path) + WRITE_AHEAD // 2
        assert _records_bytes(j.path) == j.size
    pts = j.extract()
    assert [p.cp for p in pts] == [11]
    assert pts[0].blocks == {100: b"\xee" * BS, 101: b"\xef" * BS}
    j.release(10)  # point 10 (block 9) acknowledged after the compaction
    j.close()
    again = _journal(tmp_path, size=4096 * BS)
    assert again.dirty == {100, 101, 102}
    assert again.released_cp == 10
    again.close()


def test_a_compaction_gives_up_when_the_journal_is_rewritten_meanwhile(
        tmp_path: object, monkeypatch: object) -> None:
    import replicator.capture.journal as mod

    j = _journal(tmp_path)
    _write(j, 1, 1)
    j.cut()
    j.extract()
    real_fsync = os.fsync
    me = threading.get_ident()

    def resync_meanwhile(fd: int) -> None:
        if threading.get_ident() == me:  # not another test's leftover thread
            monkeypatch.setattr(mod.os, "fsync", real_fsync)  # type: ignore[attr-defined]
            j.begin_resync()  # rewrites the journal
        real_fsync(fd)

    monkeypatch.setattr(mod.os, "fsync", resync_meanwhile)  # type: ignore[attr-defined]
    assert not j.compact()
    monkeypatch.setattr(mod.os, "fsync", real_fsync)  # type: ignore[attr-defined]
    assert not os.path.exists(j.path + ".compact")
    assert [p.cp for p in j.closed] == [1]


def test_requeue_extracts_unacknowledged_points_again(tmp_path: object) -> None:
    j = _journal(tmp_path)
    _write(j, 1, 0x11)
    j.cut()
    _write(j, 2, 0x22)
    j.cut()
    assert [p.cp for p in j.extract()] == [1, 2]
    j.release(1)
    j.requeue()  # the stream failed before point 2 was acknowledged
    pts = j.extract()
    assert [p.cp for p in pts] == [2] and pts[0].blocks == {2: b"\x22" * BS}


def test_the_sync_after_a_rewrite_makes_its_rename_durable(tmp_path: object,
                                                          monkeypatch: object) -> None:
    """A write appended to the rewritten file is acknowledged only after the directory that
    holds the rename was fsynced (else a crash could bring the older file back without it)."""
    import replicator.capture.journal as mod

    synced: list[str] = []
    monkeypatch.setattr(mod, "fsync_dir", synced.append)  # type: ignore[attr-defined]
    j = _journal(tmp_path)
    j.sync()  # the journal's start rewrites it once
    synced.clear()
    _write(j, 1, 0xA1)
    j.flush()
    j.sync()
    assert synced == []  # no rename since
    (point,) = j.extract()
    j.release(point.cp, inline=True)
    assert j.compact()
    _write(j, 2, 0xB1)  # lands in the new file only
    j.sync()
    assert synced == [str(tmp_path)]
    j.sync()
    assert synced == [str(tmp_path)]  # once per rename
    j.begin_resync()  # another rewrite
    j.sync()
    assert len(synced) == 2


def test_a_small_limit_holds_on_a_healthy_link(tmp_path: object) -> None:
    """--journal-limit below 8 MiB: released records leave the file in steps of an eighth of
    the limit, so a link that keeps up never overflows and the file stays near the limit (its
    records; the file holds up to WRITE_AHEAD more, written ahead: each point is synced)."""
    limit = 512 << 10
    j = _journal(tmp_path, size=256 * BS, limit=limit)
    biggest = biggest_file = 0
    for i in range(160):  # 10 MiB written in points of 64 KiB, each acknowledged
        _write(j, (i * 16) % 240, i & 0xFF, blocks=16)
        j.flush()
        j.sync()
        for point in j.extract():
            if j.release(point.cp, inline=False):
                assert j.compact()
        biggest = max(biggest, _records_bytes(j.path))
        biggest_file = max(biggest_file, os.path.getsize(j.path))
    assert j.overflows == 0
    assert biggest <= limit + limit // 8 + 64 * BS, biggest
    assert biggest_file <= limit + limit // 8 + 64 * BS + WRITE_AHEAD, biggest_file


def test_records_leave_the_journal_only_after_the_volume_is_synced(tmp_path: object,
                                                                   monkeypatch: object) -> None:
    """A write's journal record is its durable copy until the volume is synced: a rewrite
    that drops released records syncs the volume first (else a power loss could lose on the
    primary what the replica holds)."""
    import replicator.capture.journal as mod

    events: list[str] = []
    real_fdatasync, real_replace = os.fdatasync, os.replace
    j = _journal(tmp_path)
    vol_fd = j.fds[0]

    def fdatasync(fd: int) -> None:
        if fd == vol_fd:
            events.append("volume synced")
        real_fdatasync(fd)

    def replace(src: str, dst: str) -> None:
        events.append("journal replaced")
        real_replace(src, dst)

    monkeypatch.setattr(mod.os, "fdatasync", fdatasync)  # type: ignore[attr-defined]
    monkeypatch.setattr(mod.os, "replace", replace)  # type: ignore[attr-defined]
    for inline in (False, True):
        events.clear()
        _write(j, 1, 0xA1)
        j.flush()
        (point,) = j.extract()
        if j.release(point.cp, inline=inline) or not inline:
            assert j.compact()
        if inline and "journal replaced" not in events:
            j.begin_resync()  # an inline rewrite of the tail
        assert "journal replaced" in events, events
        assert "volume synced" in events[:events.index("journal replaced")], events


def test_a_failed_append_leaves_no_torn_record(tmp_path: object,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk in the middle of an append: the error goes up (the client gets it, nothing
    is acknowledged) and the partial record is cut off, so the writes journaled after it are
    replayed and extracted whole."""
    import replicator.capture.journal as mod

    mp = monkeypatch
    j = _journal(tmp_path)
    _write(j, 1, 0xA1)
    real = os.pwritev

    def full(fd: int, bufs: list[bytes], offset: int) -> int:
        real(fd, [bytes(bufs[0])[:10]], offset)  # a piece of the header reaches the file
        raise OSError(28, "No space left on device")

    mp.setattr(mod.os, "pwritev", full)
    with pytest.raises(OSError):
        j.write(2 * BS, b"\x77" * BS)
    mp.setattr(mod.os, "pwritev", real)
    _write(j, 3, 0xC3)
    j.flush()
    assert [p.blocks for p in j.extract()] == [{1: b"\xa1" * BS, 3: b"\xc3" * BS}]
    j.close()
    again = _journal(tmp_path)  # the replay reads every record after the failed one
    assert 3 in again.unacknowledged(range(64))
    again.close()


def test_a_cut_after_an_overflow_is_none_not_a_crash(tmp_path: object) -> None:
    """The shipper cuts while the export's writer thread may overflow the journal at any
    moment: try_cut checks under the lock and says None instead of raising."""
    j = _journal(tmp_path, limit=4 * BS)
    for b in range(8):
        _write(j, b, b + 1)
    assert j.overflowed
    assert j.try_cut() is None
    with pytest.raises(RuntimeError):
        j.cut()
    j.close()


def _big(j: ChangeJournal, block: int, byte: int) -> bytes:
    """A write of REF_MIN bytes: kept by reference (the caller writes the volume)."""
    from replicator.capture.journal import REF_MIN

    data = bytes([byte]) * REF_MIN
    j.write(block * BS, data)
    os.pwrite(j.fds[0], data, block * BS)
    return data


def test_a_large_write_syncs_its_own_volume_not_every_member_of_the_group(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """A consistency group: the sync before a large write's reply flushes the volume it
    went to, not the other members'."""
    import replicator.capture.journal as mod

    fds = []
    for name in ("a.img", "b.img"):
        path = os.path.join(str(tmp_path), name)
        with open(path, "wb") as fh:
            fh.truncate(4096 * BS)
        fds.append(os.open(path, os.O_RDWR))
    j = ChangeJournal(os.path.join(str(tmp_path), "journal"), BS, fds)
    synced: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(mod.os, "fdatasync",  # type: ignore[attr-defined]
                        lambda fd: (synced.append(fd), real(fd))[1])
    data = os.urandom(mod.REF_MIN)
    j.write(64 * BS, data, vol=1)
    os.pwrite(fds[1], data, 64 * BS)
    j.write(0, b"\x01" * BS, vol=0)  # a small one: journaled, its volume not synced
    j.sync(j.seq)
    assert fds[1] in synced and fds[0] not in synced
    assert j.ref_bytes == mod.REF_MIN and j.volume_synced == [0, j.seq]
    synced.clear()
    j.write(1 * BS, b"\x02" * BS, vol=1)
    j.sync(j.seq)
    assert fds[0] not in synced and fds[1] not in synced  # nothing by reference since


def test_a_large_write_is_shipped_from_memory_not_copied_into_the_journal(
        tmp_path: object) -> None:
    from replicator.capture.journal import REF_MIN

    j = _journal(tmp_path, size=4096 * BS)
    _write(j, 0, 0x01)
    data = _big(j, 64, 0x5A)
    _write(j, 65, 0x02)  # rewritten inside the point: its last content is shipped
    j.flush()
    assert _records_bytes(j.path) < 4 * BS  # two small writes' data, the large one's record
    assert j.ref_bytes == REF_MIN
    assert j.ref_seq[0] > j.volume_synced[0]  # the next sync must sync the volume too
    j.sync(j.seq)
    assert j.volume_synced == [j.seq]
    (point,) = j.extract()
    n = REF_MIN // BS
    assert set(point.blocks) == {0, *range(64, 64 + n)}
    assert point.blocks[64] == data[:BS] and point.blocks[63 + n] == data[-BS:]
    assert point.blocks[65] == b"\x02" * BS
    j.requeue()  # the stream failed: the data is still held
    (again,) = j.extract()
    assert again.blocks[66] == data[:BS]
    j.release(1)
    assert j.ref_bytes == 0 and not j.closed


def test_large_writes_count_against_the_limit_and_past_the_budget_are_journaled(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    import replicator.capture.journal as mod

    monkeypatch.setattr(mod, "REF_BUDGET", mod.REF_MIN)
    j = _journal(tmp_path, size=4096 * BS, limit=3 * mod.REF_MIN)
    _big(j, 0, 1)  # in memory
    _big(j, 100, 2)  # past the budget: journaled with its data
    assert j.ref_bytes == mod.REF_MIN
    assert _records_bytes(j.path) > mod.REF_MIN
    j.cut()
    assert {p.cp for p in j.extract()} == {1}
    assert not j.overflowed
    _big(j, 200, 3)  # a third: the limit counts the one in memory too
    assert j.overflowed and j.ref_bytes == 0
    n = mod.REF_MIN // BS
    assert {0, 100, 200} <= j.dirty and len(j.dirty) == 3 * n


def test_a_replay_lists_large_writes_dirty_and_old_dirty_records_are_not_taken_for_them(
        tmp_path: object) -> None:
    """After a crash the large writes' blocks are resynced from the volume (which the sync
    before their reply made durable). A change bitmap's DIRTY records kept in a point's span
    by a resync's rewrite are not taken for writes by reference."""
    import replicator.capture.journal as mod

    j = _journal(tmp_path, size=4096 * BS, limit=4 * BS)
    _write(j, 1, 1)
    _write(j, 2, 2, blocks=4)  # past the limit: bitmap mode
    _write(j, 9, 9)  # a DIRTY record after the rewrite's header
    blocks = j.begin_resync()  # the tail (that DIRTY record) is kept in the open point
    j.limit = 1 << 30
    data = _big(j, 64, 0x5A)
    end = j.cut()
    (point,) = j.extract(end)
    n = mod.REF_MIN // BS
    assert set(point.blocks) == set(range(64, 64 + n))
    assert point.blocks[64] == data[:BS]
    os.close(j.fd)
    j2 = ChangeJournal(j.path, BS, j.fds[0])
    assert j2.dirty == set(blocks) | set(range(64, 64 + n))
    assert j2.replayed == 0  # nothing to redo: the volume holds the large write


def test_a_compaction_keeps_the_places_of_writes_by_reference(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    import replicator.capture.journal as mod

    monkeypatch.setattr(mod, "REWRITE_BYTES", 8 * BS)
    j = _journal(tmp_path, size=4096 * BS)
    for b in range(10):
        _write(j, b, b + 1)
        j.cut()
    j.extract()
    _write(j, 100, 0xEE)
    data = _big(j, 200, 0x77)  # open point: a small write, then a large one
    assert j.release(10, inline=False)
    assert j.compact()
    j.cut()
    (point,) = j.extract()
    assert point.blocks[100] == b"\xee" * BS and point.blocks[200] == data[:BS]


def test_a_large_write_over_a_journaled_one_is_journaled_too(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replay writes the journal's data records back into the volume: a large write kept
    only in the volume would be undone by an older record of the same blocks (a kill -9 of
    the agent lost an acknowledged write that way). Once compaction dropped the older record,
    the large write goes by reference again."""
    import replicator.capture.journal as mod

    monkeypatch.setattr(mod, "REWRITE_BYTES", 8 * BS)
    j = _journal(tmp_path, size=4096 * BS)
    _write(j, 70, 0x11)  # journaled with its data
    data = _big(j, 64, 0x5A)  # covers block 70
    assert j.ref_bytes == 0 and _records_bytes(j.path) > mod.REF_MIN
    os.close(j.fd)
    vol_fd = j.fds[0]
    j2 = ChangeJournal(j.path, BS, vol_fd)  # the agent killed and started again
    assert os.pread(vol_fd, mod.REF_MIN, 64 * BS) == data
    assert set(range(64, 64 + mod.REF_MIN // BS)) <= j2.dirty
    j2.begin_resync()
    j2.end_resync(set(j2.resyncing))
    for b in range(10):  # enough released to compact the journal
        _write(j2, b, b + 1)
        j2.cut()
    _write(j2, 70, 0x22)
    j2.cut()
    j2.extract()
    j2.release(j2.next_cp - 1)
    assert not j2.data_blocks
    _big(j2, 64, 0x6B)
    assert j2.ref_bytes == mod.REF_MIN


def test_a_replay_counts_a_large_write_acknowledged_only_if_its_point_was_not_released(
        tmp_path: object) -> None:
    """As for every write: a large one in a point the target acknowledged is not resynced
    after a restart (nor reported as diverged by a demoted primary); one in a point it did
    not acknowledge is, and so are the blocks a running resync's header lists."""
    import replicator.capture.journal as mod

    n = mod.REF_MIN // BS
    j = _journal(tmp_path, size=4096 * BS, limit=4 * BS)
    _write(j, 1, 1)
    _write(j, 2, 2, blocks=4)  # past the limit: bitmap mode
    resyncing = j.begin_resync()
    j.limit = 1 << 30
    _big(j, 64, 0x5A)
    first = j.cut()
    j.extract()
    j.release(first)  # acknowledged
    _big(j, 400, 0x6B)
    j.cut()
    j.extract()  # shipped, never acknowledged
    _big(j, 800, 0x7C)  # open point
    assert j.ref_bytes == 2 * mod.REF_MIN
    j.close()
    again = _journal(tmp_path, size=4096 * BS)
    assert again.dirty == resyncing | set(range(400, 400 + n)) | set(range(800, 800 + n))
    again.close()


def test_points_released_during_a_compaction_still_keep_large_writes_journaled(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compaction copies the records from the head it took at its start: points the
    target acknowledges while it copies are in the new file still, and a large write over
    their blocks must be journaled (a replay would write their records back over it)."""
    import replicator.capture.journal as mod

    monkeypatch.setattr(mod, "REWRITE_BYTES", 8 * BS)
    j = _journal(tmp_path, size=4096 * BS)
    for b in range(10):
        _write(j, b, b + 1)
        j.cut()
    _write(j, 70, 0x11)
    last = j.cut()
    j.extract()
    j.release(2, inline=False)
    sync_volumes = j._sync_volumes

    def acks_arrive_meanwhile(vols: object = None) -> None:  # compact() syncs the volumes
        sync_volumes()                                        # outside the lock
        if j.released_cp < last:
            j.release(last, inline=False)

    monkeypatch.setattr(j, "_sync_volumes", acks_arrive_meanwhile)
    assert j.compact()
    assert j.released_cp == last and 70 in j.data_blocks
    data = _big(j, 64, 0x5A)  # over block 70: journaled with its data
    j.sync(j.seq)
    os.close(j.fd)
    ChangeJournal(j.path, BS, j.fds[0])  # the agent killed and started again
    assert os.pread(j.fds[0], mod.REF_MIN, 64 * BS) == data


def test_the_volume_is_synced_once_for_a_large_write_not_at_every_sync_after(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    j = _journal(tmp_path, size=4096 * BS)
    synced: list[int] = []
    sync_volumes = j._sync_volumes

    def counted(vols: object = None) -> None:
        synced.append(j.seq)
        sync_volumes()

    monkeypatch.setattr(j, "_sync_volumes", counted)
    _write(j, 1, 1)
    j.sync(j.seq)
    assert synced == []  # small writes: the journal alone
    _big(j, 64, 0x5A)
    j.sync(j.seq)
    assert synced == [j.seq]
    _write(j, 2, 2)
    j.sync(j.seq)
    assert synced == [j.seq - 1]


def _writer_between_record_and_volume(j: ChangeJournal, block: int, data: bytes
                                      ) -> tuple[threading.Thread, threading.Event]:
    """The export's writer: the journal record, then (a moment later) the volume write, both
    under the order lock. Returns the thread and an event set once the record is made."""
    recorded = threading.Event()

    def run() -> None:
        with j.order:
            j.write(block * BS, data)
            recorded.set()
            threading.Event().wait(0.2)  # a slow volume write
            os.pwrite(j.fds[0], data, block * BS)

    t = threading.Thread(target=run)
    t.start()
    assert recorded.wait(5)
    return t, recorded


def test_a_point_is_extracted_only_once_its_writes_reached_the_volume(
        tmp_path: object) -> None:
    """Else the target could acknowledge a large write (shipped from memory) and the journal
    drop or replay its record as acknowledged while the volume lacks it: killed then, the
    source keeps the old content and the replica the new, and nothing resyncs it."""
    from replicator.capture.journal import REF_MIN

    j = _journal(tmp_path, size=4096 * BS)
    data = b"N" * REF_MIN
    t, _ = _writer_between_record_and_volume(j, 0, data)
    cp = j.cut()
    (point,) = j.extract()  # waits for the writer's volume write
    assert os.pread(j.fds[0], BS, 0) == data[:BS] and bytes(point.blocks[0] or b"") == data[:BS]
    t.join()
    j.release(cp)
    j.close()
    again = _journal(tmp_path, size=4096 * BS)
    assert 0 not in again.dirty and os.pread(again.fds[0], BS, 0) == data[:BS]
    again.close()


def test_a_resync_begins_once_the_writes_recorded_in_bitmap_mode_reached_the_volume(
        tmp_path: object) -> None:
    j = _journal(tmp_path, limit=4 * BS)
    _write(j, 1, 1, blocks=5)  # past the limit: bitmap mode
    assert j.overflowed
    data = b"B" * BS
    t, _ = _writer_between_record_and_volume(j, 9, data)
    blocks = j.begin_resync()  # waits for the volume write: the pass reads the new content
    assert 9 in blocks and os.pread(j.fds[0], BS, 9 * BS) == data
    t.join()
