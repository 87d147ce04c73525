from __future__ import annotations

import os
from array import array

import pytest

from replicator.batch import Decoder, Kind
from replicator.blockmap import UNKNOWN, Geometry, MappedVolume, hash_all, scan_chunks
from replicator.errors import CorruptBatchError
from replicator.planning import Planner
from replicator.replica import CommitRecord, Replica
from replicator.source_state import SourceState, StateStore

BS = 4096


def _volume(path: str, blocks: list[bytes]) -> None:
    with open(path, "wb") as fh:
        for b in blocks:
            fh.write(b)


def _plan(path: str, view: array[int] | None = None, **kw: object):  # type: ignore[no-untyped-def]
    vol = MappedVolume(path)
    geo = Geometry(vol.size, BS)
    view = view if view is not None else geo.zero_hashes()
    seen = array("Q", [UNKNOWN]) * geo.chunks
    planner = Planner("v", 0, geo, view, seen, **kw)  # type: ignore[arg-type]
    seq = iter(range(1, 10**6))
    batches = []
    for w in scan_chunks(vol.view, geo, seen):
        batches.extend(planner.plan(vol.view, w.chunks, lambda: next(seq)))
    return vol, geo, planner, batches


def test_planner_kinds_and_replica_round_trip(tmp_path: object) -> None:
    d = str(tmp_path)
    blocks = [os.urandom(BS), bytes(BS), b"t" * BS, os.urandom(BS)]
    blocks.append(blocks[0])  # duplicate of block 0: COPY
    blocks.append(b"t" * BS)  # duplicate of block 2: COPY
    src = os.path.join(d, "src.img")
    _volume(src, blocks)
    vol, geo, _planner, batches = _plan(src)
    assert len(batches) == 1
    b = batches[0].batch
    assert list(b.indices) == [0, 2, 3, 4, 5]  # the zero block is already on a new replica
    assert b.kinds == bytes([Kind.DATA, Kind.DATA, Kind.DATA, Kind.COPY, Kind.COPY])
    assert b.copy_from == [0, 2]
    r = Replica(d, "v")
    r.prepare(geo.size, BS)
    r.apply(b)
    r.commit(b.seq)
    with open(os.path.join(d, "v.img"), "rb") as fh:
        assert fh.read() == b"".join(blocks)
    assert r.digest() == Replica(d, "v").digest()  # index rebuilt from disk agrees
    assert Replica(d, "v").record.applied_seq == 1
    vol.close()


def test_decoder_rejects_tampering() -> None:
    from replicator.batch import Batch, Compression

    data = os.urandom(BS)
    from replicator.blockmap import block_hash

    def fresh() -> Batch:
        return Batch("v", 0, 1, BS, 4 * BS, [1], bytes([Kind.DATA]), [block_hash(data)], [],
                     Compression.NONE, BS, data).seal()

    dec = Decoder()
    dec.open(fresh())
    for mutate, reason in [
        (lambda b: setattr(b, "payload", b"x" + b.payload[1:]), "checksum"),
        (lambda b: setattr(b, "indices", [2]), "checksum"),
        (lambda b: setattr(b, "hashes", [1]), "checksum"),
    ]:
        b = fresh()
        mutate(b)
        with pytest.raises(CorruptBatchError) as info:
            dec.open(b)
        assert info.value.reason == reason
    b = fresh()
    b.indices = [9]  # past the end, properly sealed
    b.seal()
    with pytest.raises(CorruptBatchError, match="past the end"):
        dec.open(b)


def test_commit_record_survives_a_torn_slot(tmp_path: object) -> None:
    d = str(tmp_path)
    r = Replica(d, "v")
    r.prepare(8 * BS, BS)
    r.commit(5)
    r.commit(6)
    r.close()
    meta = os.path.join(d, "v.meta")
    with open(meta, "r+b") as fh:  # tear the newest slot (counter 3 -> slot 1)
        fh.seek(512 + 20)
        fh.write(b"\xff\xff\xff")
    r2 = Replica(d, "v")
    assert r2.record.applied_seq == 5  # the older valid slot
    assert CommitRecord.unpack(b"\0" * 512) is None


def test_rewrites_between_scans_are_planned_once(tmp_path: object) -> None:
    d = str(tmp_path)
    src = os.path.join(d, "src.img")
    _volume(src, [os.urandom(BS) for _ in range(32)])
    vol, _geo, planner, _ = _plan(src)
    view = planner.view
    fd = os.open(src, os.O_RDWR)
    for i in range(20):
        os.pwrite(fd, bytes([i + 1]) * BS, 7 * BS)
    os.close(fd)
    vol.close()
    _vol2, _geo, planner2, batches = _plan(src, view=array("Q", view))
    assert [list(b.batch.indices) for b in batches] == [[7]]
    assert planner2.stats.raw_bytes == BS


