"""Delta batches: what the source plans and the target applies, independent of the wire format.

A batch is an ordered list of block records. DATA records carry their content in the payload
(concatenated, then zstd-compressed when that saves bytes); ZERO records carry nothing; COPY
records name a block the replica already holds with the same content. Every record carries the
xxh3-64 hash of the block's content after the write, and the whole batch carries a checksum
over its header fields and payload, so corruption anywhere is detected before anything is
written.
"""

from __future__ import annotations

import struct
import sys
from array import array
from dataclasses import dataclass, field
from enum import IntEnum

import xxhash
import zstandard

from replicator.errors import CorruptBatchError


class Kind(IntEnum):
    DATA = 1
    ZERO = 2
    COPY = 3


class Compression(IntEnum):
    NONE = 1
    ZSTD = 2


def _u64_bytes(values: list[int]) -> bytes:
    arr = array("Q", values)
    if sys.byteorder == "big":
        arr.byteswap()
    return arr.tobytes()


@dataclass
class Batch:
    volume: str
    epoch: int
    seq: int
    block_size: int
    volume_size: int
    indices: list[int]
    kinds: bytes
    hashes: list[int]
    copy_from: list[int]
    compression: Compression
    raw_length: int
    payload: bytes
    checksum: int = 0
    commit: bool = False
    # Source-side bookkeeping, never sent.
    wire_size: int = field(default=0, compare=False)

    def compute_checksum(self) -> int:
        h = xxhash.xxh3_64()
        h.update(struct.pack("<QQIIQ", self.seq, self.volume_size, self.block_size,
                             int(self.compression), self.raw_length))
        h.update(_u64_bytes(self.indices))
        h.update(self.kinds)
        h.update(_u64_bytes(self.hashes))
        h.update(_u64_bytes(self.copy_from))
        h.update(self.payload)
        return h.intdigest()

    def seal(self) -> Batch:
        self.checksum = self.compute_checksum()
        return self

    @property
    def data_blocks(self) -> int:
        return self.kinds.count(Kind.DATA)


@dataclass
class Record:
    index: int
    kind: Kind
    hash: int
    source: int  # COPY: the block to copy from; DATA: offset of the content in the payload


class Decoder:
    """Checks a batch and yields its records with the decompressed payload (target side)."""

    def __init__(self) -> None:
        self._zstd = zstandard.ZstdDecompressor()

    def open(self, batch: Batch) -> tuple[list[Record], bytes]:
        if batch.compute_checksum() != batch.checksum:
            raise CorruptBatchError("checksum", f"batch {batch.seq}: checksum mismatch")
        n = len(batch.indices)
        if len(batch.kinds) != n or len(batch.hashes) != n:
            raise CorruptBatchError("malformed", f"batch {batch.seq}: field lengths differ")
        payload = self._payload(batch)
        records: list[Record] = []
        bs = batch.block_size
        size = batch.volume_size
        pos = 0
        copies = iter(batch.copy_from)
        for index, kind_value, h in zip(batch.indices, batch.kinds, batch.hashes, strict=True):
            if index * bs >= size:
                raise CorruptBatchError("malformed", f"batch {batch.seq}: block {index} past end")
            try:
                kind = Kind(kind_value)
            except ValueError:
                raise CorruptBatchError(
                    "malformed", f"batch {batch.seq}: unknown block kind {kind_value}"
                ) from None
            if kind is Kind.DATA:
                records.append(Record(index, kind, h, pos))
                pos += min(bs, size - index * bs)
            elif kind is Kind.COPY:
                src = next(copies, None)
                if src is None or src * bs >= size:
                    raise CorruptBatchError("malformed", f"batch {batch.seq}: bad copy source")
                records.append(Record(index, kind, h, src))
            else:
                records.append(Record(index, kind, h, 0))
        if pos != len(payload):
            raise CorruptBatchError(
                "malformed", f"batch {batch.seq}: payload is {len(payload)} bytes, records need {pos}"
            )
        return records, payload

    def _payload(self, batch: Batch) -> bytes:
        if batch.compression is Compression.NONE:
            return batch.payload
        if batch.compression is Compression.ZSTD:
            try:
                out = self._zstd.decompress(batch.payload, max_output_size=batch.raw_length)
            except zstandard.ZstdError as exc:
                raise CorruptBatchError("decompress", f"batch {batch.seq}: {exc}") from exc
            if len(out) != batch.raw_length:
                raise CorruptBatchError("decompress", f"batch {batch.seq}: wrong raw length")
            return bytes(out)
        raise CorruptBatchError("malformed", f"batch {batch.seq}: unknown compression")
