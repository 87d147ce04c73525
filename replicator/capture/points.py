"""Staged batches for consistency points extracted from the change journal.

Each point's blocks are shipped once, with their last content in the point, as DATA or ZERO
records (never COPY: the target may apply a point twice after a crash, and a copy is not
idempotent). A block whose content the replica already holds is skipped. The last batch of a
point carries its number (``cp``), which tells the target the point is complete; for a resync,
only the very last batch closes, with the number of the point the resync ends at. The extents
of a point's blocks are pinned in the activity log (if any) while it is planned: one sync for
the new ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from replicator.batch import Kind
from replicator.blockmap import CHUNK_BLOCKS, UNKNOWN, block_hash, zero_block, zero_hash
from replicator.capture.journal_records import BLOCK_MASK, KEY_SHIFT, ExtractedPoint
from replicator.planning import MAX_BATCH_BLOCKS, PlannedBatch, Planner


def plan_points(planner: Planner, points: list[ExtractedPoint], next_seq: Callable[[], int],
                close_with: int | None = None, volume: int = 0) -> Iterator[PlannedBatch]:
    """Batches for the blocks of journal volume ``volume`` in ``points``, in order. Every
    point is closed, with an empty batch if the volume has nothing in it (a group's members
    all close every point). ``close_with``: only the last batch closes, with that number."""
    for i, point in enumerate(points):
        closing = close_with is None or i == len(points) - 1
        cp = 0 if not closing else point.cp if close_with is None else close_with
        with planner.holding(key & BLOCK_MASK for key in point.blocks
                             if key >> KEY_SHIFT == volume):
            yield from _plan_point(planner, point, next_seq, cp, volume)
    if not points and close_with is not None:
        yield from _plan_point(planner, ExtractedPoint(close_with), next_seq, close_with,
                               volume)


def _plan_point(planner: Planner, point: ExtractedPoint, next_seq: Callable[[], int],
                cp: int, volume: int) -> Iterator[PlannedBatch]:
    geo, view, seen, st = planner.geo, planner.view, planner.seen, planner.stats
    indices: list[int] = []
    kinds = bytearray()
    hashes: list[int] = []
    datas: list[memoryview] = []
    raw = 0
    items = sorted((key & BLOCK_MASK, data) for key, data in point.blocks.items()
                   if key >> KEY_SHIFT == volume)
    for n, (b, data) in enumerate(items):
        if b < geo.blocks:
            length = geo.block_len(b)
            content = memoryview(zero_block(length)) if data is None else data[:length]
            h = block_hash(content)
            if h != view[b]:
                indices.append(b)
                hashes.append(h)
                raw += length
                if data is None or (h == zero_hash(length) and content == zero_block(length)):
                    kinds.append(Kind.ZERO)
                    st.zero_blocks += 1
                else:
                    kinds.append(Kind.DATA)
                    datas.append(content)
                    st.data_blocks += 1
                view[b] = h
                seen[b // CHUNK_BLOCKS] = UNKNOWN  # the chunk's scan cache no longer holds
        last = n == len(items) - 1
        if len(indices) >= MAX_BATCH_BLOCKS or (last and indices):
            yield planner.seal(next_seq(), indices, bytes(kinds), hashes, [], datas, raw,
                               cp if last else 0)
            indices, kinds, hashes, datas, raw = [], bytearray(), [], [], 0
            if last:
                return
    if cp:
        yield planner.seal(next_seq(), [], b"", [], [], [], 0, cp)