def test_state_store_round_trip_and_corruption(tmp_path: object,
                                               caplog: pytest.LogCaptureFixture) -> None:
    d = os.path.join(str(tmp_path), "st")
    vol = os.path.join(str(tmp_path), "vol.img")
    _volume(vol, [bytes(BS)] * 2)
    store = StateStore(d, vol)
    st = SourceState(generation="g", acked_seq=7, size=8192, block_size=BS,
                     view=array("Q", [1, 2]), seen=array("Q", [3]))
    store.save(st, clean=True)  # a clean stop
    store.close()
    back = store.load()
    assert (back.generation, back.acked_seq, list(back.view)) == ("g", 7, [1, 2])
    st_vol = os.stat(vol)
    assert back.how == "clean" and back.stopped == (st_vol.st_dev, st_vol.st_ino, 2 * BS,
                                                    st_vol.st_mtime_ns)
    store.save(back, clean=True)
    store.close()
    with open(os.path.join(d, "view.hashes"), "r+b") as fh:
        fh.write(b"\x09")
    fresh = StateStore(d).load()
    assert fresh.generation == "" and len(fresh.view) == 0 and fresh.how == ""
    assert os.path.exists(os.path.join(d, "state.json.corrupt"))
    assert "view.hashes: checksum mismatch" in caplog.text  # names the file and the reason


def test_an_agent_stopped_before_its_first_save_leaves_a_usable_state(
        tmp_path: object, caplog: pytest.LogCaptureFixture) -> None:
    """load() writes state.json at every start: with a fresh state (none saved, or one found
    unusable) the seen file it names is written with it, so a stop before any save (a target
    that never answered) is not taken for damage at the next start."""
    d = os.path.join(str(tmp_path), "st")
    for _ in range(2):  # a fresh start, then one that found the first's state
        StateStore(d).load()
    assert "unusable" not in caplog.text
    assert not os.path.exists(os.path.join(d, "state.json.corrupt"))
    with open(os.path.join(d, "seen.hashes"), "wb") as fh:
        fh.write(b"\x01" * 8)  # now it is damaged: the next load says so
    StateStore(d).load()
    assert "seen.hashes: checksum mismatch" in caplog.text
    assert os.path.exists(os.path.join(d, "state.json.corrupt"))
    caplog.clear()
    os.unlink(os.path.join(d, "seen.hashes"))  # missing: the message names that file
    os.replace(os.path.join(d, "state.json.corrupt"), os.path.join(d, "state.json"))
    StateStore(d).load()
    assert f"{os.path.join(d, 'seen.hashes')}: No such file or directory" in caplog.text


def test_a_killed_agents_view_is_kept_on_the_same_boot_only(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    import replicator.source_state as source_state

    d = os.path.join(str(tmp_path), "st")
    store = StateStore(d)
    store.volume = (1, 2, 8192, 3)  # as noted from the volume's path when it is given
    st = store.load()
    st.generation, st.size, st.block_size = "g", 8192, BS
    st.view = store.set_view(array("Q", [5, 6]))
    store.save(st)  # a periodic save: the view file keeps changing after it
    st.view[1] = 7  # ... and the agent is killed: nothing more is saved
    back = StateStore(d).load()  # the same boot
    assert back.how == "live" and list(back.view) == [5, 7] and back.started == (1, 2, 8192, 3)
    monkeypatch.setattr(source_state, "boot_id", lambda: "another-boot")
    after_reboot = StateStore(d).load()
    assert after_reboot.how == "" and len(after_reboot.view) == 0
    assert "machine restarted" in after_reboot.why


def test_hash_all_matches_chunk_scan(tmp_path: object) -> None:
    src = os.path.join(str(tmp_path), "s.img")
    with open(src, "wb") as fh:
        fh.write(os.urandom(BS * 40 + 100))
    with MappedVolume(src) as vol:
        geo = Geometry(vol.size, BS)
        assert geo.blocks == 41 and geo.block_len(40) == 100
        assert len(hash_all(vol.view, geo)) == 41
        seen = array("Q", [UNKNOWN]) * geo.chunks
        assert sum(len(w.chunks) for w in scan_chunks(vol.view, geo, seen)) == geo.chunks


def test_a_refused_copy_is_resent_as_data(tmp_path: object) -> None:
    d = str(tmp_path)
    blocks = [b"t" * BS, os.urandom(BS), os.urandom(BS), b"t" * BS]  # block 3 copies block 0
    src = os.path.join(d, "src.img")
    _volume(src, blocks)
    vol, geo, planner, batches = _plan(src, compress_level=1)
    planned = batches[0]
    assert planned.batch.kinds.count(Kind.COPY) == 1
    rebuilt = planner.without_copies(planned)
    assert rebuilt.kinds == bytes([Kind.DATA]) * 4 and rebuilt.copy_from == []
    r = Replica(d, "v")
    r.prepare(geo.size, BS)
    r.apply(rebuilt)
    with open(os.path.join(d, "v.img"), "rb") as fh:
        assert fh.read() == b"".join(blocks)
    vol.close()
