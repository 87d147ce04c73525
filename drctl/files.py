"""Durable file replacement: the one way drctl swaps a state file in place (and the one way
its journals append several pieces in one system call).

A crash right after ``os.replace`` can bring the old file back unless the directory holding
the rename is fsynced too; ``atomic_write`` does both (and fsyncs the data first), so a reader
after a crash finds either the old file or the whole new one, and after it returns, the new one.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence


def fsync_dir(path: str) -> None:
    """Make the renames in directory ``path`` durable."""
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``: a temporary file beside it (created with ``mode``),
    fsynced, renamed over ``path``, and the directory fsynced. The temporary file is removed
    if anything fails."""
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


Buffer = bytes | bytearray | memoryview

# Space written ahead: a log whose every small append is fdatasynced (the change journal, the
# redo journal) keeps its file written with zeroes past its last record and writes records
# into that space. An append that grows the file makes ext4 commit the file's metadata at the
# fdatasync too (about a third of a 4 KiB record's sync on this project's machine); one that
# overwrites blocks the file has flushes only the data. Worth it only while each sync covers
# little: for larger groups the metadata is a small share, and zeroes would double the bytes.
WRITE_AHEAD = 2 << 20  # written this far past the last record ...
SMALL_SYNC = 256 << 10  # ... while a sync covers less than this
_ZEROES = memoryview(bytes(1 << 20))


def zeroes(n: int) -> list[memoryview]:
    """``n`` zero bytes as pieces of one shared buffer (for a gathered write)."""
    return [_ZEROES[: min(len(_ZEROES), n - at)] for at in range(0, n, len(_ZEROES))]


class SpaceAhead:
    """A log file's space written ahead: how far the file is written (``written``), and the
    rule. ``before_sync`` decides from how much the sync covers (the log's ``end`` against
    its end at the last deciding sync) and writes the zeroes; the caller holds the lock of
    its appends and syncs the file after (the zeroes reach the disk with that sync)."""

    def __init__(self, end: int = 0) -> None:
        self.written = end  # the file's blocks are written (zeroes past the log's end) up to
        self.synced_end = end  # the log's end at the last deciding sync
        self.on = False  # that sync covered little: space is written ahead

    def reset(self, end: int, written: int | None = None) -> None:
        """The file was replaced or cut: its records end at ``end``, its blocks are written
        up to ``written`` (default: ``end``)."""
        self.written = end if written is None else max(end, written)
        self.synced_end = end

    def appended(self, end: int) -> None:
        self.written = max(self.written, end)

    def before_sync(self, fd: int, end: int, decide: bool = True) -> None:
        """Write zeroes past ``end`` while syncs cover little. ``decide`` false: a sync that
        says nothing of the writes' sizes (a periodic checkpoint's) leaves the rule as it
        was."""
        if decide:
            self.on = end - self.synced_end < SMALL_SYNC
            self.synced_end = end
        if self.on and self.written - end < WRITE_AHEAD // 2:
            try:
                self.written += write_all(fd, zeroes(end + WRITE_AHEAD - self.written),
                                          self.written)
            except OSError:  # best effort: appends go on growing the file
                pass


def write_all(fd: int, parts: Sequence[Buffer], offset: int | None = None) -> int:
    """Write every piece at ``fd``'s position (an append on an O_APPEND descriptor), or at
    ``offset``, with one gathered write, and the rest after a short one (a signal, a full
    disk) where it stopped, without copying. Returns the bytes written."""
    total = sum(len(p) for p in parts)
    n = os.writev(fd, parts) if offset is None else os.pwritev(fd, parts, offset)
    if n == total:  # the usual case: one system call, nothing else
        return total
    views = [memoryview(p) for p in parts if len(p)]
    done = n
    while True:
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if not views:
            return total
        if n:
            views[0] = views[0][n:]
        n = os.writev(fd, views) if offset is None else os.pwritev(fd, views, offset + done)
        done += n
