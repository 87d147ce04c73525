"""Writable copies of a replica's image (drills, tests): copy-on-write where the file system
shares extents (FICLONE: btrfs, xfs), else a full copy; at most a given number at once."""

from __future__ import annotations

import os

from replicator.errors import ProtocolError, QuotaExceededError

_FICLONE = 0x40049409  # ioctl(dest_fd, FICLONE, src_fd): share extents (btrfs, xfs, ...)


def _directory(img_path: str) -> str:
    return img_path[: -len(".img")] + ".clones"


def clone_image(img_path: str, img_fd: int, size: int, volume: str, name: str,
                limit: int | None = None) -> tuple[str, str]:
    """Copy the image open as ``img_fd`` (``size`` bytes) to ``NAME.img`` beside it, durably:
    (path, "reflink" or "copy"). At most ``limit`` clones of ``volume`` exist at once."""
    directory = _directory(img_path)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{name}.img")
    if os.path.exists(path):
        raise ProtocolError(f"clone {name!r} of {volume} already exists")
    held = sum(1 for e in os.scandir(directory) if e.name.endswith(".img"))
    if limit is not None and held >= limit:
        raise QuotaExceededError(
            f"quota_exceeded: volume {volume} has {held} clones, the most this target "
            f"keeps at once (serve --max-clones {limit}); drop one first")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            import fcntl

            fcntl.ioctl(fd, _FICLONE, img_fd)
            method = "reflink"
        except OSError:
            offset = 0
            while offset < size:
                n = os.copy_file_range(img_fd, fd, size - offset, offset, offset)
                if n == 0:
                    break
                offset += n
            os.ftruncate(fd, size)
            method = "copy"
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return path, method


def drop_clone_image(img_path: str, volume: str, name: str) -> str:
    """Remove clone ``name``; returns its path."""
    path = os.path.join(_directory(img_path), f"{name}.img")
    try:
        os.unlink(path)
    except FileNotFoundError:
        raise ProtocolError(f"no clone {name!r} of {volume}") from None
    return path
