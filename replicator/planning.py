"""The planner: turns blocks that differ from the replica into sealed delta batches.

It owns the *view* (per-block hashes the replica will hold once every planned batch is applied)
and the dedup index over it (content hash -> a block holding that content). Zero blocks become
ZERO records, blocks whose content the replica already holds become COPY records, the rest DATA.
Rewrites of one block between scans are naturally coalesced: only the content present when the
block is read is planned.

With an activity log (write capture: activity.py) the extents of the view entries about to
change are pinned in it first, until the plan (or the point, capture/points.py) is done.
"""

from __future__ import annotations

import contextlib
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import zstandard

from replicator.activity import ActivityLog
from replicator.batch import Batch, Compression, Decoder, Kind
from replicator.blockmap import (
    CHUNK_BLOCKS,
    UNKNOWN,
    ChunkSource,
    Geometry,
    block_hash,
    zero_block,
    zero_hash,
)

_ALL_DATA = bytes([Kind.DATA]) * CHUNK_BLOCKS
MAX_BATCH_BLOCKS = 512  # 2 MiB of 4 KiB blocks: well under gRPC's 4 MiB message limit


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


@dataclass
class _Builder:
    indices: list[int] = field(default_factory=list)
    kinds: bytearray = field(default_factory=bytearray)
    hashes: list[int] = field(default_factory=list)
    copy_from: list[int] = field(default_factory=list)
    datas: list[memoryview] = field(default_factory=list)
    copy_data: dict[int, bytes] = field(default_factory=dict)
    raw: int = 0


