"""drctl/files.py: the gathered append every journal uses, and the atomic replacement."""

from __future__ import annotations

import os
from typing import Any

import pytest

from drctl import files
from drctl.files import atomic_write, write_all


def test_write_all_appends_every_piece_in_one_call(tmp_path: Any) -> None:
    path = tmp_path / "log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        calls = []
        real = os.writev

        def counting(f: int, bufs: Any) -> int:
            calls.append(len(bufs))
            return real(f, bufs)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(files.os, "writev", counting)
            assert write_all(fd, [b"head", b"", bytearray(b"x" * 5000), memoryview(b"tail")]) \
                == 5008
        assert calls == [4]
    finally:
        os.close(fd)
    assert path.read_bytes() == b"head" + b"x" * 5000 + b"tail"


def test_write_all_goes_on_after_short_writes(tmp_path: Any) -> None:
    """A short write (a signal, a full disk's last blocks) is continued where it stopped,
    across piece boundaries, nothing written twice or skipped."""
    path = tmp_path / "log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    real = os.writev
    sizes = []

    def short(f: int, bufs: Any) -> int:  # at most 7 bytes per call
        joined = b"".join(bytes(b) for b in bufs)[:7]
        sizes.append(len(joined))
        return real(f, [joined])

    parts: list[bytes | bytearray | memoryview] = [b"abc", b"", bytearray(b"defghij"),
                                                    memoryview(b"klmnopqrstuvwxyz")]
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(files.os, "writev", short)
            assert write_all(fd, parts) == 26
    finally:
        os.close(fd)
    assert path.read_bytes() == b"abcdefghijklmnopqrstuvwxyz"
    assert sizes == [7, 7, 7, 5]


def test_write_all_at_an_offset_goes_on_after_short_writes(tmp_path: Any) -> None:
    """At an offset (a journal written into space it wrote ahead): each short write is
    continued at the offset where it stopped, the bytes around untouched."""
    path = tmp_path / "log"
    path.write_bytes(b"." * 40)
    fd = os.open(path, os.O_WRONLY)
    real = os.pwritev
    offsets = []

    def short(f: int, bufs: Any, offset: int) -> int:  # at most 7 bytes per call
        offsets.append(offset)
        return real(f, [b"".join(bytes(b) for b in bufs)[:7]], offset)

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(files.os, "pwritev", short)
            assert write_all(fd, [b"abc", b"", bytearray(b"defghijklmnop")], 5) == 16
    finally:
        os.close(fd)
    assert path.read_bytes() == b"....." + b"abcdefghijklmnop" + b"." * 19
    assert offsets == [5, 12, 19]


def test_write_all_raises_what_the_system_call_raises(tmp_path: Any) -> None:
    fd = os.open(tmp_path / "log", os.O_RDONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError):
            write_all(fd, [b"x"])
    finally:
        os.close(fd)


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path: Any) -> None:
    path = str(tmp_path / "state.json")
    atomic_write(path, b"one")
    atomic_write(path, b"two", 0o640)
    with open(path, "rb") as fh:
        assert fh.read() == b"two"
    assert os.stat(path).st_mode & 0o777 == 0o640
    assert os.listdir(tmp_path) == ["state.json"]
