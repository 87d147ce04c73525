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
    # Consistency points (write capture): a staged batch is journaled by the target and applied
    # only together with the rest of its consistency point; ``cp`` is nonzero on the batch that
    # closes consistency point number ``cp`` (everything staged up to it applies atomically).
    staged: bool = False
    cp: int = 0
    # Source-side bookkeeping, never sent.
    wire_size: int = field(default=0, compare=False)

    def compute_checksum(self) -> int:
        h = xxhash.xxh3_64()
        h.update(struct.pack("<QQIIQQB", self.seq, self.volume_size, self.block_size,
                             int(self.compression), self.raw_length, self.cp, self.staged))
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

    def pack(self) -> bytes:
        """A self-contained encoding for the target's redo journal (not the wire format)."""
        return b"".join(self.pack_parts())

    def pack_parts(self) -> list[bytes]:
        """:meth:`pack` in pieces, the payload not copied (for a gathered write)."""
        name = self.volume.encode()
        n, ncopy = len(self.indices), len(self.copy_from)
        head = _PACK_HEAD.pack(len(name), self.epoch, self.seq, self.block_size,
                               self.volume_size, n, ncopy, int(self.compression),
                               self.raw_length, len(self.payload), self.checksum, self.cp,
                               self.staged)
        return [head, name, _u64_bytes(self.indices), self.kinds, _u64_bytes(self.hashes),
                _u64_bytes(self.copy_from), self.payload]

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> Batch:
        (nlen, epoch, seq, bs, size, n, ncopy, comp, raw_len, plen, checksum, cp,
         staged) = _PACK_HEAD.unpack_from(raw, 0)
        pos = _PACK_HEAD.size
        view = memoryview(raw)

        def u64s(count: int) -> list[int]:
            nonlocal pos
            arr = array("Q")
            arr.frombytes(view[pos : pos + 8 * count])
            if sys.byteorder == "big":
                arr.byteswap()
            pos += 8 * count
            return arr.tolist()

        volume = bytes(view[pos : pos + nlen]).decode()
        pos += nlen
        indices = u64s(n)
        kinds = bytes(view[pos : pos + n])
        pos += n
        hashes = u64s(n)
        copy_from = u64s(ncopy)
        payload = bytes(view[pos : pos + plen])
        if pos + plen != len(raw):
            raise CorruptBatchError("malformed", f"journaled batch {seq}: bad length")
        return cls(volume=volume, epoch=epoch, seq=seq, block_size=bs, volume_size=size,
                   indices=indices, kinds=kinds, hashes=hashes, copy_from=copy_from,
                   compression=Compression(comp), raw_length=raw_len, payload=payload,
                   checksum=checksum, staged=bool(staged), cp=cp)


_PACK_HEAD = struct.Struct("<HQQIQIIBIIQQB")


# A record as the target applies it: (block index, kind, content hash, source), where source
# is the payload offset for DATA and the block to copy from for COPY.
Record = tuple[int, int, int, int]
_KINDS = frozenset(int(k) for k in Kind)

# What one batch may carry, whoever sent it: the planners cut at 512 records (MAX_BATCH_BLOCKS),
# so 512 blocks of up to 64 KiB; the target decompresses at most this much per batch.
MAX_BATCH_RECORDS = 4096
MAX_BATCH_RAW = 32 << 20