class Planner:
    def __init__(self, volume: str, epoch: int, geo: Geometry, view: array[int] | memoryview,
                 seen: array[int], *, dedup: bool = True, compress_level: int = 1,
                 max_blocks: int = MAX_BATCH_BLOCKS, activity: ActivityLog | None = None) -> None:
        self.volume = volume
        self.epoch = epoch
        self.geo = geo
        self.view = view
        self.seen = seen
        self.dedup_enabled = dedup
        self.max_blocks = max_blocks
        self._zstd = zstandard.ZstdCompressor(level=compress_level) if compress_level > 0 else None
        self._dedup: dict[int, int] | None = None
        self.stats = PlanStats()
        # Write capture: every batch goes to the target's redo journal (see staging.py).
        self.staged = False
        self.activity = activity

    def holding(self, blocks: Iterable[int]) -> contextlib.AbstractContextManager[None]:
        """While the view entries of ``blocks`` change: their extents pinned in the activity
        log (if any)."""
        al = self.activity
        return contextlib.nullcontext() if al is None else al.holding(al.extents_of(blocks))

    def forget(self, blocks: Iterable[int]) -> None:
        """What the replica holds in ``blocks`` is not known any more: shipped again."""
        wanted = [b for b in blocks if b < len(self.view)]
        with self.holding(wanted):
            for b in wanted:
                self.view[b] = UNKNOWN

    def _dedup_index(self) -> dict[int, int]:
        if self._dedup is None:
            self._dedup = dict(zip(self.view, range(len(self.view)), strict=True))
            self._dedup.pop(zero_hash(self.geo.block_size), None)
        return self._dedup

    def plan(self, src: ChunkSource, chunks: list[int],
             next_seq: Callable[[], int]) -> Iterator[PlannedBatch]:
        """Batches for every block of ``chunks`` whose content differs from the view.

        Each chunk is copied once and planned from the copy, so every block is hashed from the
        bytes that are shipped. The chunk's entry in ``seen`` becomes the hash of that copy: if
        the volume moved after the scan, the next scan finds a different chunk hash and looks
        at it block by block again (a write racing the scan is never skipped).
        """
        held: set[int] = set()  # extents pinned in the activity log, until the plan ends
        try:
            yield from self._plan(src, chunks, next_seq, held)
        finally:
            if held and self.activity is not None:
                self.activity.unpin(held)

    def _plan(self, src: ChunkSource, chunks: list[int], next_seq: Callable[[], int],
              held: set[int]) -> Iterator[PlannedBatch]:
        geo, view, seen = self.geo, self.view, self.seen
        al = self.activity
        bs, chunk_bytes, size = geo.block_size, geo.chunk_bytes, geo.size
        hash_ = block_hash
        dedup = self._dedup_index() if self.dedup_enabled else None
        zh_full = zero_hash(bs)
        max_blocks = self.max_blocks
        cur = _Builder()
        for c in chunks:
            start = c * chunk_bytes
            # A private copy of the chunk first: the volume may be written while we plan, and
            # what is hashed must be exactly what is shipped.
            buf = src[start : min(size, start + chunk_bytes)].tobytes()
            cv = memoryview(buf)
            hs = [hash_(cv[o : o + bs]) for o in range(0, len(buf), bs)]
            b0 = c * CHUNK_BLOCKS
            olds = view[b0 : b0 + len(hs)]
            same = hs == olds.tolist()
            if not same and al is not None and b0 // al.extent_blocks not in held:
                held.add(b0 // al.extent_blocks)
                al.pin((b0 // al.extent_blocks,))
            if same:
                pass
            elif (len(hs) == CHUNK_BLOCKS and len(cur.indices) + CHUNK_BLOCKS <= max_blocks
                  and self._all_new_data(hs, olds, dedup, zh_full)):
                self._add_chunk(cur, b0, hs, olds, cv, dedup)
            else:
                for k, h in enumerate(hs):
                    if h != olds[k]:
                        self._add_block(cur, b0 + k, h, olds[k], cv[k * bs : (k + 1) * bs],
                                        dedup)
                        if len(cur.indices) >= max_blocks:
                            yield self._finish(cur, next_seq)
                            cur = _Builder()
            if len(cur.indices) >= max_blocks:
                yield self._finish(cur, next_seq)
                cur = _Builder()
            # The view now reflects exactly this copy: remember its hash (if the chunk moved
            # since the scan, the next scan sees a different hash and looks again).
            seen[c] = hash_(buf)
        if cur.indices:
            yield self._finish(cur, next_seq)

    def _add_chunk(self, cur: _Builder, b0: int, hs: list[int], olds: array[int] | memoryview,
                   cv: memoryview, dedup: dict[int, int] | None) -> None:
        """Bulk path (initial sync, large rewrites): sixteen new DATA blocks at once."""
        cur.indices.extend(range(b0, b0 + CHUNK_BLOCKS))
        cur.hashes.extend(hs)
        cur.kinds.extend(_ALL_DATA)
        cur.datas.append(cv)
        cur.raw += len(cv)
        self.stats.data_blocks += CHUNK_BLOCKS
        self.view[b0 : b0 + CHUNK_BLOCKS] = array("Q", hs)
        if dedup is not None:
            if not dedup.keys().isdisjoint(olds):
                for k, old in enumerate(olds):
                    if dedup.get(old) == b0 + k:
                        del dedup[old]
            dedup.update(zip(hs, range(b0, b0 + CHUNK_BLOCKS), strict=True))

    def _add_block(self, cur: _Builder, b: int, h: int, old: int, data: memoryview,
                   dedup: dict[int, int] | None) -> None:
        """One changed block: ZERO, COPY of a block the replica holds, or DATA."""
        st, view = self.stats, self.view
        cur.indices.append(b)
        cur.hashes.append(h)
        cur.raw += len(data)
        if h == zero_hash(len(data)) and data == zero_block(len(data)):
            cur.kinds.append(Kind.ZERO)
            st.zero_blocks += 1
        elif dedup is not None and (j := dedup.get(h)) is not None and view[j] == h:
            cur.kinds.append(Kind.COPY)
            cur.copy_from.append(j)
            cur.copy_data[len(cur.indices) - 1] = data.tobytes()
            st.dedup_blocks += 1
        else:
            cur.kinds.append(Kind.DATA)
            cur.datas.append(data)
            st.data_blocks += 1
        view[b] = h
        if dedup is not None:
            if dedup.get(old) == b:
                del dedup[old]
            dedup.setdefault(h, b)

    @staticmethod
    def _all_new_data(hs: list[int], olds: array[int] | memoryview, dedup: dict[int, int] | None,
                      zh: int) -> bool:
        """Every block of the chunk changed, none is zero, none repeats another block of the
        chunk or anything the replica holds: all DATA (checked with C-level set operations)."""
        if zh in hs or len(set(hs)) != len(hs):
            return False
        if not set(hs).isdisjoint(olds):
            return False
        return dedup is None or dedup.keys().isdisjoint(hs)

    def _finish(self, cur: _Builder, next_seq: Callable[[], int]) -> PlannedBatch:
        planned = self.seal(next_seq(), cur.indices, bytes(cur.kinds), cur.hashes,
                            cur.copy_from, cur.datas, cur.raw)
        planned.copy_data = cur.copy_data
        return planned

    def seal(self, seq: int, indices: list[int], kinds: bytes, hashes: list[int],
             copy_from: list[int], datas: list[memoryview] | list[bytes], raw: int,
             cp: int = 0) -> PlannedBatch:
        """Encode a batch of planned records and count it in the stats."""
        st = self.stats
        batch = self.encode(seq, indices, kinds, hashes, copy_from, datas, cp=cp)
        st.changed_blocks += len(indices)
        st.raw_bytes += raw
        st.payload_bytes += len(batch.payload)
        st.batches += 1
        return PlannedBatch(batch, raw)

    def encode(self, seq: int, indices: list[int], kinds: bytes, hashes: list[int],
               copy_from: list[int], datas: list[memoryview] | list[bytes], cp: int = 0) -> Batch:
        raw_payload = b"".join(datas)
        payload, compression = raw_payload, Compression.NONE
        if self._zstd is not None and raw_payload and self._worth_compressing(datas):
            packed = self._zstd.compress(raw_payload)
            if len(packed) < len(raw_payload) * 0.97:
                payload, compression = packed, Compression.ZSTD
        return Batch(volume=self.volume, epoch=self.epoch, seq=seq, block_size=self.geo.block_size,
                     volume_size=self.geo.size, indices=indices, kinds=kinds, hashes=hashes,
                     copy_from=copy_from, compression=compression,
                     raw_length=len(raw_payload), payload=payload, staged=self.staged,
                     cp=cp).seal()

    def _worth_compressing(self, datas: list[memoryview] | list[bytes]) -> bool:
        """Probe two blocks: if neither shrinks, the batch is (most likely) already-compressed
        or encrypted data and compressing all of it would only burn CPU."""
        assert self._zstd is not None
        if len(datas) < 4:
            return True
        for probe in (datas[0], datas[len(datas) // 2]):
            if len(self._zstd.compress(probe)) < len(probe) * 0.9:
                return True
        return False

    def without_copies(self, planned: PlannedBatch) -> Batch:
        """The same batch with every COPY record turned into DATA (the replica refused a copy)."""
        b = planned.batch
        # A batch with a COPY record is never a contiguous DATA run, so the decoder lists
        # every record, with each DATA block's offset in the decompressed payload.
        records, payload = Decoder().open(b)
        kinds = bytearray(b.kinds)
        datas: list[bytes] = []
        for pos, (index, kind, _h, source) in enumerate(records):
            if kind == Kind.COPY:
                kinds[pos] = Kind.DATA
                datas.append(planned.copy_data[pos])
            elif kind == Kind.DATA:
                datas.append(payload[source : source + self.geo.block_len(index)])
        planned.copy_data.clear()
        return self.encode(b.seq, b.indices, bytes(kinds), b.hashes, [], datas)
