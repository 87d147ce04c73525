"""The target's block index on disk (NAME.index): a clean stop saves it and a restart loads it
without reading the image; after a kill the array is kept and only the blocks in flight are
hashed again; after a restart of the machine only the extents of its activity log (NAME.al);
anything it cannot vouch for (a corrupt or truncated file, a reboot without a usable activity
log, an image written behind its back) is one WARNING line naming the file and the reason, and
the image is hashed again."""

from __future__ import annotations

import logging
import os
from array import array

import pytest

import replicator.blockindex as blockindex
from replicator.activity import EXTENT_BLOCKS, read
from replicator.blockindex import INDEX_HEADER, HashFile, data_extents
from replicator.blockmap import UNKNOWN, Geometry, block_hash, hash_all
from replicator.planning import Planner
from replicator.replica import Replica, index_digest
from tests.damage import flip_byte
from tests.unit.test_staging import BLOCKS, BS, Source

GEO = Geometry(BLOCKS * BS, BS)
EB = EXTENT_BLOCKS
BIG = Geometry(8 * EB * BS, BS)  # 8 extents of the activity log (32 MiB, sparse)


def _from_disk(d: str, geo: Geometry = GEO) -> bytes:
    with open(os.path.join(d, "v.img"), "rb") as fh:
        return index_digest(hash_all(memoryview(fh.read()), geo))


def _written(d: str) -> tuple[Replica, Source]:
    """A hot replica written by direct batches (a scan-based source) and a staged point."""
    src = Source()
    r = Replica(d, "v")
    r.prepare(GEO.size, BS)
    src.planner.staged = False
    for b in src.point({1: 0x11, 5: 0x55, 9: None, 30: 0x30}):
        r.apply(b)
    src.planner.staged = True
    for b in src.point({5: 0x66, 7: 0x77}):
        r.stage(b)
    r.commit(src.seq)
    r.apply_staged()
    return r, src


def _no_image_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_a: object, **_k: object) -> list[int]:
        raise AssertionError("the image was read")

    monkeypatch.setattr(blockindex, "hash_range", boom)


