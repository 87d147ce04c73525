"""Consistency points on the target: staged batches reach the image one whole point at a time,
survive a crash at any step, and a promotion drops an incomplete point."""

from __future__ import annotations

import os
from array import array

import pytest

from drctl.files import WRITE_AHEAD
from replicator.batch import Batch, Compression
from replicator.blockmap import UNKNOWN, Geometry, hash_all
from replicator.capture.journal_records import ExtractedPoint
from replicator.capture.points import plan_points
from replicator.errors import CorruptBatchError
from replicator.planning import Planner
from replicator.replica import Replica
from replicator.staging import StagingLog

BS = 4096
BLOCKS = 32


class Source:
    """A planner over a model volume: what the replica must show after each point."""

    def __init__(self) -> None:
        self.geo = Geometry(BLOCKS * BS, BS)
        self.model = bytearray(BLOCKS * BS)
        self.planner = Planner("v", 0, self.geo, self.geo.zero_hashes(),
                               array("Q", [UNKNOWN]) * self.geo.chunks, dedup=False)
        self.planner.staged = True
        self.seq = 0
        self.cp = 0

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def point(self, writes: dict[int, int | None]) -> list[Batch]:
        self.cp += 1
        pt = ExtractedPoint(self.cp)
        for b, byte in writes.items():
            pt.blocks[b] = None if byte is None else bytes([byte]) * BS
            self.model[b * BS : (b + 1) * BS] = bytes(BS) if byte is None else bytes([byte]) * BS
        return [p.batch for p in plan_points(self.planner, [pt], self.next_seq)]


def _image(d: str) -> bytes:
    with open(os.path.join(d, "v.img"), "rb") as fh:
        return fh.read()


def _replica(d: str, mode: str = "hot") -> Replica:
    r = Replica(d, "v", mode)
    r.prepare(BLOCKS * BS, BS)
    return r


def test_batch_pack_round_trip() -> None:
    src = Source()
    batch = src.point({1: 7, 2: None, 9: 3})[0]
    again = Batch.unpack(batch.pack())
    assert again == batch and again.compute_checksum() == batch.checksum
    assert again.staged and again.cp == 1


