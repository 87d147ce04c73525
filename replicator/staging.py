"""The target's redo journal (NAME.wal): staged batches waiting for their consistency point.

With write capture the source groups its writes into consistency points (CPs). The target
appends each verified batch of a CP here and acknowledges it once the journal is fdatasynced;
the batches are written into the replica image only when the frame that *closes* the CP is
durable (hot mode: at once; warm mode: on schedule or on promotion). Applying a CP is
idempotent (staged batches hold only DATA and ZERO records, whole blocks), so a crash while
applying is repaired by applying the same frames again at the next open: the image as the
daemon exposes it always shows a whole number of consistency points.

Frame layout: magic, body length, seq, cp, flags, xxh3-64 of the header fields and the body;
the body is ``Batch.pack()``. A torn frame at the end (a crash mid-append) was never
acknowledged and is cut off at open.

Space written ahead: while its syncs cover little (a small point each), the file is written
with zeroes past its last frame and frames are written into that space (drctl/files.py), so
that a frame's fdatasync flushes its data alone instead of committing the file's new size too.
Then applied frames are left in place (a scan counts them as applied by their sequence
numbers, which only grow), and the file is emptied at the first point applied with no frame
waiting after TRUNCATE_BYTES are written, not after every point (while frames always wait,
the rewrite at REWRITE_BYTES drops the applied head, as for larger points).

Concurrency: appends, reads and rewrites run on the volume's thread; ``sync`` may run on
another thread at the same time (it syncs a duplicate of the descriptor taken under the lock,
and a rewrite fsyncs the new file before swapping it in, so a sync never acknowledges a frame
that is not durable).
"""

from __future__ import annotations

import os
import struct
import threading
from array import array
from dataclasses import dataclass

import xxhash

from drctl.files import SpaceAhead, fsync_dir, write_all
from replicator.batch import Batch
from replicator.errors import VolumeError

_MAGIC = b"DWAL"
_FRAME = struct.Struct("<4sIQQBQ")  # magic, length, seq, cp, flags, checksum
CLOSES = 1  # this frame closes a consistency point
_BLOCKS_AT = struct.calcsize("<HQQIQ")  # record count inside Batch.pack()
REWRITE_BYTES = 64 << 20  # rewrite the journal once this much of it is applied
TRUNCATE_BYTES = 8 << 20  # ... or empty it once every frame is applied and this much written


@dataclass(frozen=True)
class Frame:
    seq: int
    cp: int
    closes: bool
    offset: int  # of the body in the current file
    length: int
    blocks: int


def _checksum(length: int, seq: int, cp: int, flags: int,
              body: bytes | memoryview | list[bytes]) -> int:
    h = xxhash.xxh3_64()
    h.update(struct.pack("<IQQB", length, seq, cp, flags))
    for part in body if isinstance(body, list) else (body,):
        h.update(part)
    return h.intdigest()


def _frame(batch: Batch, cp: int, closes: bool) -> list[bytes]:
    """The frame's header and its body's pieces (the payload not copied: one gathered write)."""
    body = batch.pack_parts()
    length = sum(len(p) for p in body)
    flags = CLOSES if closes else 0
    return [_FRAME.pack(_MAGIC, length, batch.seq, cp, flags,
                        _checksum(length, batch.seq, cp, flags, body)), *body]



