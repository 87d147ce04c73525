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