def test_a_frame_written_in_pieces_reads_back_whole(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """Appends are gathered writes (header and payload not joined first); a short write goes
    on where it stopped, and a failed one leaves no torn frame before the next."""
    import replicator.staging as staging

    src = Source()
    batches = src.point({b: b + 1 for b in range(12)})
    log = StagingLog(os.path.join(str(tmp_path), "v.wal"), 0)
    real = os.pwritev
    monkeypatch.setattr(staging.os, "pwritev",  # short writes
                        lambda fd, bufs, at: real(fd, [bytes(bufs[0][:1000])], at))
    frames = [log.append(b, 1, False) for b in batches]
    assert [log.read(f) for f in frames] == batches

    def full(fd: int, bufs: list[memoryview], at: int) -> int:
        real(fd, [bytes(bufs[0][:7])], at)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(staging.os, "pwritev", full)
    retried = src.point({3: 9})[0]
    with pytest.raises(OSError):
        log.append(retried, 2, True)
    monkeypatch.setattr(staging.os, "pwritev", real)
    last = log.append(retried, 2, True)  # the same batch again
    log.close()
    again = StagingLog(log.path, 0)  # the scan at open finds every frame
    assert [f.seq for f in again.frames] == [f.seq for f in [*frames, last]]
    again.close()


def test_small_points_are_written_into_space_written_ahead_and_applied_ones_stay(
        tmp_path: object) -> None:
    """While syncs cover little, the file is written with zeroes past its last frame, frames
    are written into that space and applied ones stay in place (no truncation per point), a
    scan counting them as applied by sequence; once TRUNCATE_BYTES are written and every
    frame is applied, the file is emptied. A frame torn inside that space is cut off."""
    import replicator.staging as staging

    path = os.path.join(str(tmp_path), "v.wal")
    src = Source()
    log = StagingLog(path, 0)
    first = src.point({1: 1, 2: 2})
    for b in first:
        log.append(b, 1, b is first[-1])
    log.sync()
    grown = os.path.getsize(path)
    assert grown >= log.end + WRITE_AHEAD // 2
    log.drop_through(first[-1].seq)  # applied
    second = src.point({3: 3})
    frame = log.append(second[0], 2, True)
    log.sync()
    assert os.path.getsize(path) == grown and frame.offset > log.applied_bytes > 0
    again = StagingLog(path, first[-1].seq)  # first applied, second staged
    assert [f.seq for f in again.frames] == [second[0].seq]
    assert again.read(again.frames[0]) == second[0]
    again.sync()
    torn = again.append(src.point({4: 4})[0], 3, True)
    with open(path, "r+b") as fh:  # half written, zeroes after it
        fh.seek(torn.offset + 10)
        fh.write(bytes(torn.length))
    assert [f.seq for f in StagingLog(path, first[-1].seq).frames] == [second[0].seq]
    log.close()
    again.close()
    big = StagingLog(path, second[0].seq)
    old = staging.TRUNCATE_BYTES
    staging.TRUNCATE_BYTES = big.end  # reached
    try:
        last = src.point({5: 5})[0]
        big.append(last, 4, True)
        big.sync()
        big.drop_through(last.seq)
    finally:
        staging.TRUNCATE_BYTES = old
    assert os.path.getsize(path) == 0 and big.end == 0
    big.close()


def test_a_redo_journal_without_its_commit_record_is_not_applied(tmp_path: object,
                                                                 caplog: pytest.LogCaptureFixture
                                                                 ) -> None:
    """Applied frames stay in the file (space written ahead); their sequence numbers mean
    nothing to a new commit record: a replica whose record is gone starts without them."""
    d = str(tmp_path)
    src = Source()
    r = _replica(d)
    for b in src.point({b: 0x11 for b in range(4)}):
        r.stage(b)
    r.commit(src.seq)
    r.apply_staged()
    assert r.wal.end > 0 and r.wal.frames == []  # left in place
    r.close()
    os.unlink(os.path.join(d, "v.meta"))
    with open(os.path.join(d, "v.img"), "r+b") as fh:
        fh.truncate(0)
    again = Replica(d, "v")
    assert again.wal.frames == [] and os.path.getsize(os.path.join(d, "v.img")) == 0
    assert "without a commit record" in caplog.text
    again.close()


def test_points_apply_whole_and_the_index_projects_staged_batches(tmp_path: object) -> None:
    d = str(tmp_path)
    src = Source()
    r = _replica(d)
    first = src.point({b: 0x11 for b in range(20)})
    state1 = bytes(src.model)
    second = src.point({3: 0x22, 4: None, 30: 0x23})
    for b in first + second:
        r.stage(b)
    r.commit(src.seq)
    assert r.received_seq == src.seq
    applied, cp = r.apply_staged(first[-1].seq)
    assert cp == 1 and _image(d) == state1  # point 2 stays in the redo journal
    assert r.digest() == Replica(d, "v").digest()  # projected index = image + staged, on reopen
    applied, cp = r.apply_staged()
    assert applied == len(second) and cp == 2 and _image(d) == bytes(src.model)
    assert r.wal.frames == []
    assert StagingLog(os.path.join(d, "v.wal"), r.record.applied_seq).frames == []
    assert list(r.index()) == list(hash_all(memoryview(bytes(src.model)), src.geo))


def test_a_staged_point_is_hashed_once_and_a_frame_damaged_before_it_is_applied_is_refused(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    import replicator.replica as replica_mod

    d = str(tmp_path)
    src = Source()
    r = _replica(d)
    batches = src.point({b: 0x40 + b for b in range(0, BLOCKS, 3)}) + \
        src.point({b: 0x41 for b in range(BLOCKS)}) + \
        src.point({1: None, 2: 0x42, 9: None})  # sparse, a run, with ZERO records
    for b in batches:
        r.stage(b)
    r.commit(src.seq)
    hashed = 0
    real = replica_mod.block_hash

    def counting(data: object) -> int:
        nonlocal hashed
        hashed += 1
        return real(data)  # type: ignore[arg-type]

    monkeypatch.setattr(replica_mod, "block_hash", counting)
    r.apply_staged()  # every block was checked when staged: not hashed again
    assert hashed == 0 and _image(d) == bytes(src.model)

    # a byte of a staged frame's payload flips on disk before it is applied: its checksum
    # (over the same payload) refuses it, and the image keeps the last point
    before = bytes(src.model)
    more = src.point({b: 0x50 for b in range(BLOCKS)})
    for b in more:
        r.stage(b)
    r.commit(src.seq)
    frame = r.wal.frames[0]
    at = frame.offset + frame.length - 1
    fd = os.open(os.path.join(d, "v.wal"), os.O_RDWR)  # (the log's own fd appends)
    try:
        os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 0xFF]), at)
    finally:
        os.close(fd)
    with pytest.raises(CorruptBatchError, match="checksum"):
        r.apply_staged()
    assert _image(d) == before


