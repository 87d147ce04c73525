"""An activity log (DRBD's idea): the extents whose blocks may have changed since the owner last
made its hashes and data durable, so that after a crash of the machine only those are checked.

Guarantee: every block whose on-disk hash entry or on-disk data may differ from what the last
checkpoint made durable lies in an extent of the log (or the log says *everything*), provided
the owner calls :meth:`ActivityLog.ensure` (or holds the extents with :meth:`pin`) before it
changes a block, and :meth:`checkpoint` only once its hash file and data are durable.

An extent is ``EXTENT_BLOCKS`` blocks (4 MiB of 4 KiB blocks). :meth:`ensure` is a set lookup
while the extents are listed already (no system call); otherwise it writes the whole list and
fdatasyncs it before it returns (one sync for all the new extents of a call).

File: two slots of ``SLOT`` bytes, both written by :meth:`start`, then alternately, each with a
sequence number, a flag (*everything*), the binding (16 bytes the owner keeps in its own durable
header or state, so that a log of another generation of its hashes is never trusted), the extent
size, the extents and an xxh3-64 of all that. The newest slot is read if both are whole. A slot
that is not (a write torn by the crash, or a damaged file: the two cannot be told apart) makes
the log unusable, since the other slot may lack extents a later write added. More than
``MAX_EXTENTS`` extents, or a rewrite of the whole hash file (:meth:`invalidate`), make the log
say *everything* until the next checkpoint.

Concurrency: a checkpoint may run while others write. It has two halves around the owner's
syncs: :meth:`begin_checkpoint` starts a new list (the file keeps the old one), the owner syncs,
:meth:`end_checkpoint` writes the new list (the extents ensured since the beginning, those
pinned, and those ensured in the interval before it while they are few: the hot set). A writer
must therefore not be between its ``ensure`` and its change when a checkpoint begins: it holds a
lock the checkpoint's caller takes around ``begin_checkpoint`` (the source's journal ``order``
lock), or pins the extents for as long as it changes them (:meth:`pin`, :meth:`holding`)."""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import xxhash

from drctl.files import fsync_dir

EXTENT_BLOCKS = 1024  # 4 MiB of 4 KiB blocks
SLOT = 64 << 10
_MAGIC = b"DRCTLAL1"
_HEAD = struct.Struct("<8sIIQ16sII")  # magic, version, flags, seq, binding, extent blocks, count
_CHECK = struct.Struct("<Q")
MAX_EXTENTS = (SLOT - _HEAD.size - _CHECK.size) // 8
EVERYTHING = 1
CHECKPOINT_SECONDS = 30.0  # the owners checkpoint at least this often while the log lists any
CHECKPOINT_EXTENTS = 1024  # ... and as soon as it lists more (4 GiB of 4 MiB extents; DRBD's
# default activity log is about as large). A checkpoint keeps the extents written since the one
# before (the hot set) while they are no more than this: a busy region is not listed again,
# with a sync, after every checkpoint.


@dataclass(frozen=True)
class Saved:
    """What a slot holds."""

    seq: int
    everything: bool
    binding: bytes
    extent_blocks: int
    extents: frozenset[int]


def _parse(raw: bytes) -> Saved | None:
    if len(raw) < _HEAD.size + _CHECK.size:
        return None
    magic, _version, flags, seq, binding, eb, count = _HEAD.unpack_from(raw)
    end = _HEAD.size + 8 * count
    if magic != _MAGIC or count > MAX_EXTENTS or len(raw) < end + _CHECK.size:
        return None
    if _CHECK.unpack_from(raw, end)[0] != xxhash.xxh3_64_intdigest(raw[:end]):
        return None
    extents = struct.unpack_from(f"<{count}Q", raw, _HEAD.size)
    return Saved(seq, bool(flags & EVERYTHING), binding, eb, frozenset(extents))


def new_binding() -> bytes:
    """A binding for a hash file rewritten whole (its owner keeps it in its own state)."""
    return os.urandom(16)


