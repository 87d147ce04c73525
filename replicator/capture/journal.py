"""The source's change journal: every acknowledged write, durable before the NBD reply.

Records are fixed-size: (kind, offset, length) with a checksum. A write's data goes to the
volume, then its record is appended; both are fdatasynced before the client is answered
(concurrent writes share one pair of syncs: group commit). After a crash the journal says
which blocks may not have been shipped; once a pass that covered them is acknowledged by the
target, ``checkpoint()`` drops the records it covered.
"""

from __future__ import annotations

import asyncio
import os
import struct
import threading
import time

import xxhash

_REC = struct.Struct("<BQIQ")  # kind, offset, length, checksum of the first three
KIND_WRITE = 1
KIND_FLUSH = 2


def _pack(kind: int, offset: int, length: int) -> bytes:
    head = struct.pack("<BQI", kind, offset, length)
    return _REC.pack(kind, offset, length, xxhash.xxh3_64_intdigest(head))


class ChangeJournal:
    def __init__(self, path: str, block_size: int) -> None:
        self.path = path
        self.block_size = block_size
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.lock = threading.Lock()
        self.dirty: set[int] = set()
        self._dirty_since: float | None = None  # first write into ``dirty``
        self._inflight_since: float | None = None  # first write of the blocks taken, unacked
        self.records = 0
        self.flushes = 0
        self.seq = 0  # appends ever made by this process: GroupCommit's clock, never reset
        self._replay()

    def _replay(self) -> None:
        raw = os.pread(self.fd, os.fstat(self.fd).st_size, 0)
        n = len(raw) // _REC.size
        for i in range(n):
            kind, offset, length, check = _REC.unpack_from(raw, i * _REC.size)
            if xxhash.xxh3_64_intdigest(struct.pack("<BQI", kind, offset, length)) != check:
                break  # a torn tail: that write was never acknowledged
            if kind == KIND_WRITE:
                self._mark(offset, length)
            self.records += 1
        if self.dirty:
            self._dirty_since = os.fstat(self.fd).st_mtime

    def _mark(self, offset: int, length: int) -> None:
        bs = self.block_size
        self.dirty.update(range(offset // bs, (offset + max(1, length) - 1) // bs + 1))

    def append(self, kind: int, offset: int, length: int) -> int:
        """Record (not yet durable: see GroupCommit). Returns the record's number."""
        with self.lock:
            os.write(self.fd, _pack(kind, offset, length))
            self.records += 1
            self.seq += 1
            if kind == KIND_WRITE:
                self._mark(offset, length)
                if self._dirty_since is None:
                    self._dirty_since = time.time()
            else:
                self.flushes += 1
            return self.seq

    def sync(self) -> None:
        # A checkpoint may swap the file meanwhile: sync through our own duplicate. Records
        # appended to the old file are in the new one too (the checkpoint wrote and fsynced
        # every dirty block), so either file being durable is enough.
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
        """Everything taken so far is acknowledged by the target: rewrite the journal with only
        the blocks written since (and any given back)."""
        with self.lock:
            if still_dirty:
                self.dirty |= still_dirty
                times = [t for t in (self._inflight_since, self._dirty_since) if t is not None]
                self._dirty_since = min(times) if times else time.time()
            self._inflight_since = None
            tmp = self.path + ".tmp"
            with open(tmp, "wb") as fh:
                for b in sorted(self.dirty):
                    fh.write(_pack(KIND_WRITE, b * self.block_size, self.block_size))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            os.close(self.fd)
            self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
            self.records = len(self.dirty)

    def close(self) -> None:
        os.close(self.fd)


class GroupCommit:
    """Many concurrent writers, one fdatasync of the volume and one of the journal: a sync
    makes durable every record appended before it started."""

    def __init__(self, volume_fd: int, journal: ChangeJournal) -> None:
        self.volume_fd = volume_fd
        self.journal = journal
        self.durable = 0
        self._task: asyncio.Future[None] | None = None

    async def wait_durable(self, upto: int) -> None:
        while self.durable < upto:
            if self._task is None or self._task.done():
                self._task = asyncio.ensure_future(self._sync(self.journal.seq))
            await asyncio.shield(self._task)

    async def _sync(self, target: int) -> None:
        await asyncio.to_thread(self._flush)
        self.durable = max(self.durable, target)

    def _flush(self) -> None:
        os.fdatasync(self.volume_fd)
        self.journal.sync()
