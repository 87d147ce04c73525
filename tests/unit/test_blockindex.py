"""The target's block index on disk (NAME.index): a clean stop saves it and a restart loads it
without reading the image; after a kill the array is kept and only the blocks in flight are
hashed again; anything it cannot vouch for (a corrupt or truncated file, a reboot, an image
written behind its back) is one WARNING line naming the file and the reason, and the image is
hashed again."""

from __future__ import annotations

import logging
import os

import pytest

import replicator.blockindex as blockindex
from replicator.blockindex import INDEX_HEADER, HashFile, data_extents
from replicator.blockmap import Geometry, block_hash, hash_all
from replicator.replica import Replica, index_digest
from tests.unit.test_staging import BLOCKS, BS, Source

GEO = Geometry(BLOCKS * BS, BS)


def _from_disk(d: str) -> bytes:
    with open(os.path.join(d, "v.img"), "rb") as fh:
        return index_digest(hash_all(memoryview(fh.read()), GEO))


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
    after_reboot = Replica(d, "v")  # `again` was killed too, on the boot before
    assert after_reboot.digest() == _from_disk(d)
    assert "the machine restarted" in caplog.text
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
