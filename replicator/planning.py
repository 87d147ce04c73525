"""The planner: turns blocks that differ from the replica into sealed delta batches.

It owns the *view* (per-block hashes the replica will hold once every planned batch is applied)
and the dedup index over it (content hash -> a block holding that content). Zero blocks become
ZERO records, blocks whose content the replica already holds become COPY records, the rest DATA.
Rewrites of one block between scans are naturally coalesced: only the content present when the
block is read is planned.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import zstandard

from replicator.batch import Batch, Compression, Kind
from replicator.blockmap import CHUNK_BLOCKS, UNKNOWN, Geometry, block_hash, zero_hash

MAX_BATCH_BLOCKS = 256  # 1 MiB of 4 KiB blocks: far under gRPC's 4 MiB message limit


@dataclass
class PlanStats:
    changed_blocks: int = 0
    data_blocks: int = 0
    zero_blocks: int = 0
    dedup_blocks: int = 0
    raw_bytes: int = 0
    payload_bytes: int = 0
    batches: int = 0


@dataclass
class PlannedBatch:
    batch: Batch
    raw_bytes: int  # bytes of changed blocks this batch brings the replica up to date with
    copy_data: dict[int, bytes] = field(default_factory=dict)  # record position -> content


class Planner:
    def __init__(self, volume: str, epoch: int, geo: Geometry, view: array[int],
                 seen: array[int], *, dedup: bool = True, compress_level: int = 1,
                 max_blocks: int = MAX_BATCH_BLOCKS) -> None:
        self.volume = volume
        self.epoch = epoch
        self.geo = geo
        self.view = view
        self.seen = seen
        self.dedup_enabled = dedup
        self.max_blocks = max_blocks
        self.level = compress_level
        self._zstd = zstandard.ZstdCompressor(level=compress_level) if compress_level > 0 else None
        self._dedup: dict[int, int] | None = None
        self.stats = PlanStats()

    def _dedup_index(self) -> dict[int, int]:
        if self._dedup is None:
            self._dedup = dict(zip(self.view, range(len(self.view)), strict=True))
            self._dedup.pop(zero_hash(self.geo.block_size), None)
        return self._dedup

    def plan(self, src: memoryview, changed: list[tuple[int, int]],
             next_seq: Callable[[], int]) -> Iterator[PlannedBatch]:
        for start in range(0, len(changed), self.max_blocks):
            planned = self._one(src, changed[start : start + self.max_blocks], next_seq)
            if planned is not None:
                yield planned

    def _one(self, src: memoryview, part: list[tuple[int, int]],
             next_seq: Callable[[], int]) -> PlannedBatch | None:
        geo, bs, view = self.geo, self.geo.block_size, self.view
        dedup = self._dedup_index() if self.dedup_enabled else None
        st = self.stats
        indices: list[int] = []
        kinds = bytearray()
        hashes: list[int] = []
        copy_from: list[int] = []
        datas: list[bytes] = []
        copy_data: dict[int, bytes] = {}
        raw = 0
        for index, scan_hash in part:
            off = index * bs
            data = bytes(src[off : off + bs])
            h = block_hash(data)
            if h != scan_hash:  # written again since the scan: ship what is there now
                self.seen[index // CHUNK_BLOCKS] = UNKNOWN
            old = view[index]
            if h == old:
                continue
            raw += len(data)
            indices.append(index)
            hashes.append(h)
            if h == zero_hash(len(data)) and not any(data):
                kinds.append(Kind.ZERO)
                st.zero_blocks += 1
            elif dedup is not None and (j := dedup.get(h)) is not None and view[j] == h:
                kinds.append(Kind.COPY)
                copy_from.append(j)
                copy_data[len(indices) - 1] = data
                st.dedup_blocks += 1
            else:
                kinds.append(Kind.DATA)
                datas.append(data)
                st.data_blocks += 1
            view[index] = h
            if dedup is not None:
                if dedup.get(old) == index:
                    del dedup[old]
                dedup.setdefault(h, index)
        if not indices:
            return None
        st.changed_blocks += len(indices)
        st.raw_bytes += raw
        batch = self.encode(next_seq(), indices, bytes(kinds), hashes, copy_from, datas)
        st.payload_bytes += len(batch.payload)
        st.batches += 1
        return PlannedBatch(batch, raw, copy_data)

    def encode(self, seq: int, indices: list[int], kinds: bytes, hashes: list[int],
               copy_from: list[int], datas: list[bytes]) -> Batch:
        raw_payload = b"".join(datas)
        payload, compression = raw_payload, Compression.NONE
        if self._zstd is not None and raw_payload:
            packed = self._zstd.compress(raw_payload)
            if len(packed) < len(raw_payload) * 0.97:
                payload, compression = packed, Compression.ZSTD
        return Batch(volume=self.volume, epoch=self.epoch, seq=seq, block_size=self.geo.block_size,
                     volume_size=self.geo.size, indices=indices, kinds=kinds, hashes=hashes,
                     copy_from=copy_from, compression=compression,
                     raw_length=len(raw_payload), payload=payload).seal()

    def without_copies(self, planned: PlannedBatch) -> Batch:
        """The same batch with every COPY record turned into DATA (the replica refused a copy)."""
        b = planned.batch
        kinds = bytearray(b.kinds)
        datas: list[bytes] = []
        # DATA payload order must follow record order, so rebuild it from scratch.
        payload = _split_payload(b, self.geo)
        for pos, kind in enumerate(b.kinds):
            if kind == Kind.COPY:
                kinds[pos] = Kind.DATA
                datas.append(planned.copy_data[pos])
            elif kind == Kind.DATA:
                datas.append(payload[pos])
        planned.copy_data.clear()
        return self.encode(b.seq, b.indices, bytes(kinds), b.hashes, [], datas)


def _split_payload(b: Batch, geo: Geometry) -> dict[int, bytes]:
    if b.compression is Compression.ZSTD:
        raw = zstandard.ZstdDecompressor().decompress(b.payload, max_output_size=b.raw_length)
    else:
        raw = b.payload
    out: dict[int, bytes] = {}
    pos = 0
    for i, (index, kind) in enumerate(zip(b.indices, b.kinds, strict=True)):
        if kind == Kind.DATA:
            n = geo.block_len(index)
            out[i] = raw[pos : pos + n]
            pos += n
    return out