def test_a_crash_in_the_middle_of_applying_a_point_is_repaired_at_open(tmp_path: object
                                                                        ) -> None:
    d = str(tmp_path)
    src = Source()
    r = _replica(d)
    base = src.point({b: 0x10 for b in range(BLOCKS)})
    for b in base:
        r.stage(b)
    r.commit(src.seq)
    r.apply_staged()
    before = bytes(src.model)
    batches = src.point({b: 0x30 + b for b in range(0, BLOCKS, 2)})
    for b in batches:
        r.stage(b)
    r.commit(src.seq)
    # the crash: half of the point written into the image, the commit record not updated
    half = r.wal.read(r.wal.frames[0])
    half.indices, half.kinds, half.hashes = half.indices[:5], half.kinds[:5], half.hashes[:5]
    for i in half.indices:
        os.pwrite(r.img_fd, bytes([0x30 + i]) * BS, i * BS)
    assert _image(d) not in (before, bytes(src.model))
    r.close()
    r2 = Replica(d, "v")
    assert r2.record.applied_cp == 1 and len(r2.wal.frames) == len(batches)
    r2.apply_staged()
    assert _image(d) == bytes(src.model) and r2.record.applied_cp == 2


def test_promotion_discards_an_incomplete_point(tmp_path: object) -> None:
    d = str(tmp_path)
    src = Source()
    r = _replica(d, "warm")
    done = src.point({1: 1, 2: 2})
    state = bytes(src.model)
    for b in done:
        r.stage(b)
    import replicator.capture.points as points

    old = points.MAX_BATCH_BLOCKS
    points.MAX_BATCH_BLOCKS = 2  # the next point spans several batches
    try:
        open_point = src.point({5: 5, 6: 6, 7: 7, 8: 8})
    finally:
        points.MAX_BATCH_BLOCKS = old
    assert len(open_point) >= 2 and open_point[0].cp == 0
    r.stage(open_point[0])  # its closing batch never arrives
    r.commit(src.seq)
    assert _image(d) == bytes(BLOCKS * BS)  # warm: nothing applied yet
    r.apply_staged()
    assert r.discard_incomplete() == 1
    assert _image(d) == state and r.record.applied_cp == 1
    assert list(r.index()) == list(hash_all(memoryview(state), src.geo))


def test_a_torn_frame_is_cut_off_and_copy_records_are_refused(tmp_path: object) -> None:
    d = str(tmp_path)
    src = Source()
    r = _replica(d)
    b1 = src.point({1: 1})[0]
    b2 = src.point({2: 2})[0]
    r.stage(b1)
    r.stage(b2)
    r.commit(src.seq)
    size = r.wal.end  # its last frame (zeroes may follow)
    os.truncate(os.path.join(d, "v.wal"), size - 10)
    log = StagingLog(os.path.join(d, "v.wal"), 0)
    assert [f.seq for f in log.frames] == [b1.seq]
    copy = Batch("v", 0, 99, BS, BLOCKS * BS, [3], bytes([3]), [b1.hashes[0]], [1],
                 Compression.NONE, 0, b"", staged=True, cp=9).seal()
    with pytest.raises(CorruptBatchError, match="COPY"):
        r.stage(copy)