class StagingLog:
    def __init__(self, path: str, applied_seq: int) -> None:
        self.path = path
        self.lock = threading.Lock()
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise VolumeError(f"cannot open redo journal {path}: {exc.strerror}") from exc
        self.frames: list[Frame] = []
        self.applied_bytes = 0  # frames already applied at the head of the file
        self.end = 0  # of the last frame: the next one is written there
        self.ahead = SpaceAhead()  # zeroes written past ``end`` (drctl/files.py)
        # the blocks each frame writes, by seq (lowest, highest, all): filled as frames are
        # appended, or read once when asked (frames found at open)
        self._blocks: dict[int, tuple[int, int, array[int]]] = {}
        self._scan(applied_seq)

    def _scan(self, applied_seq: int) -> None:
        raw = memoryview(os.pread(self.fd, os.fstat(self.fd).st_size, 0))
        pos = 0
        while pos + _FRAME.size <= len(raw):
            magic, length, seq, cp, flags, check = _FRAME.unpack_from(raw, pos)
            body = raw[pos + _FRAME.size : pos + _FRAME.size + length]
            if magic != _MAGIC or len(body) != length or \
                    _checksum(length, seq, cp, flags, body) != check:
                break
            if seq > applied_seq and (not self.frames or seq == self.frames[-1].seq + 1):
                blocks = struct.unpack_from("<I", body, _BLOCKS_AT)[0]
                self.frames.append(Frame(seq, cp, bool(flags & CLOSES), pos + _FRAME.size,
                                         length, blocks))
            elif seq > applied_seq:
                break  # a gap cannot happen; stop trusting the file here
            else:
                self.applied_bytes = pos + _FRAME.size + length
            pos += _FRAME.size + length
        if pos != len(raw):
            os.ftruncate(self.fd, pos)  # a torn tail (never acknowledged), or zeroes ahead
        self.end = pos
        self.ahead.reset(pos)
        os.fdatasync(self.fd)  # what survived the crash is durable from now on

    # -- appending -----------------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        return self.frames[-1].seq if self.frames else 0

    def append(self, batch: Batch, cp: int, closes: bool) -> Frame:
        """Add a verified batch (not durable until :meth:`sync`)."""
        parts = _frame(batch, cp, closes)
        with self.lock:
            offset = self.end
            try:
                self.end += write_all(self.fd, parts, offset)
            except OSError:
                os.ftruncate(self.fd, offset)  # no torn frame before the next one
                self.ahead.reset(offset)
                raise
            self.ahead.appended(self.end)
        frame = Frame(batch.seq, cp, closes, offset + _FRAME.size,
                      sum(len(p) for p in parts) - _FRAME.size, len(batch.indices))
        self.frames.append(frame)
        self._note_blocks(batch)
        return frame

    def _note_blocks(self, batch: Batch) -> tuple[int, int, array[int]]:
        idx = array("Q", batch.indices)
        entry = self._blocks[batch.seq] = (min(idx, default=0), max(idx, default=-1), idx)
        return entry

    def blocks_in(self, first: int, end: int) -> set[int]:
        """The blocks in [first, end) that staged frames write (waiting for their point)."""
        out: set[int] = set()
        for f in self.frames:
            entry = self._blocks.get(f.seq)
            if entry is None:
                entry = self._note_blocks(self.read(f))
            lo, hi, idx = entry
            if lo < end and hi >= first:
                out.update(i for i in idx if first <= i < end)
        return out

    def sync(self) -> None:
        with self.lock:
            self.ahead.before_sync(self.fd, self.end)  # on disk with the frames, below
            fd = os.dup(self.fd)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

    # -- reading ---------------------------------------------------------------------------------

    def read(self, frame: Frame) -> Batch:
        return Batch.unpack(os.pread(self.fd, frame.length, frame.offset))

    def complete(self, max_seq: int | None = None, max_cp: int | None = None) -> list[Frame]:
        """The frames of every complete consistency point (frames up to ``max_seq``, points up
        to number ``max_cp``), in order."""
        end = 0
        for i, f in enumerate(self.frames):
            if max_seq is not None and f.seq > max_seq:
                break
            if f.closes:
                if max_cp is not None and f.cp > max_cp:
                    break
                end = i + 1
        return self.frames[:end]

    def last_closed_cp(self, max_seq: int | None = None) -> int | None:
        """The number of the last point closed by a frame (up to ``max_seq``; None: none)."""
        for f in reversed(self.frames):
            if (max_seq is None or f.seq <= max_seq) and f.closes:
                return f.cp
        return None

    @property
    def staged_blocks(self) -> int:
        return sum(f.blocks for f in self.frames)

    # -- trimming ------------------------------------------------------------------------------

    def drop_through(self, seq: int) -> None:
        """Frames up to ``seq`` are applied (and recorded as such): forget them."""
        keep = [f for f in self.frames if f.seq > seq]
        if not keep:
            with self.lock:
                if self.ahead.on and self.end < TRUNCATE_BYTES:  # left in place
                    self.applied_bytes = self.end
                else:
                    os.ftruncate(self.fd, 0)
                    self.applied_bytes = self.end = 0
                    self.ahead.reset(0)
            self.frames = []
            self._blocks.clear()
            return
        if keep[0] is not self.frames[0]:
            self.applied_bytes = keep[0].offset - _FRAME.size
        self.frames = keep
        self._forget_blocks()
        if self.applied_bytes >= REWRITE_BYTES:
            self._rewrite(keep)

    def discard_incomplete(self, max_cp: int | None = None) -> int:
        """Drop the frames after the last complete consistency point (up to number ``max_cp``:
        a group's common point); promotion: those will never complete. Returns how many were
        dropped."""
        keep = self.complete(None, max_cp)
        dropped = len(self.frames) - len(keep)
        if dropped:
            self._rewrite(keep)
        return dropped

    def _rewrite(self, keep: list[Frame]) -> None:
        tmp = self.path + ".tmp"
        moved: list[Frame] = []
        with open(tmp, "wb") as fh:
            for f in keep:
                head = os.pread(self.fd, _FRAME.size + f.length, f.offset - _FRAME.size)
                moved.append(Frame(f.seq, f.cp, f.closes, fh.tell() + _FRAME.size, f.length,
                                   f.blocks))
                fh.write(head)
            fh.flush()
            os.fsync(fh.fileno())
            size = fh.tell()
        new_fd = os.open(tmp, os.O_RDWR | os.O_CLOEXEC)
        with self.lock:  # the rename is durable before a frame appended to the new file is acked
            os.replace(tmp, self.path)
            fsync_dir(os.path.dirname(os.path.abspath(self.path)))
            old, self.fd = self.fd, new_fd
            self.end = size
            self.ahead.reset(size)
        os.close(old)
        self.frames, self.applied_bytes = moved, 0
        self._forget_blocks()

    def _forget_blocks(self) -> None:
        """Drop the noted blocks of frames no longer staged (applied or discarded)."""
        live = {f.seq for f in self.frames}
        for seq in [s for s in self._blocks if s not in live]:
            del self._blocks[seq]

    def close(self) -> None:
        os.close(self.fd)
