"""The source's change journal: every acknowledged write, in order, durable before the reply.

Journal mode (normal): a WRITE record carries the new content of whole blocks (the NBD export
reads, merges and journals whole blocks for unaligned writes), ZERO records aligned zero
ranges. The writes between two markers form a *consistency point* (CP): a client FLUSH closes
one, and so does a CUT the agent writes itself (so that a client that rarely flushes does not
hold back replication; any prefix of the journal is a state a crash could have left, hence
crash-consistent). Closed CPs are extracted in order, shipped (each block once, its last
content in the CP) and released when the target acknowledged them; released records are
dropped by rewriting the journal.

Bitmap mode: when the journal would grow past its limit (a slow or broken link), the unreleased
records are folded into a set of dirty blocks (the volume is fdatasynced first: it holds their
data), the journal is rewritten with DIRTY records, and later writes only add DIRTY records.
``begin_resync`` returns to journal mode and hands the dirty blocks to a resync pass; they stay
recorded (``resyncing``) until ``end_resync``, so a crash or a second overflow loses nothing.

Consistency groups: one journal serves several volumes, so their writes share one order and
every consistency point spans all of them. A record's offset carries the volume's index in its
top byte; a block is named by ``block_key(volume, block)``.

Large writes by reference: a write of REF_MIN bytes or more is not copied into the journal
while the points not yet acknowledged hold less than REF_BUDGET of them in memory. Its record is
a DIRTY record in the open point (the blocks changed; their content is on the volume), its data
is kept in memory with the point until the target acknowledges it, and the group commit syncs
the volume before the write is acknowledged (``ref_seq``). So a large write reaches this disk
once, not twice, and is not read back to be shipped. A replay counts its blocks as not
acknowledged unless a RELEASE covers its point, as it does every write (the first pass after a
restart resyncs them from the volume); earlier versions count them until a resync. A replay
writes the data records back into the volume, so a write goes by reference only if no data
record in the file covers any of its blocks (``data_blocks``): replaying an older write over
it would undo it, and a replay cannot tell whether its volume sync ended. The journal's limit
counts these bytes too: it bounds what is not yet shipped, wherever it is.

Records: kind, offset, length, checksum (of the other fields and the data). BASE is the first
record of a rewritten journal (offset: the next CP number; length: 1 in bitmap mode). On start
the journal is replayed into the volumes (idempotent) and they are fdatasynced.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator

from drctl.files import WRITE_AHEAD, SpaceAhead, fsync_dir, write_all, zeroes
from replicator.capture.journal_records import (
    BLOCK_MASK,
    HEAD,
    KEY_SHIFT,
    KIND_BASE,
    KIND_CUT,
    KIND_DIRTY,
    KIND_FLUSH,
    KIND_RELEASE,
    KIND_WRITE,
    KIND_ZERO,
    MARKERS,
    VOL_SHIFT,
    ConsistencyPoint,
    ExtractedPoint,
    RangeWatch,
    Unacknowledged,
    block_key,
    record,
    record_head,
    write_zeroes,
)

log = logging.getLogger(__name__)

REWRITE_BYTES = 8 << 20  # rewrite once this much of the journal is released
IDLE_REWRITE_BYTES = 1 << 20  # ... or this much once nothing is left to ship
REF_MIN = 256 << 10  # a write this large is kept in memory, not copied into the journal ...
REF_BUDGET = 64 << 20  # ... while the unacknowledged points hold less than this of them


class ChangeJournal:
    def __init__(self, path: str, block_size: int, volume_fds: int | list[int],
                 limit: int = 1 << 30) -> None:
        self.path = path
        self.block_size = block_size
        self.fds = [volume_fds] if isinstance(volume_fds, int) else list(volume_fds)
        self.limit = limit
        self.lock = threading.Lock()
        # held by a writer from a record's append to its volume write (commit.py), so that
        # whoever takes it sees either both or neither (a sync's target, the scrub's repair)
        self.order = threading.Lock()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.size = 0  # the end of the last record: the next one is written there
        self.ahead = SpaceAhead()  # zeroes written past ``size`` (drctl/files.py)
        self.next_cp = 1
        self.closed: deque[ConsistencyPoint] = deque()
        self.open_start = 0
        self.open_first_at: float | None = None
        self.open_blocks: set[int] = set()
        # the open point's writes by reference: (their record's place from the point's start,
        # their data); a DIRTY record found elsewhere in a point is a change bitmap's
        self.open_refs: list[tuple[int, bytes]] = []
        self.ref_bytes = 0  # bytes of the writes by reference not acknowledged yet
        # by volume: the record number of its last write by reference, and the number up to
        # which every volume write of a record is synced
        self.ref_seq = [0] * len(self.fds)
        self.volume_synced = [0] * len(self.fds)
        self.data_blocks: set[int] = set()  # blocks of the WRITE and ZERO records in the file
        self.overflowed = False
        self.dirty: set[int] = set()
        self.dirty_since: float | None = None
        self.resyncing: set[int] = set()
        self.resync_since: float | None = None
        self.released_cp = 0
        self.overflows = 0
        # bumped whenever the shipper has something new to decide on (a point opened, a
        # client FLUSH closed one, the journal overflowed, a change recorded in bitmap mode),
        # not by every write into an open point nor by the shipper's own cuts: the export
        # wakes the shipper only then (take_news)
        self.news = 0
        self._news_seen = 0
        self.flushes = 0
        self.replayed = 0
        self.seq = 0  # appends ever made by this process: GroupCommit's clock
        self.shape = 0  # bumped by every rewrite (a compaction started before one gives up)
        self.watches: list[RangeWatch] = []
        # a rewrite renamed a new file over the journal: the next sync() fsyncs the directory
        # too, so no write acknowledged into the new file can come back without it after a crash
        self.renamed = False
        self._replay()

    # -- start -----------------------------------------------------------------------------

    def _records(self, raw: memoryview, checked: bool = True
                 ) -> Iterator[tuple[int, int, int, int, int, memoryview]]:
        """(kind, offset field, volume, offset in it, length, data) of each whole record, up
        to a torn tail (that write was never acknowledged) or a record of another journal.
        ``checked`` false: records this process wrote, their checksums not computed again."""
        pos = 0
        while pos + HEAD.size <= len(raw):
            kind, offset, length, check = HEAD.unpack_from(raw, pos)
            end = pos + HEAD.size + (length if kind == KIND_WRITE else 0)
            data = raw[pos + HEAD.size : end]
            if end > len(raw) or (checked and HEAD.unpack_from(
                    record(kind, offset, length, data))[3] != check):
                return
            vol, at = offset >> VOL_SHIFT, offset & ((1 << VOL_SHIFT) - 1)
            if kind in (KIND_WRITE, KIND_ZERO, KIND_DIRTY) and vol >= len(self.fds):
                return
            yield kind, offset, vol, at, length, data
            pos = end

    def _replay(self) -> None:
        raw = memoryview(os.pread(self.fd, os.fstat(self.fd).st_size, 0))
        unacked = Unacknowledged()
        for kind, offset, vol, at, length, data in self._records(raw):
            if kind == KIND_WRITE:
                os.pwrite(self.fds[vol], data, at)
                self.replayed += 1
            elif kind == KIND_ZERO:
                write_zeroes(self.fds[vol], at, length)
                self.replayed += 1
            elif kind == KIND_BASE:
                self.next_cp = max(self.next_cp, offset)
            elif kind in MARKERS:
                self.next_cp = max(self.next_cp, offset + 1)
            unacked.note(kind, offset, self._blocks(vol, at, length), length)
        self.dirty = unacked.blocks()
        self.released_cp = unacked.released
        if self.replayed:
            self._sync_volumes()
        if self.dirty:
            self.dirty_since = os.fstat(self.fd).st_mtime
        # Everything replayed is in the volume now and stays listed as dirty until the agent's
        # first pass (a resync) has shipped it; the journal starts over, keeping the CP count.
        self._rewrite(sorted(self.dirty), [])

    def _sync_volumes(self, vols: Iterable[int] | None = None) -> None:
        """fdatasync the volumes (``vols``: those of these indexes)."""
        for v in range(len(self.fds)) if vols is None else vols:
            os.fdatasync(self.fds[v])

    def _blocks(self, vol: int, offset: int, length: int) -> range:
        bs = self.block_size
        return range(block_key(vol, offset // bs),
                     block_key(vol, (offset + max(1, length) - 1) // bs) + 1)

    # -- appending (on the event loop or the export's writer thread; no I/O but the append) --

    def write(self, offset: int, data: bytes | bytearray | memoryview, vol: int = 0) -> int:
        """Journal whole blocks of new content (a large write by reference: the caller writes
        it to the volume before the record is synced). Returns the record number to wait
        for."""
        if (len(data) >= REF_MIN and not self.overflowed
                and self._may_refer(self._blocks(vol, offset, len(data)), len(data))):
            # likely by reference (decided under the lock): the copy is made outside it
            return self._append(KIND_WRITE, vol, offset, len(data), data, ref=bytes(data))
        return self._append(KIND_WRITE, vol, offset, len(data), data)

    def zero(self, offset: int, length: int, vol: int = 0) -> int:
        return self._append(KIND_ZERO, vol, offset, length)

    def flush(self) -> int:
        """A client FLUSH: closes the open consistency point (if it holds any write)."""
        with self.lock:
            self.flushes += 1
            if self.overflowed or self.open_first_at is None:
                return self._bump()  # nothing new: just wait for what is already appended
            self.news += 1  # a point the shipper did not cut itself
            return self._close(KIND_FLUSH)

    def cut(self) -> int:
        """Close the open consistency point here (even an empty one). Returns its number."""
        with self.lock:
            if self.overflowed:
                raise RuntimeError("cut in bitmap mode")
            cp = self.next_cp
            self._close(KIND_CUT)
            return cp

    def try_cut(self) -> int | None:
        """:meth:`cut`, or None if the journal overflowed (checked under the lock: a writer
        thread may overflow it at any time)."""
        with self.lock:
            if self.overflowed:
                return None
            cp = self.next_cp
            self._close(KIND_CUT)
            return cp

    def cut_if_flushed(self) -> int | None:
        """Close an empty point (the volumes as at the last FLUSH or cut) and return its
        number; None, and nothing closed, if the open point holds writes."""
        with self.lock:
            if self.open_first_at is not None or self.overflowed:
                return None
            cp = self.next_cp
            self._close(KIND_CUT)
            return cp

    def _close(self, kind: int) -> int:
        cp = self.next_cp
        start = self.open_start
        self._raw_append(record(kind, cp, 0))
        self.closed.append(ConsistencyPoint(cp, start, self.size, self.open_first_at or 0.0,
                                            self.open_blocks, refs=self.open_refs))
        self.next_cp += 1
        self.open_start, self.open_first_at, self.open_blocks = self.size, None, set()
        self.open_refs = []
        return self._bump()

    def take_news(self) -> bool:
        """Whether ``news`` moved since the last call (one caller: the exports' loop)."""
        news = self.news
        if news == self._news_seen:
            return False
        self._news_seen = news
        return True

    def _append(self, kind: int, vol: int, offset: int, length: int,
                data: bytes | bytearray | memoryview = b"", ref: bytes | None = None) -> int:
        tagged = vol << VOL_SHIFT | offset
        blocks = self._blocks(vol, offset, length)
        with self.lock:
            for w in self.watches:
                w.written.update(range(max(w.lo, blocks.start), min(w.hi, blocks.stop)))
            if not self.overflowed and self._unreleased() + HEAD.size + len(data) > self.limit:
                self._overflow()
            if self.overflowed:
                self.dirty.update(blocks)
                if self.dirty_since is None:
                    self.dirty_since = time.time()
                self._raw_append(record(KIND_DIRTY, tagged, length))
                self.news += 1
            else:
                if ref is not None and self._may_refer(blocks, length):
                    self.open_refs.append((self.size - self.open_start, ref))
                    self._raw_append(record(KIND_DIRTY, tagged, length))
                    self.ref_bytes += length
                    self.ref_seq[vol] = self.seq + 1
                else:  # header and data in one system call, the data not copied here
                    self._raw_append(record_head(kind, tagged, length, data), data)
                    self.data_blocks.update(blocks)
                self.open_blocks.update(blocks)
                if self.open_first_at is None:
                    self.open_first_at = time.time()
                    self.news += 1
            return self._bump()

    def _may_refer(self, blocks: range, length: int) -> bool:
        """May a write of ``length`` bytes over ``blocks`` go by reference (the budget, no data
        record of them in the file)? Under the lock; unlocked, a hint only."""
        return self.ref_bytes + length <= REF_BUDGET and self.data_blocks.isdisjoint(blocks)

    def _unreleased(self) -> int:
        """Under the lock: the bytes of records the target has not acknowledged, and of the
        writes by reference among them (those the limit counts: the released head leaves the
        file at the next compaction)."""
        return (self.size - (self.closed[0].start if self.closed else self.open_start)
                + self.ref_bytes)

    @property
    def rewrite_bytes(self) -> int:
        """Compact once this much is released: 8 MiB, or an eighth of a smaller limit (so the
        records stay within the limit plus an eighth on a healthy link; the file holds up to
        WRITE_AHEAD more, written ahead)."""
        return min(REWRITE_BYTES, max(64 << 10, self.limit // 8))

    def _raw_append(self, rec: bytes, data: bytes | bytearray | memoryview = b"") -> None:
        """Under the lock. A failed append (a full disk) is cut off again before the error
        goes up: no torn record before the next one (a replay stops at the first)."""
        try:
            self.size += write_all(self.fd, [rec, data], self.size)
        except OSError:
            os.ftruncate(self.fd, self.size)
            self.ahead.reset(self.size)
            raise
        self.ahead.appended(self.size)

    def _bump(self) -> int:
        self.seq += 1
        return self.seq

    # -- durability ----------------------------------------------------------------------------

    def sync(self, upto: int | None = None, periodic: bool = False) -> None:
        """Make every record appended so far durable. In bitmap mode the volumes hold the
        data, so they are synced too, and so is a volume with a write by reference among the
        records up to number ``upto`` (every one whose volume write is made: the group commit
        reads it under the ``order`` lock; None: any such write appended so far). A rewrite
        fsyncs the new file before swapping it in; the swap's rename is made durable here (the
        directory's fsync), before any write appended to the new file is acknowledged, and
        outside the lock (appends go on meanwhile). Space is written ahead of the last record
        while syncs cover little (drctl/files.py; a replay stops at the first zero header, as
        at a torn record); a ``periodic`` sync (the checkpoint's) does not change that rule."""
        with self.lock:
            if self.fd >= 0:  # zeroes written now reach the disk with the sync below
                self.ahead.before_sync(self.fd, self.size, decide=not periodic)
            fd = os.dup(self.fd)
            # bitmap mode: every volume; else those with a write by reference not synced
            vols = range(len(self.fds)) if self.overflowed else [
                v for v, n in enumerate(self.ref_seq) if n > self.volume_synced[v]]
            renamed = self.renamed
            self.renamed = False
        try:
            if vols:
                self._sync_volumes(vols)
                if upto is not None:
                    for v in vols:
                        self.volume_synced[v] = max(self.volume_synced[v], upto)
            os.fdatasync(fd)
            if renamed:
                fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        except BaseException:
            if renamed:
                self.renamed = True
            raise
        finally:
            os.close(fd)

    # -- shipping --------------------------------------------------------------------------

    @property
    def first_dirty_at(self) -> float | None:
        """When the oldest write the target does not hold yet was acknowledged to the client
        (None: it holds everything)."""
        # a copy first (one C call): the metrics thread reads this while the loop appends
        times = [cp.first_at for cp in tuple(self.closed) if cp.first_at]
        times += [t for t in (self.open_first_at, self.dirty_since, self.resync_since)
                  if t is not None]
        return min(times) if times else None

    def watch(self, lo: int, hi: int) -> RangeWatch:
        """Start noting writes to block keys [lo, hi); call :meth:`unwatch` when done."""
        with self.lock:
            w = RangeWatch(lo, hi, self._unacked_in(lo, hi))
            self.watches.append(w)
        return w

    def unwatch(self, w: RangeWatch) -> None:
        with self.lock:
            self.watches.remove(w)

    def unacknowledged(self, keys: Iterable[int]) -> set[int]:
        """Those of ``keys`` the target has not acknowledged (in an unreleased or the open
        point, the change bitmap or a running resync)."""
        wanted = set(keys)
        out: set[int] = set()
        with self.lock:
            for s in self._unacked_sets():
                out |= wanted & s
        return out

    def _unacked_sets(self) -> list[set[int]]:
        return [*(cp.blocks for cp in self.closed), self.open_blocks, self.dirty, self.resyncing]

    def _unacked_in(self, lo: int, hi: int) -> set[int]:
        out: set[int] = set()
        for s in self._unacked_sets():
            if len(s) <= hi - lo:
                out.update(k for k in s if lo <= k < hi)
            else:
                out.update(k for k in range(lo, hi) if k in s)
        return out

    # Points are extracted in order (and requeued all at once), so the extracted ones are a
    # prefix of ``closed``: the ones to ship are found from its end, in time proportional to
    # their number, not to the points waiting for their acks.

    def _unextracted(self) -> list[ConsistencyPoint]:
        """Under the lock: the closed points not extracted yet, in order."""
        out: list[ConsistencyPoint] = []
        for cp in reversed(self.closed):
            if cp.extracted:
                break
            out.append(cp)
        out.reverse()
        return out

    def ready(self) -> bool:
        try:  # without the lock: another thread may empty it meanwhile
            return not self.closed[-1].extracted
        except IndexError:
            return False

    def unextracted_bytes(self) -> int:
        """Journal bytes of the closed points not yet extracted."""
        with self.lock:
            return sum(cp.end - cp.start for cp in self._unextracted())

    def requeue(self) -> None:
        """The points extracted but not released will not be acknowledged where they were
        sent (the stream failed): the next :meth:`extract` returns them again."""
        with self.lock:
            for cp in self.closed:
                cp.extracted = False

    def extract(self, upto: int | None = None) -> list[ExtractedPoint]:
        """The closed CPs not yet extracted (up to number ``upto``), each as its blocks' last
        content. Reads a duplicate descriptor: a rewrite meanwhile replaces the file, never
        changes it. Takes the ``order`` lock first: every write in an extracted point has
        reached the volume then (a writer holds it from its record to its volume write), so a
        point the target acknowledges, and the journal then drops or replays as acknowledged,
        is never ahead of the volume."""
        with self.order, self.lock:
            todo = [cp for cp in self._unextracted() if upto is None or cp.cp <= upto]
            for cp in todo:
                cp.extracted = True
            spans = [(cp.cp, cp.start, cp.end, cp.first_at, cp.refs) for cp in todo]
            fd = os.dup(self.fd)
        try:
            return [self._read_point(fd, *span) for span in spans]
        finally:
            os.close(fd)

    def _read_point(self, fd: int, cp: int, start: int, end: int, first_at: float,
                    refs: list[tuple[int, bytes]]) -> ExtractedPoint:
        bs = self.block_size
        raw = memoryview(os.pread(fd, end - start, start))
        out = ExtractedPoint(cp, first_at=first_at)
        blocks = out.blocks
        kept = dict(refs)
        pos = 0
        while pos < len(raw):
            kind, offset, length, _check = HEAD.unpack_from(raw, pos)
            vol, at = offset >> VOL_SHIFT, offset & ((1 << VOL_SHIFT) - 1)
            ref = kept.get(pos) if kind == KIND_DIRTY else None
            pos += HEAD.size
            if kind == KIND_WRITE or ref is not None:
                if ref is not None:
                    data = memoryview(ref)
                else:
                    data = raw[pos : pos + length]
                    pos += length
                first = block_key(vol, at // bs)
                for k in range(0, length, bs):
                    blocks[first + k // bs] = data[k : k + bs]
            elif kind == KIND_ZERO:
                for b in self._blocks(vol, at, length):
                    blocks[b] = None
        return out

    def release(self, cp: int, inline: bool = True) -> bool:
        """The target acknowledged every CP up to ``cp``: drop their records. The journal is
        rewritten without them once enough piled up: here, or (``inline`` false) by the
        caller's :meth:`compact` off the event loop, which the True return asks for (then
        only once REWRITE_BYTES are released: the caller compacts when it goes idle)."""
        with self.lock:
            self.released_cp = max(self.released_cp, cp)
            self._raw_append(record(KIND_RELEASE, cp, 0))
            while self.closed and self.closed[0].cp <= cp:
                self.ref_bytes -= sum(len(data) for _at, data in self.closed.popleft().refs)
            head = self.closed[0].start if self.closed else self.open_start
            idle = not self.closed and self.open_first_at is None
            big = head >= self.rewrite_bytes or (inline and idle
                                                 and self.size >= IDLE_REWRITE_BYTES)
            if not self.overflowed and big:
                if not inline:
                    return True
                self._rewrite_tail(head)
            return False

    def compact(self) -> bool:
        """Rewrite the journal without its released head, for a thread: the copy of the
        unreleased records and its fsync happen without the lock (appends go on); under it,
        only the records appended meanwhile are copied (and synced) before the swap. False if
        the journal changed shape meanwhile (an overflow, a resync, another rewrite)."""
        with self.lock:
            if self.overflowed:
                return False
            head = self.closed[0].start if self.closed else self.open_start
            end, shape = self.size, self.shape
            header = self._header(sorted(self.resyncing))
            fd = os.dup(self.fd)
        # the dropped records were the only durable copy of their writes until the volume is
        # synced (a write is journaled and written to the volume before its reply, unsynced)
        self._sync_volumes()
        tmp = self.path + ".compact"
        try:
            tail = os.pread(fd, end - head, head)
        finally:
            os.close(fd)
        tail_blocks = self._data_blocks_in(tail)
        ahead = WRITE_AHEAD if self.ahead.on else 0  # the new file's space written ahead
        with open(tmp, "wb") as fh:
            fh.write(header)
            fh.write(tail)
            for piece in zeroes(ahead):
                fh.write(piece)
            fh.flush()
            os.fsync(fh.fileno())
        new_fd = os.open(tmp, os.O_RDWR | os.O_CLOEXEC)
        with self.lock:
            if self.shape != shape or self.overflowed or self.fd < 0:
                os.close(new_fd)
                os.unlink(tmp)
                return False
            delta = os.pread(self.fd, self.size - end, end)
            if delta:  # acknowledged writes among them must stay durable across the swap
                write_all(new_fd, [delta], len(header) + len(tail))
                os.fdatasync(new_fd)
            os.replace(tmp, self.path)
            self.renamed = True
            old, self.fd = self.fd, new_fd
            shift = head - len(header)
            for cp in self.closed:
                cp.start, cp.end = cp.start - shift, cp.end - shift
            self.open_start -= shift
            self.size -= shift
            self.ahead.reset(self.size, len(header) + len(tail) + ahead)
            self.shape += 1
            # what the new file holds: points released meanwhile are in it still
            self.data_blocks = tail_blocks | self._data_blocks_in(delta)
        os.close(old)
        return True

    # -- bitmap mode and resync --------------------------------------------------------------

    def _overflow(self) -> None:
        """Under the lock: fold every unreleased record into the dirty set (bitmap mode)."""
        for cp in self.closed:
            self.dirty |= cp.blocks
        self.dirty |= self.open_blocks
        self.dirty_since = self.first_dirty_at or time.time()
        self._sync_volumes()  # the volumes now carry the only copy of that data
        self.closed.clear()
        self.open_first_at, self.open_blocks = None, set()
        self.open_refs, self.ref_bytes = [], 0  # the volumes hold them (synced above)
        self.overflowed = True
        self.overflows += 1
        self.news += 1
        log.warning("change journal %s reached its limit (%d bytes): tracking %d changed blocks "
                    "in a change bitmap until the target catches up", self.path, self.limit,
                    len(self.dirty))
        self._rewrite(sorted(self.dirty | self.resyncing), [])

    def begin_resync(self) -> set[int]:
        """Back to journal mode; returns the blocks a resync pass must ship (they stay
        recorded until :meth:`end_resync`). Takes the ``order`` lock first: a write recorded
        in bitmap mode has reached the volume before the pass reads it, and before the
        volume sync of the rewrite below (its reply's sync no longer syncs the volume)."""
        with self.order, self.lock:
            self.resyncing |= self.dirty
            if self.resync_since is None or (self.dirty_since is not None
                                             and self.dirty_since < self.resync_since):
                self.resync_since = self.dirty_since or time.time()
            self.dirty, self.dirty_since = set(), None
            self.overflowed = False
            # Keep every unreleased record (points clients closed while the agent started):
            # they are shipped after the resync, at their (rebased) offsets.
            self._rewrite_tail(self.closed[0].start if self.closed else self.open_start)
            return set(self.resyncing)

    def end_resync(self, blocks: Iterable[int]) -> None:
        """The resync of ``blocks`` is committed on the target (with the CP that closed it)."""
        with self.lock:
            self.resyncing.difference_update(blocks)
            if not self.resyncing:
                self.resync_since = None
            if not self.overflowed:  # drop the DIRTY records of what is committed
                self._rewrite_tail(self.closed[0].start if self.closed else self.open_start)

    # -- rewriting -----------------------------------------------------------------------------

    def _rewrite_tail(self, head: int) -> None:
        """Under the lock: keep only the records from ``head`` on (unreleased); the volume is
        synced first, since the dropped records were the durable copy of their writes."""
        self._sync_volumes()
        tail = os.pread(self.fd, self.size - head, head)
        shift = head
        self._rewrite(sorted(self.resyncing), [tail])
        base = self.size - len(tail)
        for cp in self.closed:
            cp.start, cp.end = cp.start - shift + base, cp.end - shift + base
        self.open_start = self.open_start - shift + base

    def _header(self, dirty: list[int]) -> bytes:
        """BASE, the DIRTY records of ``dirty`` and a RELEASE of the last point released (it
        ends the header: a DIRTY record after it is a write by reference): the start of a
        rewritten journal."""
        bs = self.block_size
        out = [record(KIND_BASE, self.next_cp, int(self.overflowed))]
        for key in dirty:
            vol, b = key >> KEY_SHIFT, key & BLOCK_MASK
            out.append(record(KIND_DIRTY, vol << VOL_SHIFT | b * bs, bs))
        out.append(record(KIND_RELEASE, self.released_cp, 0))
        return b"".join(out)

    def _rewrite(self, dirty: list[int], tails: list[bytes]) -> None:
        tmp = self.path + ".tmp"
        self.shape += 1
        with open(tmp, "wb") as fh:
            fh.write(self._header(dirty))
            for t in tails:
                fh.write(t)
            fh.flush()
            os.fsync(fh.fileno())
            size = fh.tell()
        new_fd = os.open(tmp, os.O_RDWR | os.O_CLOEXEC)
        os.replace(tmp, self.path)
        self.renamed = True
        old, self.fd = self.fd, new_fd
        os.close(old)
        self.size = size
        self.ahead.reset(size)  # space is written ahead at the next sync
        if not tails:
            self.open_start = size
        self.data_blocks = set().union(*map(self._data_blocks_in, tails))

    def _data_blocks_in(self, raw: bytes) -> set[int]:
        """The blocks of the WRITE and ZERO records in ``raw`` (whole records)."""
        out: set[int] = set()
        for kind, _offset, vol, at, length, _data in self._records(memoryview(raw), False):
            if kind == KIND_WRITE or kind == KIND_ZERO:
                out.update(self._blocks(vol, at, length))
        return out

    def close(self) -> None:
        with self.lock:  # not while a compaction swaps files
            os.close(self.fd)
            self.fd = -1
