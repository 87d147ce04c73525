"""The background verify without processes: what a compared window says (judge), the journal's
range watch, the scrubber's repair cycle against a fake target, and the target's range listing
from its disk (staged blocks as staged)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from array import array
from collections.abc import Callable
from types import SimpleNamespace
from typing import cast

import pytest

from replicator.blockmap import UNKNOWN, Geometry, block_hash, hash_all
from replicator.capture.journal import ChangeJournal
from replicator.capture.journal_records import block_key
from replicator.capture.scrub import Scrubber, Span, judge, runs
from replicator.driver import PushDriver
from replicator.metrics import SourceMetrics
from replicator.planning import Planner
from replicator.replica import Replica
from tests.procs import write_random
from tests.unit.test_staging import BLOCKS, BS, Source


def test_judge_counts_only_fair_differences() -> None:
    span = Span(1, 10, 6)  # volume 1, blocks 10..15
    local = [1, 2, 3, 4, 5, 6]
    remote = [1, 9, 9, 9, 9, 6]  # 11..14 differ
    k = lambda b: block_key(1, b)  # noqa: E731
    v = judge(span, local, remote, unacked={k(12)}, written={k(13)}, known=set())
    assert v.mismatched == [11, 14] and not (v.still or v.repaired or v.rewritten)
    # known mismatches: equal now (repaired), still differing, rewritten by the application
    v = judge(span, local, remote, unacked=set(), written={k(13)},
              known={k(10), k(11), k(13), block_key(0, 12)})
    assert v.repaired == [10] and v.still == [11] and v.rewritten == [13]
    assert v.mismatched == [12, 14]  # block 12 of another volume is not this one's
    # a known mismatch whose repair the target has not acknowledged yet is not judged
    v = judge(span, local, remote, unacked={k(11)}, written=set(), known={k(11)})
    assert v.still == [] and v.mismatched == [12, 13, 14]


def test_runs_name_blocks_compactly() -> None:
    assert runs([3]) == "3"
    assert runs([0, 1, 2, 7, 9, 10]) == "0-2, 7, 9-10"
    assert runs(list(range(0, 40, 2)), limit=3) == "0, 2, 4, ..."


def _journal(tmp_path: object) -> ChangeJournal:
    vol = os.path.join(str(tmp_path), "vol.img")
    with open(vol, "wb") as fh:
        fh.truncate(64 * BS)
    return ChangeJournal(os.path.join(str(tmp_path), "journal"), BS, os.open(vol, os.O_RDWR))


def test_a_watch_lists_unacknowledged_blocks_and_notes_writes_to_its_range(
        tmp_path: object) -> None:
    j = _journal(tmp_path)
    j.write(2 * BS, b"a" * BS)
    j.cut()  # point 1: block 2, not acknowledged
    j.write(3 * BS, b"b" * 2 * BS)  # blocks 3, 4 in the open point
    w = j.watch(block_key(0, 0), block_key(0, 16))
    assert w.unacked == {2, 3, 4} and w.written == set()
    j.write(5 * BS, b"c" * BS)
    j.zero(14 * BS, 4 * BS)  # 14..17: only 14, 15 are in the range
    j.write(40 * BS, b"d" * BS)  # outside
    j.unwatch(w)
    j.write(6 * BS, b"e" * BS)  # after the watch
    assert w.written == {5, 14, 15} and not j.watches
    assert j.unacknowledged([2, 3, 7, 40]) == {2, 3, 40}
    j.cut()
    j.release(2)
    assert j.unacknowledged(range(64)) == set()
    w = j.watch(0, 64)
    assert w.unacked == set()
    j.unwatch(w)
    j.close()


def test_the_targets_range_listing_reads_the_disk_and_counts_staged_blocks_as_staged(
        tmp_path: object) -> None:
    d = str(tmp_path)
    src = Source()
    r = Replica(d, "v", "warm")  # warm: staged points wait in the redo journal
    r.prepare(BLOCKS * BS, BS)
    for b in src.point({b: 0x40 + b for b in range(BLOCKS)}):
        r.stage(b)
    r.commit(src.seq)
    r.apply_staged()
    want = list(hash_all(memoryview(bytes(src.model)), src.geo))
    assert list(r.hashes_in(0, BLOCKS)) == want
    for b in src.point({3: 0x99, 20: None}):  # staged, not in the image yet
        r.stage(b)
    r.commit(src.seq)
    want = list(hash_all(memoryview(bytes(src.model)), src.geo))
    assert list(r.hashes_in(0, BLOCKS)) == want
    assert list(r.hashes_in(2, 3)) == want[2:5] and list(r.hashes_in(30, 99)) == want[30:]
    os.pwrite(r.img_fd, b"rot", 7 * BS + 100)  # bit rot in the image
    got = list(r.hashes_in(0, BLOCKS))
    assert got[7] != want[7] and got[:7] == want[:7] and got[8:] == want[8:]
    assert r.index()[7] == want[7]  # the index does not know: only the disk says it
    r.close()
    again = Replica(d, "v", "warm")  # frames found at open are read for their blocks
    got2 = list(again.hashes_in(0, BLOCKS))
    assert got2 == got and got2[3] == block_hash(b"\x99" * BS)
    assert Geometry(BLOCKS * BS, BS).blocks == len(got2)
    again.close()


class _Replica:
    """The target's side of BlockHashes over a bytearray; ``during``: run while answering (a
    write racing the check)."""

    def __init__(self, content: bytes) -> None:
        self.content = bytearray(content)
        self.during: list[Callable[[], None]] = []

    async def block_hashes(self, volume: str, from_disk: bool = False, timeout: float = 0.0,
                           first_block: int = 0, count: int = 0
                           ) -> tuple[array[int], int, int]:
        assert from_disk and volume == "v"
        out = hash_all(memoryview(bytes(self.content)), Geometry(len(self.content), BS))
        for fn in self.during:
            fn()
        return out[first_block : first_block + count], len(self.content), 0


def _scrubber(tmp_path: object, blocks: int = 16) -> tuple[Scrubber, _Replica, list[int]]:
    vol = os.path.join(str(tmp_path), "vol.img")
    write_random(vol, blocks * BS, seed=5)
    with open(vol, "rb") as fh:
        content = fh.read()
    geo = Geometry(len(content), BS)
    replica = _Replica(content)
    driver = SimpleNamespace(
        o=SimpleNamespace(volume="v", block_size=BS, path=vol), geo=geo,
        m=SourceMetrics("v"), client=replica, state=SimpleNamespace(generation="g"),
        planner=Planner("v", 0, geo, hash_all(memoryview(content), geo),
                        array("Q", [UNKNOWN]) * geo.chunks))
    journal = ChangeJournal(os.path.join(str(tmp_path), "journal"), BS, os.open(vol, os.O_RDWR))
    woken: list[int] = []
    scrub = Scrubber([cast(PushDriver, driver)], journal, 1 << 20, asyncio.Event(),
                     lambda: woken.append(1))
    scrub.fds = [os.open(vol, os.O_RDONLY)]
    scrub.set_active(True)
    return scrub, replica, woken


def _value(scrub: Scrubber, name: str) -> float:
    m = scrub.drivers[0].m
    return float(m.value(getattr(m, name)))


async def test_a_mismatch_is_shipped_again_as_a_write_until_a_check_confirms_it(
        tmp_path: object) -> None:
    scrub, replica, woken = _scrubber(tmp_path)
    journal = scrub.journal
    good = bytes(replica.content[5 * BS : 6 * BS])
    replica.content[5 * BS + 9] ^= 0xFF  # bit rot
    span = scrub._next_span()
    assert span == Span(0, 0, 16)
    verdict = await scrub.check(span)
    assert verdict is not None and verdict.mismatched == [5]
    await scrub._act(span, verdict)
    assert _value(scrub, "verify_mismatched") == 1 and _value(scrub, "verify_unrepaired") == 1
    assert _value(scrub, "verify_checked") == 16 * BS and _value(scrub, "verify_pass_end") > 0
    names = {f.name for f in scrub.drivers[0].m.families}  # drctl_replication_<name>
    assert "verify_last_pass_duration_seconds" in names and "verify_pass_seconds" not in names
    assert scrub.drivers[0].planner.view[5] == UNKNOWN and woken  # shipped as DATA, at once
    first = scrub.capture_clock()
    assert first is not None and first <= time.time()  # the lag counts from here
    cp = journal.cut()
    assert journal.extract()[0].blocks == {5: good}  # the volume's content, journaled
    assert not scrub._next_span().recheck  # not acknowledged: nothing to re-check yet
    journal.release(cp)
    assert scrub.capture_clock() == first  # acknowledged, not yet confirmed: still counted
    span = scrub._next_span()
    assert span == Span(0, 5, 1, recheck=True)
    verdict = await scrub.check(span)  # the repair did not hold: shipped again
    assert verdict is not None and verdict.still == [5]
    await scrub._act(span, verdict)
    assert scrub.repairs[block_key(0, 5)].attempts == 2 and journal.open_blocks == {5}
    journal.release(journal.cut())
    replica.content[5 * BS : 6 * BS] = good  # the target applied it
    span = scrub._next_span()
    verdict = await scrub.check(span)
    assert verdict is not None and verdict.repaired == [5]
    await scrub._act(span, verdict)
    assert _value(scrub, "verify_unrepaired") == 0 and _value(scrub, "verify_repaired") == 1
    assert _value(scrub, "verify_mismatched") == 1  # counted once
    assert scrub.capture_clock() is None and not scrub.repairs


async def test_blocks_written_or_unacknowledged_during_a_check_are_not_judged(
        tmp_path: object) -> None:
    scrub, replica, _woken = _scrubber(tmp_path)
    journal = scrub.journal
    journal.write(2 * BS, b"x" * BS)  # not acknowledged: the replica may not have it
    os.pwrite(journal.fds[0], b"x" * BS, 2 * BS)

    def racing_write() -> None:  # written while the target answers
        journal.write(7 * BS, b"y" * BS)
        os.pwrite(journal.fds[0], b"y" * BS, 7 * BS)

    replica.during.append(racing_write)
    verdict = await scrub.check(Span(0, 0, 16))
    assert verdict is not None and verdict.mismatched == []
    replica.during.clear()
    scrub.set_active(False)  # a resync began meanwhile: the window is not judged
    replica.content[0] ^= 1
    scrub.set_active(True)
    era = scrub.era
    replica.during.append(lambda: scrub.set_active(False))
    replica.during.append(lambda: scrub.set_active(True))
    assert await scrub.check(Span(0, 0, 16)) is None and scrub.era == era + 2


async def _until(cond: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_a_volume_read_error_while_reshipping_pauses_the_verify_not_the_capture_loop(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    scrub, replica, woken = _scrubber(tmp_path)
    replica.content[5 * BS + 9] ^= 0xFF  # a mismatch: block 5 is read again to be reshipped
    real = os.pread

    def failing(fd: int, n: int, offset: int) -> bytes:
        if offset == 5 * BS:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, n, offset)

    monkeypatch.setattr(os, "pread", failing)

    async def capture_loop() -> str:
        await _until(lambda: scrub.failing, "the verify to pause")
        return "still capturing"

    with caplog.at_level(logging.WARNING, logger="replicator.capture.scrub"):
        assert await scrub.alongside(capture_loop()) == "still capturing"
    assert scrub.failing.startswith("VolumeError: cannot read the volume at block 5")
    paused = [r for r in caplog.records if "background verify paused" in r.getMessage()]
    assert len(paused) == 1, caplog.text
    # not journaled, still a known mismatch: its next check ships it again
    assert block_key(0, 5) in scrub.repairs and not scrub.journal.open_blocks and not woken


async def test_a_volume_that_cannot_be_opened_pauses_the_verify_not_the_capture_loop(
        tmp_path: object, caplog: pytest.LogCaptureFixture) -> None:
    scrub, _replica, _woken = _scrubber(tmp_path)
    for fd in scrub.fds:
        os.close(fd)
    scrub.fds = []
    scrub.drivers[0].o.path = os.path.join(str(tmp_path), "gone.img")

    async def capture_loop() -> str:
        await _until(lambda: scrub.failing, "the verify to pause")
        return "still capturing"

    with caplog.at_level(logging.WARNING, logger="replicator.capture.scrub"):
        assert await scrub.alongside(capture_loop()) == "still capturing"
    assert "cannot open the volume" in scrub.failing and "gone.img" in scrub.failing
    assert len([r for r in caplog.records if "background verify paused" in r.getMessage()]) == 1


async def test_a_block_written_while_it_is_read_for_a_repair_is_not_journaled_after_the_write(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """The repair's read runs on a thread: a write landing meanwhile ships the block, and the
    (older) content read must not be journaled after it."""
    scrub, replica, _woken = _scrubber(tmp_path)
    journal = scrub.journal
    replica.content[5 * BS + 9] ^= 0xFF
    replica.content[9 * BS + 1] ^= 0xFF
    good9 = os.pread(scrub.fds[0], BS, 9 * BS)
    real = os.pread

    def racing(fd: int, n: int, offset: int) -> bytes:
        data = real(fd, n, offset)
        if offset == 5 * BS:  # the application writes block 5 just after it was read
            journal.write(5 * BS, b"z" * BS)
            os.pwrite(journal.fds[0], b"z" * BS, 5 * BS)
        return data

    span = scrub._next_span()
    verdict = await scrub.check(span)
    assert verdict is not None and verdict.mismatched == [5, 9]
    monkeypatch.setattr(os, "pread", racing)
    await scrub._act(span, verdict)
    monkeypatch.undo()
    journal.cut()
    journaled = {b: bytes(v or b"") for b, v in journal.extract()[0].blocks.items()}
    assert journaled == {5: b"z" * BS, 9: good9}  # the application's block 5, not ours
