"""The activity log (replicator/activity.py): a durable set of extents, written and synced before
``ensure`` returns, nothing done while they are listed; a checkpoint keeps only the hot set
(what was ensured since the checkpoint before, while it ran, and pinned extents); anything it
cannot vouch for (a missing, torn or damaged file, another binding, *everything*) is None and a
reason."""

from __future__ import annotations

import os

import pytest

import replicator.activity as activity
from replicator.activity import MAX_EXTENTS, SLOT, ActivityLog, new_binding, read
from tests.damage import flip_byte

BIND = b"0123456789abcdef"


def _log(tmp_path: object) -> ActivityLog:
    al = ActivityLog(os.path.join(str(tmp_path), "v.al"))
    al.start(BIND)
    return al


def _reopened(al: ActivityLog, binding: bytes = BIND) -> tuple[set[int] | None, str]:
    return ActivityLog(al.path).load(binding)


def test_ensure_is_durable_before_it_returns_and_costs_nothing_once_listed(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    al = _log(tmp_path)
    syncs: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(activity.os, "fdatasync", lambda fd: (syncs.append(fd), real(fd)))
    al.ensure([3, 7, 3])
    assert syncs and _reopened(al) == ({3, 7}, "")  # one sync for both new extents
    assert len(syncs) == 1

    def no_io(*_a: object) -> None:
        raise AssertionError("a system call on the fast path")

    monkeypatch.setattr(activity.os, "fdatasync", no_io)
    monkeypatch.setattr(activity.os, "pwrite", no_io)
    al.ensure([7, 3])
    al.ensure_blocks(3 * 1024 + 5, 1)
    al.ensure_blocks(7 * 1024, 1024)
    assert al.listed(3 * 1024, 1) and not al.listed(3 * 1024, 2000)
    al.close()


def test_a_checkpoint_keeps_the_hot_set_and_the_next_one_empties_the_log(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    al = _log(tmp_path)
    al.ensure_blocks(5000, 3000)  # blocks 5000-7999: extents 4-7
    assert _reopened(al) == ({4, 5, 6, 7}, "")
    al.checkpoint()
    assert _reopened(al) == ({4, 5, 6, 7}, "")  # written in the interval before: still hot
    assert al.listed(5 * 1024, 2 * 1024)  # so a write there needs no sync (the export's path;
    # it counts them as written again)
    writes: list[int] = []
    real = ActivityLog._write
    monkeypatch.setattr(ActivityLog, "_write", lambda self: (writes.append(1), real(self)))
    al.ensure([5, 6])  # hot: listed already, so no write and no sync
    assert writes == []
    al.checkpoint()
    assert _reopened(al) == ({5, 6}, "")
    al.checkpoint()  # nothing written since the checkpoint before
    assert _reopened(al) == (set(), "")
    al.ensure([9])
    assert _reopened(al) == ({9}, "")
    al.close()


def test_a_hot_set_larger_than_the_limit_is_not_kept(tmp_path: object) -> None:
    al = _log(tmp_path)
    al.ensure(range(activity.CHECKPOINT_EXTENTS))
    al.checkpoint()
    assert _reopened(al) == (set(range(activity.CHECKPOINT_EXTENTS)), "")
    al.checkpoint()
    al.ensure(range(activity.CHECKPOINT_EXTENTS + 1))  # one more than the limit: not kept
    al.checkpoint()
    assert _reopened(al) == (set(), "")
    al.close()


def test_what_changes_while_a_checkpoint_runs_stays_listed(tmp_path: object) -> None:
    al = _log(tmp_path)
    al.ensure([1, 2])
    al.pin([2])  # a writer still changing extent 2
    began = al.begin_checkpoint()
    assert _reopened(al) == ({1, 2}, "")  # the file keeps the old list while the owner syncs
    al.ensure([1, 5])  # changed after the checkpoint began: listed again (on disk already)
    al.end_checkpoint(began)
    assert _reopened(al) == ({1, 2, 5}, "")
    al.unpin([2])
    al.checkpoint()
    assert _reopened(al) == ({1, 2, 5}, "")  # the hot set of the interval before
    al.checkpoint()
    assert _reopened(al) == (set(), "")
    with al.holding([8]):
        al.checkpoint()
        assert _reopened(al) == ({8}, "")
    al.checkpoint()
    al.checkpoint()
    assert _reopened(al) == (set(), "")
    al.close()


def test_everything_until_a_checkpoint_after_a_whole_rewrite_or_too_many_extents(
        tmp_path: object) -> None:
    al = _log(tmp_path)
    al.invalidate()
    assert _reopened(al) == (None, "it says everything may have changed")
    began = al.begin_checkpoint()
    al.invalidate()  # rewritten again while the checkpoint ran: still everything
    al.end_checkpoint(began)
    assert _reopened(al)[0] is None
    al.ensure([4])  # noted while everything: listed after the checkpoint that began before
    al.checkpoint()
    assert _reopened(al) == ({4}, "")  # and kept by the next one (hot)
    al.checkpoint()
    assert _reopened(al) == (set(), "")
    al.ensure(range(MAX_EXTENTS + 1))
    assert _reopened(al)[0] is None
    al.checkpoint()
    assert _reopened(al) == (set(), "")
    al.close()


def test_a_checkpoint_that_began_during_a_whole_rewrite_keeps_everything(
        tmp_path: object) -> None:
    al = _log(tmp_path)
    with al.rewriting():
        assert _reopened(al)[0] is None  # durably before the rewrite starts
        began = al.begin_checkpoint()  # its syncs may come before the rewrite's last stores
    al.end_checkpoint(began)
    assert _reopened(al)[0] is None
    al.checkpoint()  # began after the rewrite ended
    assert _reopened(al) == (set(), "")
    al.close()


def test_a_checkpoint_begun_and_ended_inside_a_whole_rewrite_keeps_everything(
        tmp_path: object) -> None:
    al = _log(tmp_path)
    with al.rewriting():
        al.checkpoint()  # the rewrite may not have reached what it synced
        assert _reopened(al)[0] is None
    assert _reopened(al)[0] is None
    al.checkpoint()
    assert _reopened(al) == (set(), "")
    al.close()


def test_listed_never_waits_for_the_lock(tmp_path: object) -> None:
    """The export asks on its event loop: an extent the file lists but not hot since the last
    checkpoint is made hot only if the lock is free at once; else the write goes to the
    writer's thread (False)."""
    al = _log(tmp_path)
    al.ensure([2, 3])
    al.begin_checkpoint()  # the file still lists 2 and 3; neither is hot now
    with al._lock:  # another thread syncing the file
        assert not al.listed(3 * 1024, 1)
    assert al.listed(3 * 1024, 1)  # the lock is free: made hot
    with al._lock:  # another thread syncing the file
        assert al.listed(3 * 1024, 1)  # hot: a set lookup
        assert not al.listed(2 * 1024, 1)  # would need the lock: not now
    assert al.listed(2 * 1024, 1)  # the lock is free: made hot
    assert not al.listed(9 * 1024, 1)  # not in the file: the writer's thread lists it
    al.close()


def test_an_idle_log_stays_due_until_checkpoints_empty_it(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(activity, "CHECKPOINT_SECONDS", 0.0)
    al = _log(tmp_path)
    assert not al.due()  # lists nothing
    al.ensure([2, 3])
    rounds = 0
    while al.due():  # nothing written after the first: the hot set ages out
        al.checkpoint()
        rounds += 1
    assert rounds == 2 and _reopened(al) == (set(), "")
    with al.holding([5]):  # a pinned extent alone is not a reason for checkpoints
        al.checkpoint()
        al.checkpoint()
        assert _reopened(al) == ({5}, "") and not al.due()
    al.close()


@pytest.mark.parametrize("damage", ["missing", "empty", "flip", "truncate", "binding"])
def test_a_log_it_cannot_vouch_for_is_none_and_a_reason(tmp_path: object, damage: str) -> None:
    al = _log(tmp_path)
    al.ensure([1])
    al.ensure([2])
    al.close()
    binding = BIND
    if damage == "missing":
        os.unlink(al.path)
    elif damage == "empty":
        open(al.path, "wb").close()
    elif damage == "flip":  # in the older slot: either may be the one a crash tore
        saved, _ = read(al.path)
        assert saved is not None
        flip_byte(al.path, (saved.seq + 1) % 2 * SLOT + 20)
    elif damage == "truncate":
        os.truncate(al.path, SLOT + 10)
    else:
        binding = new_binding()
    got, why = _reopened(al, binding)
    assert got is None and why == {
        "missing": "it is missing", "empty": "it is empty", "flip": "torn or checksum mismatch",
        "truncate": "torn or checksum mismatch",
        "binding": "it belongs to another generation of the hashes"}[damage]


def test_a_new_start_outnumbers_the_slots_of_the_old_file(tmp_path: object) -> None:
    al = _log(tmp_path)
    for e in range(5):
        al.ensure([e])
    al.close()
    again = ActivityLog(al.path)
    assert again.load(BIND) == ({0, 1, 2, 3, 4}, "")
    other = new_binding()
    again.start(other, keep=[9])
    assert ActivityLog(al.path).load(other) == ({9}, "")
    again.ensure([10])
    assert ActivityLog(al.path).load(other) == ({9, 10}, "")
    again.close()


def test_before_start_nothing_is_written(tmp_path: object) -> None:
    al = ActivityLog(os.path.join(str(tmp_path), "v.al"))
    al.pin([1])  # an owner still opening (its open decides what start() lists)
    assert not os.path.exists(al.path)
    al.start(BIND)
    assert al.load(BIND) == ({1}, "")  # pinned: listed
    al.close()


# -- the source: the state directory's log, the export's writes, the checkpoints ------------

BS = 4096
EB = 1024


def _source(tmp_path: object) -> tuple[str, str]:
    d = os.path.join(str(tmp_path), "st")
    vol = os.path.join(str(tmp_path), "vol.img")
    with open(vol, "wb") as fh:
        fh.truncate(4 * EB * BS)  # 4 extents
    return d, vol


def test_the_source_view_after_a_restart_of_the_machine(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    from replicator.blockmap import Geometry
    from replicator.planning import Planner
    from replicator.source_state import StateStore

    d, vol = _source(tmp_path)
    geo = Geometry(4 * EB * BS, BS)
    monkeypatch.setenv("DRCTL_BOOT_ID", "boot-1")
    store = StateStore(d, vol, activity=True)
    st = store.load()
    assert st.how == "" and store.al is not None and store.al.everything
    st.generation, st.size, st.block_size = "g", geo.size, BS
    st.view = store.set_view(geo.zero_hashes())
    store.save(st)
    store.sync_view()
    store.al.checkpoint()  # what the capture agent's checkpointer does
    planner = Planner("v", 0, geo, st.view, st.seen, activity=store.al)
    planner.forget([2 * EB + 5])  # a view entry changes: its extent is listed first
    assert _logged(store) == {2}
    # the machine goes down (the agent never stops); its next boot
    monkeypatch.setenv("DRCTL_BOOT_ID", "boot-2")
    after = StateStore(d, vol, activity=True).load()
    assert (after.how, after.logged, after.why) == ("crash", {2}, "")
    # ... again, before the first resync compared them: still to compare (state.json)
    monkeypatch.setenv("DRCTL_BOOT_ID", "boot-3")
    assert StateStore(d, vol, activity=True).load().logged == {2}
    # a damaged log: the view is not known
    flip_byte(os.path.join(d, "activity.log"), 30)
    monkeypatch.setenv("DRCTL_BOOT_ID", "boot-4")
    lost = StateStore(d, vol, activity=True).load()
    assert lost.how == "" and len(lost.view) == 0
    assert lost.why == ("the agent did not stop cleanly, the machine restarted since and its "
                        f"activity log {d}/activity.log cannot be used (torn or checksum "
                        "mismatch)")


def _logged(store: object) -> set[int]:
    from replicator.source_state import StateStore

    assert isinstance(store, StateStore) and store.al is not None
    saved, why = read(store.al.path)
    assert saved is not None and not saved.everything, why
    return set(saved.extents)


def test_the_exports_writes_are_listed_first_and_checkpoints_empty_the_log(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace
    from typing import cast

    from replicator.capture.checkpoint import Checkpointer
    from replicator.capture.nbdio import NbdExport
    from replicator.driver import PushDriver
    from replicator.source_state import StateStore

    d, vol = _source(tmp_path)
    store = StateStore(d, vol, activity=True)
    store.load()
    assert store.al is not None
    (export,) = NbdExport.open_group([("v", vol)], os.path.join(d, "journal"), BS)
    driver = cast(PushDriver, SimpleNamespace(store=store))
    checkpoints = Checkpointer([driver], [export])
    checkpoints.run_once()  # the log said everything (a new binding): now nothing
    assert _logged(store) == set()
    assert not export.listed(EB * BS, BS)
    export.write(EB * BS + 100, b"x" * 10)  # extent 1
    export.zero(3 * EB * BS, 2 * BS)  # extent 3
    assert _logged(store) == {1, 3} and export.listed(EB * BS, BS)
    writes: list[int] = []
    real = ActivityLog._write
    monkeypatch.setattr(ActivityLog, "_write", lambda al: (writes.append(1), real(al)))
    export.write(EB * BS + 5 * BS, b"y" * BS)  # listed already: the log is not written
    assert writes == []
    checkpoints.run_once()  # journal, volume and view synced: the log keeps the hot set
    assert _logged(store) == {1, 3} and writes == [1]
    checkpoints.run_once()  # nothing written since: the log is emptied
    assert _logged(store) == set() and writes == [1, 1]
    export.write(EB * BS, b"z" * BS)
    assert _logged(store) == {1}
    checkpoints.close()  # the journal too
    export.close()
    store.close()