def read(path: str) -> tuple[Saved | None, str]:
    """The newest valid slot of the file at ``path``, or None and why there is none."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(2 * SLOT)
    except FileNotFoundError:
        return None, "it is missing"
    except OSError as exc:
        return None, f"it cannot be read: {exc.strerror}"
    if not raw.strip(b"\0"):
        return None, "it is empty"
    halves = (raw[:SLOT], raw[SLOT:])
    slots = [_parse(h) for h in halves]
    if any(s is None and h.strip(b"\0") for s, h in zip(slots, halves, strict=True)):
        return None, "torn or checksum mismatch"  # a slot never written is all zeros
    return max((s for s in slots if s is not None), key=lambda s: s.seq), ""


class ActivityLog:
    def __init__(self, path: str, extent_blocks: int = EXTENT_BLOCKS) -> None:
        self.path = path
        self.extent_blocks = extent_blocks
        self.binding = b""
        self.everything = False
        self._hot: set[int] = set()  # ensured since the last checkpoint began
        self._prev: set[int] = set()  # ensured in the interval before that (the hot set)
        self._disk: set[int] = set()  # what the file lists (a superset of _hot)
        self._pins: dict[int, int] = {}
        self._lock = threading.Lock()
        self._fd = -1
        self._seq = 0
        self._invalidations = 0
        self._rewrites = 0  # rewrites of the whole hash file under way (rewriting())
        self._since = time.monotonic()  # the last checkpoint

    def load(self, binding: bytes) -> tuple[set[int] | None, str]:
        """The extents listed, if the file is whole and bound to ``binding``; else None and
        the reason (missing, torn, a checksum that does not match, another binding, or
        *everything*)."""
        saved, why = read(self.path)
        if saved is None:
            return None, why
        self._seq = max(self._seq, saved.seq)
        if not binding or saved.binding != binding:
            return None, "it belongs to another generation of the hashes"
        if saved.extent_blocks != self.extent_blocks:
            return None, f"its extents are of {saved.extent_blocks} blocks"
        if saved.everything:
            return None, "it says everything may have changed"
        return set(saved.extents), ""

    def start(self, binding: bytes, keep: Iterable[int] = (), everything: bool = False) -> None:
        """Bind the log to ``binding`` and list ``keep`` (or everything), durably."""
        with self._lock:
            if self._fd < 0:
                saved, _why = read(self.path)  # a new slot must outnumber both old ones
                self._seq = max(self._seq, saved.seq if saved is not None else 0)
                created = not os.path.exists(self.path)
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                if created:
                    fsync_dir(os.path.dirname(os.path.abspath(self.path)))
            self.binding = binding
            self._hot = set(keep) | set(self._pins)
            self._disk = set(self._hot)
            self.everything = everything or len(self._disk) > MAX_EXTENTS
            self._write()
            self._write()  # both slots: from now on a slot that does not check is damaged

    # -- the writers' side ---------------------------------------------------------------

    def ensure(self, extents: Iterable[int]) -> None:
        """``extents`` are listed durably when this returns (nothing is done if they were)."""
        hot = self._hot
        new = [e for e in extents if e not in hot]
        if new:
            self._add(new, 0)

    def ensure_blocks(self, first: int, count: int) -> None:
        """The extents of blocks [first, first + count)."""
        lo, hi = first // self.extent_blocks, (first + max(1, count) - 1) // self.extent_blocks
        if lo == hi:
            if lo not in self._hot:
                self._add([lo], 0)
        else:
            self.ensure(range(lo, hi + 1))

    def listed(self, first: int, count: int) -> bool:
        """Would ensuring the extents of blocks [first, first + count) be a set lookup now (no
        lock, no system call)? Extents the file lists already but not written since the last
        checkpoint began are made hot here, if the lock is free at once (a caller on an event
        loop does not wait for another thread's sync); else False. Advisory: :meth:`ensure`
        still checks (a checkpoint beginning in between makes it take the lock)."""
        lo, hi = first // self.extent_blocks, (first + max(1, count) - 1) // self.extent_blocks
        hot = self._hot
        if lo in hot and (lo == hi or all(e in hot for e in range(lo, hi + 1))):
            return True
        if not self._lock.acquire(blocking=False):
            return False
        try:
            extents = range(lo, hi + 1)
            if not (self.everything or all(e in self._disk for e in extents)):
                return False
            self._hot.update(extents)  # listed in the file (or everything is): nothing to write
            self._disk.update(extents)  # (a superset of _hot)
            return True
        finally:
            self._lock.release()

    def extents_of(self, blocks: Iterable[int]) -> set[int]:
        eb = self.extent_blocks
        return {b // eb for b in blocks}

    def pin(self, extents: Iterable[int]) -> None:
        """Ensure ``extents`` and keep them listed across checkpoints until :meth:`unpin`."""
        self._add(list(extents), 1)

    def unpin(self, extents: Iterable[int]) -> None:
        with self._lock:
            for e in extents:
                n = self._pins.get(e, 0) - 1
                if n > 0:
                    self._pins[e] = n
                else:
                    self._pins.pop(e, None)

    @contextlib.contextmanager
    def holding(self, extents: Iterable[int]) -> Iterator[None]:
        held = list(set(extents))
        self.pin(held)
        try:
            yield
        finally:
            self.unpin(held)

    def _add(self, extents: list[int], pin: int) -> None:
        with self._lock:
            for e in extents:
                if pin:
                    self._pins[e] = self._pins.get(e, 0) + 1
                self._hot.add(e)
            fresh = [e for e in extents if e not in self._disk]
            if not fresh:
                return
            self._disk.update(fresh)
            if self.everything or self._fd < 0:  # the file says everything already, or
                return  # the owner is still opening: start() decides what the file lists
            self.everything = len(self._disk) > MAX_EXTENTS
            self._write()

    # -- checkpoints -----------------------------------------------------------------------

    def due(self) -> bool:
        """Time for a checkpoint: the file lists an extent that is not pinned and
        CHECKPOINT_SECONDS passed (so an idle log is emptied by the next two), or
        CHECKPOINT_EXTENTS were written since the last one (at most once a second), or the
        file says everything."""
        age = time.monotonic() - self._since
        if self.everything or len(self._hot) > len(self._pins) + CHECKPOINT_EXTENTS:
            return age >= 1.0
        if age < CHECKPOINT_SECONDS:
            return False
        if not self._lock.acquire(blocking=False):
            return False  # a writer is syncing the file: asked again at the next call
        try:
            return bool(self._hot.difference(self._pins) or self._disk.difference(self._pins))
        finally:
            self._lock.release()

    def begin_checkpoint(self) -> int:
        """A new list begins (the pinned extents stay); the file keeps the old one until
        :meth:`end_checkpoint`, which the owner calls once its hashes and data are durable."""
        with self._lock:
            self._prev, self._hot = self._hot, set(self._pins)
            self._since = time.monotonic()
            return self._invalidations

    def end_checkpoint(self, began: int) -> None:
        with self._lock:
            if self._fd < 0:
                return
            if self._invalidations == began and not self._rewrites:  # no whole rewrite
                # began, ended or is under way since this checkpoint began
                self.everything = len(self._hot) > MAX_EXTENTS
            keep = self._hot | self._prev  # still hot: listed on, no sync when written again
            self._disk = keep if len(keep) <= CHECKPOINT_EXTENTS else set(self._hot)
            self._write()

    def checkpoint(self, keep_hot: bool = True) -> None:
        """The owner's hashes and data are durable and nothing changes them meanwhile: the
        list keeps only the extents written since the checkpoint before (and pinned ones),
        durably; two checkpoints in a row with no write between empty it, and so does one
        with ``keep_hot`` False (a clean stop: nothing writes until the next start)."""
        began = self.begin_checkpoint()
        if not keep_hot:
            self._prev = set()
        self.end_checkpoint(began)

    @contextlib.contextmanager
    def rewriting(self) -> Iterator[None]:
        """The owner rewrites its whole hash file inside: everything counts as changed,
        durably before the rewrite starts, until a checkpoint that began after it ended (one
        that began meanwhile may sync the file before the rewrite reached it)."""
        with self._lock:
            self._rewrites += 1
        try:
            self.invalidate()
            yield
        finally:
            with self._lock:
                self._rewrites -= 1
                self._invalidations += 1

    def invalidate(self) -> None:
        """The owner rewrites its whole hash file: everything counts as changed until the
        next checkpoint (durably, before this returns)."""
        with self._lock:
            self._invalidations += 1
            self.everything = True
            if self._fd >= 0:
                self._write()

    def _write(self) -> None:
        """Under the lock: the next slot, synced."""
        self._seq += 1
        extents = [] if self.everything else sorted(self._disk)
        body = _HEAD.pack(_MAGIC, 1, EVERYTHING if self.everything else 0, self._seq,
                          self.binding.ljust(16, b"\0")[:16], self.extent_blocks, len(extents))
        body += struct.pack(f"<{len(extents)}Q", *extents)
        raw = body + _CHECK.pack(xxhash.xxh3_64_intdigest(body))
        at = (self._seq % 2) * SLOT
        done = 0
        while done < len(raw):
            done += os.pwrite(self._fd, raw[done:], at + done)
        os.fdatasync(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
