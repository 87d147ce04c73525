"""The source's change journal: every acknowledged write, durable before the NBD reply.

A WRITE record carries the data itself (a redo log): the write goes to the journal and to the
volume's page cache, and only the journal is fdatasynced before the client is answered
(concurrent writes share one sync: group commit). ZERO records stand for TRIM/WRITE_ZEROES,
FLUSH records mark the client's flushes, DIRTY records (written by a checkpoint) name blocks
whose data is already durable in the volume but not yet acknowledged by the target.

On start the journal is replayed into the volume (idempotent) and fdatasynced, so an
acknowledged write survives a crash of the process or of the machine. ``checkpoint()`` runs
after the target acknowledged a pass: it fdatasyncs the volume, then rewrites the journal with
DIRTY records for the blocks still unshipped.
"""

from __future__ import annotations

import asyncio
import os
import struct
import threading
import time

import xxhash

_HEAD = struct.Struct("<BQIQ")  # kind, offset, length, checksum (of kind, offset, length, data)
KIND_WRITE = 1
KIND_FLUSH = 2
KIND_DIRTY = 3
KIND_ZERO = 4


def _record(kind: int, offset: int, length: int, data: bytes = b"") -> bytes:
    h = xxhash.xxh3_64()
    h.update(struct.pack("<BQI", kind, offset, length))
    h.update(data)
    return _HEAD.pack(kind, offset, length, h.intdigest()) + data


class ChangeJournal:
    def __init__(self, path: str, block_size: int, volume_fd: int) -> None:
        self.path = path
        self.block_size = block_size
        self.volume_fd = volume_fd
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.lock = threading.Lock()
        self.dirty: set[int] = set()
        self._dirty_since: float | None = None  # first write into ``dirty``
        self._inflight_since: float | None = None  # first write of the blocks taken, unacked
        self.records = 0
        self.flushes = 0
        self.replayed = 0
        self.seq = 0  # appends ever made by this process: GroupCommit's clock, never reset
        self._replay()

    def _replay(self) -> None:
        raw = os.pread(self.fd, os.fstat(self.fd).st_size, 0)
        pos = 0
        while pos + _HEAD.size <= len(raw):
            kind, offset, length, _check = _HEAD.unpack_from(raw, pos)
            data_len = length if kind == KIND_WRITE else 0
            end = pos + _HEAD.size + data_len
            if end > len(raw) or _record(kind, offset, length, raw[pos + _HEAD.size : end])[
                    : _HEAD.size] != raw[pos : pos + _HEAD.size]:
                break  # a torn tail: that write was never acknowledged
            if kind == KIND_WRITE:
                os.pwrite(self.volume_fd, raw[pos + _HEAD.size : end], offset)
                self.replayed += 1
            elif kind == KIND_ZERO:
                os.pwrite(self.volume_fd, bytes(length), offset)
                self.replayed += 1
            if kind in (KIND_WRITE, KIND_ZERO, KIND_DIRTY):
                self._mark(offset, length)
            self.records += 1
            pos = end
        if self.replayed:
            os.fdatasync(self.volume_fd)
        if self.dirty:
            self._dirty_since = os.fstat(self.fd).st_mtime

    def _mark(self, offset: int, length: int) -> None:
        bs = self.block_size
        self.dirty.update(range(offset // bs, (offset + max(1, length) - 1) // bs + 1))

    def append(self, kind: int, offset: int, length: int, data: bytes = b"") -> int:
        """Record (not yet durable: see GroupCommit). Returns the record's number."""
        rec = _record(kind, offset, length, data if kind == KIND_WRITE else b"")
        with self.lock:
            os.write(self.fd, rec)
            self.records += 1
            self.seq += 1
            if kind in (KIND_WRITE, KIND_ZERO):
                self._mark(offset, length)
                if self._dirty_since is None:
                    self._dirty_since = time.time()
            else:
                self.flushes += 1
            return self.seq

    def sync(self) -> None:
        # A checkpoint may swap the file meanwhile: sync through our own duplicate. Records
        # appended to the old file were made durable in the volume by the checkpoint, which
        # also wrote a DIRTY record for each of their blocks into the new file.
        with self.lock:
            fd = os.dup(self.fd)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

    @property
    def first_dirty_at(self) -> float | None:
        """When the oldest write not yet acknowledged by the target was acknowledged to the
        NBD client (None: everything is shipped)."""
        times = [t for t in (self._inflight_since, self._dirty_since) if t is not None]
        return min(times) if times else None

    def take(self) -> set[int]:
        """The blocks written since the last take (they stay journaled until checkpoint)."""
        with self.lock:
            out, self.dirty = self.dirty, set()
            if self._inflight_since is None:
                self._inflight_since = self._dirty_since
            self._dirty_since = None
            return out

    def checkpoint(self, still_dirty: set[int]) -> None:
        """Everything taken so far is acknowledged by the target (``still_dirty``: blocks
        handed back unshipped). Make the volume durable, then keep only DIRTY records."""
        with self.lock:
            if still_dirty:
                self.dirty |= still_dirty
                times = [t for t in (self._inflight_since, self._dirty_since) if t is not None]
                self._dirty_since = min(times) if times else time.time()
            self._inflight_since = None
            os.fdatasync(self.volume_fd)
            tmp = self.path + ".tmp"
            with open(tmp, "wb") as fh:
                for b in sorted(self.dirty):
                    fh.write(_record(KIND_DIRTY, b * self.block_size, self.block_size))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            os.close(self.fd)
            self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
            self.records = len(self.dirty)

    def close(self) -> None:
        os.close(self.fd)


class GroupCommit:
    """Many concurrent writers, one fdatasync of the journal: a sync makes durable every
    record appended before it started."""

    def __init__(self, journal: ChangeJournal) -> None:
        self.journal = journal
        self.durable = 0
        self._task: asyncio.Future[None] | None = None

    async def wait_durable(self, upto: int) -> None:
        while self.durable < upto:
            if self._task is None or self._task.done():
                self._task = asyncio.ensure_future(self._sync(self.journal.seq))
            await asyncio.shield(self._task)

    async def _sync(self, target: int) -> None:
        await asyncio.to_thread(self.journal.sync)
        self.durable = max(self.durable, target)