def test_a_clean_stop_saves_the_index_and_a_restart_loads_it_without_reading_the_image(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    d = str(tmp_path)
    r, _src = _written(d)
    digest = r.digest()
    assert digest == _from_disk(d)
    r.close()
    _no_image_reads(monkeypatch)
    caplog.set_level(logging.INFO)
    again = Replica(d, "v")
    assert again.digest() == digest and "v.index: loaded (saved at a clean stop)" in caplog.text
    again.close()


@pytest.mark.parametrize("damage", ["flip", "truncate", "header"])
def test_a_damaged_index_is_hashed_again_and_the_log_says_which_and_why(
        tmp_path: object, caplog: pytest.LogCaptureFixture, damage: str) -> None:
    d = str(tmp_path)
    r, _src = _written(d)
    digest = r.digest()
    r.close()
    path = os.path.join(d, "v.index")
    with open(path, "r+b") as fh:
        if damage == "flip":
            fh.seek(INDEX_HEADER + 8 * 7)
            fh.write(b"\x01")
        elif damage == "truncate":
            fh.truncate(INDEX_HEADER + 8 * 3)
        else:
            fh.seek(20)
            fh.write(b"\xff")
    again = Replica(d, "v")
    assert again.digest() == digest == _from_disk(d)
    why = {"flip": "checksum mismatch", "truncate": "another size",
           "header": "header is torn"}[damage]
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and path in lines[0] and why in lines[0], lines
    again.close()


def test_an_image_changed_while_the_target_was_stopped_is_hashed_again(
        tmp_path: object, caplog: pytest.LogCaptureFixture) -> None:
    d = str(tmp_path)
    r, _src = _written(d)
    r.close()
    img = os.path.join(d, "v.img")
    fd = os.open(img, os.O_RDWR)
    os.pwrite(fd, b"edited", 12 * BS)
    os.close(fd)
    st = os.stat(img)
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = Replica(d, "v")
    assert again.digest() == _from_disk(d)
    assert "the image was changed since it was saved" in caplog.text
    again.close()


def test_after_a_kill_the_array_is_kept_and_only_the_blocks_in_flight_are_hashed_again(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    d = str(tmp_path)
    r, _src = _written(d)  # never closed: the daemon was killed
    r._ix.begin([4, 12])  # it was writing blocks 4 and 12 when it died
    os.pwrite(r.img_fd, b"\x44" * BS, 4 * BS)
    caplog.set_level(logging.INFO)
    calls: list[int] = []
    real = blockindex.hash_range

    def counting(fd: int, geo: Geometry, first: int, count: int) -> list[int]:
        calls.append(count)
        return real(fd, geo, first, count)

    monkeypatch.setattr(blockindex, "hash_range", counting)
    again = Replica(d, "v")
    assert "recovered after a crash (2 blocks in flight hashed again)" in caplog.text
    assert sum(calls) == 2  # not the image: the two blocks
    assert again.index()[4] == block_hash(b"\x44" * BS)
    assert again.digest() == _from_disk(d)
    again.close()


def test_after_a_kill_an_image_written_by_something_else_or_a_reboot_is_hashed_again(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    d = str(tmp_path)
    r, _src = _written(d)  # killed
    img = os.path.join(d, "v.img")
    os.pwrite(r.img_fd, b"behind its back", 3 * BS)
    st = os.stat(img)
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = Replica(d, "v")
    assert again.digest() == _from_disk(d)
    assert "written by something else" in caplog.text
    monkeypatch.setattr(blockindex, "boot_id", lambda: "another-boot")
    # `again` was killed too, on the boot before, before its first checkpoint: having hashed
    # the whole image, its activity log says everything may have changed
    after_reboot = Replica(d, "v")
    assert after_reboot.digest() == _from_disk(d)
    assert "the machine restarted since it was last open and its activity log" in caplog.text
    assert "(it says everything may have changed)" in caplog.text
    after_reboot.close()


def test_a_staged_point_interrupted_while_applied_is_right_after_the_restart(
        tmp_path: object) -> None:
    d = str(tmp_path)
    src = Source()
    r = Replica(d, "v")
    r.prepare(GEO.size, BS)
    for b in src.point({2: 0x22, 3: None}):
        r.stage(b)
    r.commit(src.seq)
    r._ix.begin(None)  # killed in apply_staged: half of the point written
    os.pwrite(r.img_fd, b"\x22" * BS, 2 * BS)
    again = Replica(d, "v")  # the hot target applies the point again from its redo journal
    assert again.digest() == r.digest()
    again.apply_staged()
    assert again.digest() == _from_disk(d)
    again.close()


def test_the_index_follows_a_resize(tmp_path: object) -> None:
    d = str(tmp_path)
    r, _src = _written(d)
    r.prepare(GEO.size + 5 * BS + 100, BS)  # grown, with a partial last block
    assert r.digest() == index_digest(r.hashes_from_disk())
    r.close()
    again = Replica(d, "v")
    assert again.digest() == index_digest(again.hashes_from_disk())
    again.close()


def test_a_hash_file_maps_what_it_stores_and_reads_without_mapping(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "h")
    f = HashFile(path)
    f.resize(3, 9)
    f.hashes[1] = 5
    assert f.read(0, 10).tolist() == [9, 5, 9]
    f.write(2, [7])
    assert f.hashes.tolist() == [9, 5, 7]
    f.close()
    assert HashFile(path).hashes.tolist() == [9, 5, 7]


def test_holes_are_not_read(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "sparse")
    with open(path, "wb") as fh:
        fh.truncate(64 << 20)
        fh.seek(32 << 20)
        fh.write(b"x" * 4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        extents = list(data_extents(fd, 64 << 20))
    finally:
        os.close(fd)
    assert sum(b - a for a, b in extents) < (64 << 20)  # the holes are skipped
    assert any(a <= (32 << 20) < b for a, b in extents)


# -- a crash of the machine: the activity log -------------------------------------------------


class BigSource(Source):
    def __init__(self) -> None:
        super().__init__()
        self.geo = BIG
        self.model = bytearray(BIG.size)
        self.planner = Planner("v", 0, BIG, BIG.zero_hashes(),
                               array("Q", [UNKNOWN]) * BIG.chunks, dedup=False)


def _logged(d: str) -> set[int]:
    saved, why = read(os.path.join(d, "v.al"))
    assert saved is not None and not saved.everything, why
    return set(saved.extents)


def _busy(d: str) -> Replica:
    """A replica written since its last checkpoint in extents 0, 3 and 6 (direct batches and
    a staged point), never closed: the daemon (or the machine) died."""
    src = BigSource()
    r = Replica(d, "v")
    r.prepare(BIG.size, BS)
    src.planner.staged = False
    for b in src.point({1: 0x11, 2 * EB + 5: 0x25, 7 * EB + 1: 0x71}):
        r.apply(b)
    r.commit(src.seq)
    r._ix.checkpoint(r.wal)  # image and index synced: the log keeps the hot set
    assert {0, 2, 7} <= _logged(d)
    r._ix.checkpoint(r.wal)  # nothing written since the one before: the log is emptied
    assert _logged(d) == set()
    for b in src.point({3 * EB + 7: 0x37, 3 * EB + 8: None}):
        r.apply(b)
    src.planner.staged = True
    for b in src.point({6 * EB: 0x60, 1: 0x12}):
        r.stage(b)
    r.commit(src.seq)
    r.apply_staged()
    assert _logged(d) == {0, 3, 6}
    return r


def _lose_page_cache(d: str, extents: set[int]) -> None:
    """What a crash of the machine may leave of the index: the entries of the logged extents
    never written back (garbage here); the rest is what the last checkpoint made durable."""
    fd = os.open(os.path.join(d, "v.index"), os.O_RDWR)
    try:
        for e in extents:
            os.pwrite(fd, os.urandom(8 * EB), INDEX_HEADER + 8 * e * EB)
    finally:
        os.close(fd)


def test_after_a_restart_of_the_machine_only_the_extents_of_the_activity_log_are_hashed(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    d = str(tmp_path)
    caplog.set_level(logging.INFO)
    _busy(d)
    killed = Replica(d, "v")  # first a kill on this boot: the log keeps what was not synced
    assert "recovered after a crash" in caplog.text and _logged(d) == {0, 3, 6}
    logged = _logged(d)
    del killed  # ... and that one dies with the machine
    _lose_page_cache(d, logged)
    monkeypatch.setenv("DRCTL_BOOT_ID", "the-next-boot")
    reads: list[tuple[int, int]] = []
    real = blockindex.hash_range

    def counting(fd: int, geo: Geometry, first: int, count: int) -> list[int]:
        reads.append((first, count))
        return real(fd, geo, first, count)

    monkeypatch.setattr(blockindex, "hash_range", counting)
    caplog.clear()
    again = Replica(d, "v")
    assert sorted(reads) == [(e * EB, EB) for e in sorted(logged)]  # those extents, no more
    lines = [r.getMessage() for r in caplog.records if "v.index" in r.getMessage()]
    assert len(lines) == 1 and "after a restart of the machine, 3 extents (12.0 MiB) from the " \
        "activity log re-hashed in" in lines[0], lines
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert again.digest() == _from_disk(d, BIG)
    assert _logged(d) == logged  # listed until the next checkpoint
    again.close()  # a clean stop empties it
    assert _logged(d) == set()


@pytest.mark.parametrize("damage", ["flip", "missing"])
def test_after_a_restart_of_the_machine_an_unusable_activity_log_means_the_whole_image(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        damage: str) -> None:
    d = str(tmp_path)
    _busy(d)
    _lose_page_cache(d, {0, 3, 6})
    al = os.path.join(d, "v.al")
    if damage == "flip":
        flip_byte(al, 30)
    else:
        os.unlink(al)
    monkeypatch.setenv("DRCTL_BOOT_ID", "the-next-boot")
    again = Replica(d, "v")
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    why = "torn or checksum mismatch" if damage == "flip" else "it is missing"
    assert len(lines) == 1 and al in lines[0] and f"({why}): hashing the image again" \
        in lines[0], lines
    assert again.digest() == _from_disk(d, BIG)
    again.close()


def test_checkpoints_at_commits_keep_the_hot_set_then_empty_the_log_once_due(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    d = str(tmp_path)
    r = _busy(d)
    def commit() -> None:  # as the target's stream does: the checkpoint after the ack
        r.commit()
        if r.checkpoint_due():
            r.checkpoint()

    commit()  # not due yet (CHECKPOINT_SECONDS)
    assert _logged(d) == {0, 3, 6}
    monkeypatch.setattr(r._ix.al, "due", lambda: True)
    commit()
    assert _logged(d) == {0, 3, 6}  # written since the checkpoint before: still hot
    commit()
    assert _logged(d) == set()
    r.close()


def test_drctl_boot_id_is_added_to_the_machines_boot_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DRCTL_BOOT_ID", raising=False)
    real = blockindex.boot_id()  # /proc/sys/kernel/random/boot_id ("" where unreadable)
    monkeypatch.setenv("DRCTL_BOOT_ID", "a-test")
    assert blockindex.boot_id() == f"{real}:a-test"  # a real reboot still changes it