class Decoder:
    """Checks a batch and lists its records with the decompressed payload (target side).

    Nothing is decompressed before the records are checked: the payload must decompress to
    exactly the bytes its DATA records need (``raw_length``, at most MAX_BATCH_RAW), the zstd
    frame may not declare another size, and the decompressor never writes past it, so a small
    payload claiming a huge size costs nothing."""

    def __init__(self) -> None:
        self._zstd = zstandard.ZstdDecompressor(max_window_size=MAX_BATCH_RAW)

    def open(self, batch: Batch) -> tuple[list[Record], bytes]:
        self.check(batch)
        seq, n = batch.seq, len(batch.indices)
        bs, size = batch.block_size, batch.volume_size
        payload = self._payload(batch)
        if self.is_contiguous_data(batch) and len(payload) == n * bs:
            return [], payload  # a run of full DATA blocks: the caller takes the fast path
        last = (size - 1) // bs
        tail = size - last * bs
        records: list[Record] = []
        append = records.append
        pos = 0
        copies = iter(batch.copy_from)
        for index, kind, h in zip(batch.indices, batch.kinds, batch.hashes, strict=True):
            if kind == 1:  # DATA
                append((index, 1, h, pos))
                pos += bs if index != last else tail
            elif kind == 3:  # COPY
                src = next(copies, None)
                if src is None or src > last:
                    raise CorruptBatchError("malformed", f"batch {seq}: bad copy source")
                append((index, 3, h, src))
            else:
                append((index, 2, h, 0))
        if pos != len(payload):
            raise CorruptBatchError(
                "malformed", f"batch {seq}: payload is {len(payload)} bytes, records need {pos}"
            )
        return records, payload

    def check(self, batch: Batch) -> None:
        """Everything about a batch that can be checked before its payload is decompressed."""
        seq = batch.seq
        if not isinstance(batch.compression, Compression):
            raise CorruptBatchError("malformed", f"batch {seq}: unknown compression")
        if batch.compute_checksum() != batch.checksum:
            raise CorruptBatchError("checksum", f"batch {seq}: checksum mismatch")
        n = len(batch.indices)
        if len(batch.kinds) != n or len(batch.hashes) != n:
            raise CorruptBatchError("malformed", f"batch {seq}: field lengths differ")
        if n > MAX_BATCH_RECORDS or len(batch.copy_from) > n:
            raise CorruptBatchError("malformed", f"batch {seq}: {n} records, at most "
                                    f"{MAX_BATCH_RECORDS} are taken")
        if not set(batch.kinds) <= _KINDS:
            raise CorruptBatchError("malformed", f"batch {seq}: unknown block kind")
        bs, size = batch.block_size, batch.volume_size
        if bs <= 0 or (n and max(batch.indices) * bs >= size):
            raise CorruptBatchError("malformed", f"batch {seq}: block past the end of the volume")
        need = self.data_bytes(batch)
        if batch.raw_length != need or need > MAX_BATCH_RAW:
            raise CorruptBatchError(
                "malformed", f"batch {seq}: raw_length is {batch.raw_length} bytes, its DATA "
                f"records hold {need} (at most {MAX_BATCH_RAW} per batch)")

    @staticmethod
    def data_bytes(batch: Batch) -> int:
        """The bytes the DATA records of a (checked) batch carry once decompressed."""
        bs, size = batch.block_size, batch.volume_size
        data = batch.kinds.count(Kind.DATA)
        if not data or size % bs == 0:
            return data * bs
        last = (size - 1) // bs
        if last not in batch.indices:
            return data * bs
        tails = sum(1 for i, k in zip(batch.indices, batch.kinds, strict=True)
                    if i == last and k == Kind.DATA)
        return data * bs - tails * (bs - size % bs)

    @staticmethod
    def is_contiguous_data(batch: Batch) -> bool:
        """Only DATA records, for consecutive blocks in increasing order (a bulk run)."""
        idx = batch.indices
        return (bool(idx) and idx[-1] - idx[0] + 1 == len(idx)
                and batch.kinds.count(Kind.DATA) == len(idx)
                and list(idx) == list(range(idx[0], idx[0] + len(idx))))

    def _payload(self, batch: Batch) -> bytes:
        """The payload as the records read it: ``raw_length`` bytes (checked against the
        records before this is called), never more."""
        raw = batch.raw_length
        if batch.compression is Compression.NONE:
            if len(batch.payload) != raw:
                raise CorruptBatchError("malformed", f"batch {batch.seq}: payload is "
                                        f"{len(batch.payload)} bytes, raw_length {raw}")
            return batch.payload
        if not raw:
            raise CorruptBatchError("malformed", f"batch {batch.seq}: a compressed payload "
                                    "with no DATA record")
        try:
            # The frame's own claim first: decompress() would allocate whatever it declares.
            declared = zstandard.frame_content_size(batch.payload)
            if declared not in (-1, raw):
                raise CorruptBatchError("decompress", f"batch {batch.seq}: the zstd frame "
                                        f"declares {declared} bytes, raw_length is {raw}")
            # Without a declared size the output buffer is raw_length and filling it fails.
            out = self._zstd.decompress(batch.payload, max_output_size=raw)
        except zstandard.ZstdError as exc:
            raise CorruptBatchError("decompress", f"batch {batch.seq}: {exc}") from exc
        if len(out) != raw:
            raise CorruptBatchError("decompress", f"batch {batch.seq}: wrong raw length")
        return bytes(out)
