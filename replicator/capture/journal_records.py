"""The change journal's records (journal.py): their layout, block keys, and the shapes the
journal hands out (closed points, range watches, extracted points).

A record: kind, offset (the volume's index in its top byte), length, checksum (xxh3-64 of the
other fields and the data that follows for WRITE). A block is named by ``block_key(volume,
block)``."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

import xxhash

HEAD = struct.Struct("<BQIQ")  # kind, offset, length, checksum
KIND_WRITE = 1
KIND_FLUSH = 2
KIND_DIRTY = 3
KIND_ZERO = 4
KIND_CUT = 5
KIND_BASE = 6
KIND_RELEASE = 7  # the target acknowledged every CP up to offset (no fsync: a lost one only
                  # makes a replay count more blocks as unacknowledged, never fewer)
MARKERS = (KIND_FLUSH, KIND_CUT)
VOL_SHIFT = 56  # of a record's offset field
KEY_SHIFT = 48  # of a block key
BLOCK_MASK = (1 << KEY_SHIFT) - 1


def write_zeroes(fd: int, offset: int, length: int) -> None:
    """Zero a range of a volume (8 MiB of zeroes at a time)."""
    chunk = memoryview(bytes(min(length, 8 << 20)))
    done = 0
    while done < length:
        done += os.pwrite(fd, chunk[: length - done], offset + done)


def block_key(volume: int, block: int) -> int:
    return volume << KEY_SHIFT | block


def volume_blocks(keys: Iterable[int], volume: int) -> set[int]:
    """The block numbers of ``volume`` among block keys."""
    return {k & BLOCK_MASK for k in keys if k >> KEY_SHIFT == volume}


def record_head(kind: int, offset: int, length: int,
          data: bytes | bytearray | memoryview = b"") -> bytes:
    """A record's header (its checksum covers the data that follows it)."""
    h = xxhash.xxh3_64()
    h.update(struct.pack("<BQI", kind, offset, length))
    h.update(data)
    return HEAD.pack(kind, offset, length, h.intdigest())


def record(kind: int, offset: int, length: int,
            data: bytes | bytearray | memoryview = b"") -> bytes:
    return record_head(kind, offset, length, data) + data


@dataclass
class ConsistencyPoint:
    """A closed CP: its records lie in [start, end) of the journal file."""
    cp: int
    start: int
    end: int
    first_at: float  # when its first write was acknowledged to the client (0: no writes)
    blocks: set[int]
    extracted: bool = False
    # its writes by reference (journal.py): (their record's place from ``start``, their data)
    refs: list[tuple[int, bytes]] = field(default_factory=list)


@dataclass
class RangeWatch:
    """Block keys [lo, hi) being compared with the replica (scrub.py): those the target had
    not acknowledged when the watch began, and those written while it runs."""
    lo: int
    hi: int
    unacked: set[int]
    written: set[int] = field(default_factory=set)


@dataclass
class ExtractedPoint:
    cp: int
    # by block key: views of the point's records (no copy per block); None: zeroes
    blocks: dict[int, memoryview | None] = field(default_factory=dict)
    first_at: float = 0.0


class Unacknowledged:
    """While replaying: which blocks the target has not acknowledged. The records of points
    past the last RELEASE, the open point's, and DIRTY records of the change bitmap or a
    running resync: those of a file rewritten in bitmap mode (its BASE says so) and those of
    a rewrite's header (BASE, DIRTY records, then any other record: a RELEASE). A DIRTY
    record further on in a file in journal mode is a write kept by reference in a point
    (journal.py), acknowledged with it. (The change bitmap's records that a resync's rewrite
    kept in its tail count as the open point's: the header lists their blocks until the
    resync is committed.)"""

    def __init__(self) -> None:
        self.points: dict[int, set[int]] = {}
        self.open: set[int] = set()
        self.sticky: set[int] = set()
        self.released = 0
        self.bitmap = False  # the file was rewritten in bitmap mode
        self.header = True  # no record but BASE and DIRTY yet

    def note(self, kind: int, offset: int, blocks: range, length: int = 0) -> None:
        if kind == KIND_BASE:
            self.bitmap = bool(length)
            return
        if kind == KIND_DIRTY:
            (self.sticky if self.header or self.bitmap else self.open).update(blocks)
            return
        self.header = False
        if kind in (KIND_WRITE, KIND_ZERO):
            self.open.update(blocks)
        elif kind in MARKERS:
            self.points[offset], self.open = self.open, set()
        elif kind == KIND_RELEASE:
            self.released = max(self.released, offset)

    def blocks(self) -> set[int]:
        out = self.sticky | self.open
        for cp, blocks in self.points.items():
            if cp > self.released:
                out |= blocks
        return out
