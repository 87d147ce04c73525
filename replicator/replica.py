"""The target's copy of one volume: the image file, its durable commit record and hash index.

Files under the target directory, per volume NAME:
  NAME.img   the replica, same size as the source volume
  NAME.meta  two 512-byte commit slots written alternately with pwrite + fdatasync; each holds
             applied_seq, applied_cp, epoch, geometry and generation with a checksum, so a torn
             write of one slot leaves the other valid.
  NAME.wal   the redo journal of staged batches (write capture: see staging.py).
  NAME.ledger  keyed digests of the last batches taken, by sequence (ledger.py): a resend is
             answered only if it is the batch taken under that number.
  NAME.index the per-block hash index, memory-mapped (blockindex.py), and NAME.al its
             activity log (activity.py): what a restart of the machine must hash again.
  NAME.clones/  drill clones (at most ``serve --max-clones`` at once).

Batches from a scan-based source are written into the image as they arrive. Staged batches
(write capture), and every batch in warm mode or while staged batches wait, go to the redo
journal first and reach the image one whole consistency point at a time.

The per-block hash index is NAME.index, memory-mapped: loaded as a clean stop saved it or as a
killed daemon left it, else hashed from the image (blockindex.py), and updated as blocks are
written. Batches are verified completely before the first byte is written: a rejected batch
changes nothing. Only a handshake changes the replica's size (``prepare``): a batch cut for
another size is refused, and a shrink that would cut off data is refused unless the target
allows it (``serve --allow-shrink``).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import struct
import sys
import threading
import uuid
from array import array
from dataclasses import dataclass
from typing import TypeAlias

import xxhash

from drctl.files import atomic_write
from replicator.batch import Batch, Decoder, Kind, Record
from replicator.blockindex import Binding, ReplicaIndex, image_hashes
from replicator.blockmap import Geometry, block_hash, hash_range, zero_block, zero_hash
from replicator.clones import clone_image, drop_clone_image
from replicator.demotion import clear_divergence, load_divergence
from replicator.errors import CorruptBatchError, ProtocolError, VolumeError
from replicator.ledger import BatchLedger
from replicator.staging import StagingLog

log = logging.getLogger(__name__)
Buffer: TypeAlias = bytes | memoryview
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SLOT = 512
_MAGIC = b"DRCTLRV1"
_FMT = "<8sIQQQI36sQQ"


def check_volume_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise ProtocolError(
            f"invalid volume name {name!r}: use letters, digits, '.', '_' and '-' (max 128)"
        )
    return name


@dataclass
class CommitRecord:
    applied_seq: int
    epoch: int
    size: int
    block_size: int
    generation: str
    counter: int
    applied_cp: int = 0  # the last consistency point written into the image

    def pack(self) -> bytes:
        body = struct.pack(_FMT, _MAGIC, 2, self.applied_seq, self.epoch, self.size,
                           self.block_size, self.generation.encode().ljust(36, b"\0"),
                           self.counter, self.applied_cp)
        body += struct.pack("<Q", xxhash.xxh3_64_intdigest(body))
        return body.ljust(_SLOT, b"\0")

    @classmethod
    def unpack(cls, raw: bytes) -> CommitRecord | None:
        n = struct.calcsize(_FMT)
        if len(raw) < n + 8:
            return None
        body, (check,) = raw[:n], struct.unpack("<Q", raw[n : n + 8])
        if xxhash.xxh3_64_intdigest(body) != check:
            return None
        magic, _ver, seq, epoch, size, bs, gen, counter, cp = struct.unpack(_FMT, body)
        if magic != _MAGIC:
            return None
        return cls(seq, epoch, size, bs, gen.rstrip(b"\0").decode(), counter, cp)


def _index_bytes(index: array[int] | memoryview) -> bytes | array[int] | memoryview:
    if sys.byteorder == "big":
        copy = array("Q", index)
        copy.byteswap()
        return copy.tobytes()
    return index  # hashed in place, not copied


def index_digest(index: array[int] | memoryview) -> bytes:
    return bytes(xxhash.xxh3_128_digest(_index_bytes(index)))


class Replica:
    """One replica volume. Not thread-safe by itself: the daemon serialises access per volume."""

    def __init__(self, directory: str, name: str, mode: str = "hot") -> None:
        self.name = check_volume_name(name)
        self.mode = mode
        self.directory = directory
        self.img_path = os.path.join(directory, f"{name}.img")
        self.meta_path = os.path.join(directory, f"{name}.meta")
        self.lock = threading.Lock()
        self._decoder = Decoder()
        self.created = False
        try:
            exists = os.path.exists(self.meta_path)
            self.img_fd = os.open(self.img_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self.meta_fd = os.open(self.meta_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise VolumeError(f"cannot open replica {self.img_path}: {exc.strerror}") from exc
        record = self._load_meta() if exists else None
        if record is None:
            record = CommitRecord(0, 0, 0, 0, str(uuid.uuid4()), 0)
            self.created = True
        self.record = record
        wal_path = os.path.join(directory, f"{name}.wal")
        if self.created and os.path.exists(wal_path) and os.path.getsize(wal_path):
            # frames of a commit record that is gone (their sequence numbers mean nothing to a
            # new one; applied frames stay in the file, staging.py): never applied here
            log.warning("volume %s: a redo journal without a commit record, discarded: %s",
                        name, wal_path)
            try:
                os.unlink(wal_path)
            except OSError as exc:
                raise VolumeError(f"cannot discard redo journal {wal_path}: "
                                  f"{exc.strerror}") from exc
        self.wal = StagingLog(wal_path, record.applied_seq)
        self.synced_seq = self.wal.last_seq  # staged frames up to here are durable
        self.ledger = BatchLedger(os.path.join(directory, f"{name}.ledger"), record.generation,
                                  self.received_seq)
        for frame in self.wal.frames:  # staged after the ledger's last record (a crash)
            if frame.seq > self.ledger.last:
                staged = self.wal.read(frame)
                self.ledger.record(staged.seq, self.ledger.digest(staged))
        self.group_path = os.path.join(directory, f"{name}.group")
        self.group, self.members = self._load_group()
        # A demoted primary: blocks that may differ from the promoted replica (demotion.py)
        self.divergence = load_divergence(directory, name)
        # opened before anything writes the image (a hot target applies staged points first)
        self._ix = ReplicaIndex.open(os.path.join(directory, f"{name}.index"), self.img_fd,
                                     self.geometry, self._binding(), self.wal,
                                     self.created and record.applied_seq == 0)

    # -- durable commit record -------------------------------------------------------------

    def _load_meta(self) -> CommitRecord | None:
        raw = os.pread(self.meta_fd, 2 * _SLOT, 0)
        slots = [CommitRecord.unpack(raw[i * _SLOT : (i + 1) * _SLOT]) for i in range(2)]
        valid = [s for s in slots if s is not None]
        if not valid:
            if raw.strip(b"\0"):
                raise VolumeError(f"{self.meta_path}: both commit slots are corrupt")
            return None
        return max(valid, key=lambda r: r.counter)

    def _binding(self) -> Binding:
        r = self.record
        return Binding(r.generation, r.counter, r.applied_seq, self.wal.last_seq)

    def _write_meta(self) -> None:
        self.record.counter += 1
        os.pwrite(self.meta_fd, self.record.pack(), (self.record.counter % 2) * _SLOT)
        os.fdatasync(self.meta_fd)

    # -- geometry and index ----------------------------------------------------------------

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.record.size, self.record.block_size or 4096)

    def prepare(self, size: int, block_size: int, allow_shrink: bool = False) -> int:
        """Make the replica match the source's geometry (called at handshake; the caller checks
        the numbers). A replica grows freely; a shrink that would cut off anything but zeros
        is refused unless ``allow_shrink``, and never happens while staged batches wait.
        Returns the size the replica had."""
        if self.record.block_size and self.record.block_size != block_size:
            raise ProtocolError(
                f"volume {self.name}: replica block size is {self.record.block_size}, "
                f"source sends {block_size}"
            )
        old = self.record.size
        if size < old:
            self._check_shrink(size, allow_shrink)
        self.record.block_size = block_size
        if self.created or old != size:
            self._resize(size)
            self.commit()
        return old

    def _check_shrink(self, size: int, allow_shrink: bool) -> None:
        if self.wal.frames:
            raise ProtocolError(
                f"shrink_refused: volume {self.name} has {len(self.wal.frames)} staged batches "
                f"waiting; it is not shrunk from {self.record.size} to {size} bytes before "
                "they are applied")
        block = None if allow_shrink else self._data_from(size)
        if block is not None:
            raise ProtocolError(
                f"shrink_refused: volume {self.name} holds data in block {block}, which a "
                f"shrink from {self.record.size} to {size} bytes would cut off (a target "
                "started with --allow-shrink lets a handshake do that)")

    def _data_from(self, size: int) -> int | None:
        """The first block at or past byte ``size`` that is not all zeros (None: none is)."""
        geo = self.geometry
        bs = geo.block_size
        first = size // bs
        cut = self._ix.file.read(first, geo.blocks - first)
        if not cut:
            return None
        tail = geo.block_len(geo.blocks - 1)
        full = cut[:-1] if tail != bs else cut
        zero = zero_hash(bs)
        if full.count(zero) != len(full):
            return first + next(i for i, h in enumerate(full) if h != zero)
        if tail != bs and cut[-1] != zero_hash(tail):
            return geo.blocks - 1
        return None

    def _resize(self, size: int) -> None:
        def truncate() -> None:  # once the extents it changes are listed
            if os.fstat(self.img_fd).st_size != size:
                os.ftruncate(self.img_fd, size)

        old = self.record.size
        self.record.size = size
        self._ix.resize(self.geometry, old, self.wal, truncate)

    def index(self) -> memoryview:
        """The image's hashes, staged batches laid over them (what the source plans against)."""
        return self._ix.hashes

    def listing(self, first: int = 0, count: int = 0) -> array[int]:
        """A copy of the index from ``first`` (``count`` entries; 0: to the end), by pread."""
        return self._ix.file.read(first, count or len(self._ix.file))

    @property
    def received_seq(self) -> int:
        """The last batch held durably here, in the image or in the redo journal."""
        return max(self.record.applied_seq, self.wal.last_seq)

    def _load_group(self) -> tuple[str, tuple[str, ...]]:
        try:
            with open(self.group_path) as fh:
                doc = json.load(fh)
            return str(doc["group"]), tuple(str(m) for m in doc["members"])
        except FileNotFoundError:
            return "", ()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise VolumeError(f"{self.group_path}: unreadable group membership: {exc}") from exc

    def set_group(self, group: str, members: tuple[str, ...]) -> None:
        """Record (durably) the consistency group this replica belongs to."""
        if group:
            check_volume_name(group)
            for m in members:
                check_volume_name(m)
            if self.name not in members:
                raise ProtocolError(f"volume {self.name} is not among the members of group "
                                    f"{group}: {', '.join(members)}")
        if (group, tuple(members)) == (self.group, self.members):
            return
        if self.group and group != self.group and self.wal.frames:
            raise ProtocolError(f"volume {self.name} has staged batches of group {self.group}; "
                                f"it cannot join {group or 'no group'} before they are applied")
        atomic_write(self.group_path,
                     json.dumps({"group": group, "members": list(members)}).encode(), 0o644)
        self.group, self.members = group, tuple(members)

    def closed_cp(self, durable: bool = True) -> int:
        """The last consistency point this replica holds completely (and durably, unless
        ``durable`` is False: staged frames not yet synced count too)."""
        cp = self.wal.last_closed_cp(self.synced_seq if durable else None)
        return self.record.applied_cp if cp is None else cp

    def must_stage(self, batch: Batch) -> bool:
        return batch.staged or self.mode == "warm" or bool(self.wal.frames)

    def hashes_from_disk(self) -> array[int]:
        return image_hashes(self.img_fd, self.geometry)

    def hashes_in(self, first: int, count: int) -> array[int]:
        """Blocks [first, first + count) as the replica holds them durably: the image's, or a
        staged block's (waiting for its point). The image's clean pages are dropped first, so
        what was written back is read from the disk (a page still dirty is read from the
        cache: POSIX_FADV_DONTNEED drops clean pages only)."""
        geo, out = self.geometry, array("Q")
        end = min(geo.blocks, first + count)
        for at in range(first, end, 256):
            out.extend(hash_range(self.img_fd, geo, at, min(256, end - at), drop_cache=True))
        if self.wal.frames:
            index = self.index()
            for b in self.wal.blocks_in(first, end):
                out[b - first] = index[b]
        return out

    def digest(self) -> bytes:
        return self._ix.digest()

    # -- applying batches --------------------------------------------------------------------

    def apply(self, batch: Batch) -> int:
        """Verify then write one batch (not yet durable) and note it in the ledger. Returns
        the bytes written."""
        written = self._apply(batch, self.index())
        self.ledger.record(batch.seq, self.ledger.digest(batch))
        return written

    def same_as_taken(self, batch: Batch) -> bool | None:
        """Is ``batch`` (under a sequence this replica already took) byte for byte the batch
        taken under that sequence? None: that is no longer known (see ledger.py)."""
        want = self.ledger.get(batch.seq)
        if want is None:
            return None
        return hmac.compare_digest(want, self.ledger.digest(batch))

    def _open(self, batch: Batch, incoming: bool = True) -> tuple[list[Record], bytes]:
        """Check a batch (checksum, fields, geometry) and decompress it. An incoming batch
        must be cut for the replica's size as it is (only a handshake resizes a replica); a
        staged one being applied was checked against the size of its day, which a handshake
        may have grown since."""
        records, payload = self._decoder.open(batch)
        if batch.block_size != self.record.block_size:
            raise CorruptBatchError("malformed", f"batch {batch.seq}: block size mismatch")
        if batch.volume_size != self.record.size and (incoming
                                                      or batch.volume_size > self.record.size):
            raise CorruptBatchError(
                "geometry", f"batch {batch.seq} is for a volume of {batch.volume_size} bytes, "
                f"the replica has {self.record.size} (only a handshake resizes it)")
        return records, payload

    def _apply(self, batch: Batch, index: memoryview | None, incoming: bool = True,
               verified: bool = False) -> int:
        """Verify then write; ``index`` (None: leave the index alone) takes the new hashes.
        The blocks are listed as in flight in the index's header while they are written.
        ``verified``: each block's hash was checked already (a staged batch read back from
        the redo journal: checked when it was staged; its checksum, over the same payload, is
        checked again as it is opened here), so the blocks are not hashed a second time."""
        records, payload = self._open(batch, incoming)
        self._ix.begin(batch.indices, inflight=index is not None)  # logged first (activity.py)
        if not records and batch.indices:
            written = self._apply_run(batch, payload, index, check=not verified)
        else:
            geo = Geometry(batch.volume_size, self.record.block_size)
            written = self._write(records, self._verify(batch.seq, records, payload, geo,
                                                        check=not verified), index)
        self._ix.done(inflight=index is not None)
        return written

    # -- staging (redo journal) ----------------------------------------------------------------

    def stage(self, batch: Batch) -> int:
        """Verify a batch completely and append it to the redo journal (durable at the next
        :meth:`commit`). Returns the raw bytes it carries."""
        if batch.copy_from:
            # A COPY reads another block at apply time: not idempotent if a crash makes the
            # target apply the consistency point twice.
            # (reason copy_mismatch: the source resends the batch with the copies as DATA)
            raise CorruptBatchError("copy_mismatch", f"batch {batch.seq}: staged batches "
                                    "cannot carry COPY records")
        records, payload = self._open(batch)
        if not records and batch.indices:
            self._run_hashes(batch, payload)
        else:
            self._verify(batch.seq, records, payload, self.geometry)
        # A batch that was not sent as staged closes its own point (scan passes into a warm
        # replica): its cp stays the last one seen.
        closes = batch.cp != 0 or not batch.staged
        self.wal.append(batch, batch.cp or self.closed_cp(durable=False), closes)
        self._ix.store(batch.indices, batch.hashes)  # their extents logged first (activity.py)
        self.ledger.record(batch.seq, self.ledger.digest(batch))
        return len(payload)

    def apply_staged(self, max_seq: int | None = None,
                     max_cp: int | None = None) -> tuple[int, int]:
        """Write every complete consistency point of the redo journal (frames up to
        ``max_seq``, which must be durable; points up to ``max_cp``) into the image, make it
        durable and record it. Returns (frames applied, the image's consistency point)."""
        frames = self.wal.complete(max_seq, max_cp)
        if not frames:
            return 0, self.record.applied_cp
        self._ix.begin(None)  # the redo journal holds them until they are recorded applied
        for frame in frames:
            self._apply(self.wal.read(frame), None, incoming=False, verified=True)
        os.fdatasync(self.img_fd)
        with self.lock:
            self.record.applied_seq = max(self.record.applied_seq, frames[-1].seq)
            self.record.applied_cp = frames[-1].cp
            self._write_meta()
        self.wal.drop_through(frames[-1].seq)
        self._ix.done()
        return len(frames), self.record.applied_cp

    def discard_incomplete(self, max_cp: int | None = None) -> int:
        """Promotion: the open consistency point will never complete. Drop its batches (and,
        in a group, those of points past ``max_cp``, which not every member holds)."""
        staged = self.wal.blocks_in(0, self.geometry.blocks)
        dropped = self.wal.discard_incomplete(max_cp)
        if dropped:
            self._ix.refresh(self.geometry, staged, self.wal)  # the projection included them
            self.ledger.forget_after(self.received_seq)  # those numbers may come again
        return dropped

    def _apply_run(self, batch: Batch, payload: bytes, index: memoryview | None,
                   check: bool = True) -> int:
        """A run of full DATA blocks: one hash pass, one pwrite, one slice of the index."""
        view = memoryview(payload)
        got = self._run_hashes(batch, payload) if check else batch.hashes
        bs = self.record.block_size
        first = batch.indices[0]
        written = 0
        while written < len(payload):
            written += os.pwrite(self.img_fd, view[written:], first * bs + written)
        if index is not None:
            index[first : first + len(got)] = array("Q", got)
        return written

    def _run_hashes(self, batch: Batch, payload: bytes) -> list[int]:
        """The hashes of a run of full DATA blocks, checked against the batch's."""
        bs = self.record.block_size
        view = memoryview(payload)
        hash_ = block_hash
        got = [hash_(view[o : o + bs]) for o in range(0, len(payload), bs)]
        want = batch.hashes
        if got != list(want):
            bad = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
            raise CorruptBatchError("block_hash",
                                    f"batch {batch.seq}: block {batch.indices[bad]} hash mismatch")
        return got

    def _verify(self, seq: int, records: list[Record], payload: bytes,
                geo: Geometry, check: bool = True) -> list[Buffer]:
        """Content of every record, checked against its hash (unless ``check`` is false: a
        staged batch, checked when it was staged); nothing is written yet."""
        bs = geo.block_size
        last = geo.blocks - 1
        tail = geo.block_len(last) if last >= 0 else 0
        view = memoryview(payload)
        hash_ = block_hash
        has_copies = any(rec[1] == Kind.COPY for rec in records)
        if not has_copies and len(payload) == bs * len(records):
            # Fast path (bulk sync): only full DATA blocks, laid out back to back.
            if check:
                got = [hash_(view[o : o + bs]) for o in range(0, len(payload), bs)]
                if got != [rec[2] for rec in records]:
                    bad = next(i for i, (a, r) in enumerate(zip(got, records, strict=True))
                               if a != r[2])
                    raise CorruptBatchError(
                        "block_hash", f"batch {seq}: block {records[bad][0]} hash mismatch")
            return [view[o : o + bs] for o in range(0, len(payload), bs)]
        pending: dict[int, Buffer] = {}
        contents: list[Buffer] = []
        append = contents.append
        for index, kind, h, source in records:
            length = bs if index != last else tail
            data: Buffer
            if kind == 1:  # DATA
                data = view[source : source + length]
            elif kind == 2:  # ZERO
                data = zero_block(length)
            else:
                data = pending.get(source) or os.pread(
                    self.img_fd, geo.block_len(source), source * bs
                )
                if len(data) != length:
                    raise CorruptBatchError("copy_mismatch", f"batch {seq}: copy length differs")
            if check and hash_(data) != h:
                reason = "copy_mismatch" if kind == Kind.COPY else "block_hash"
                raise CorruptBatchError(reason, f"batch {seq}: block {index} hash mismatch")
            if has_copies:
                pending[index] = data
            append(data)
        return contents

    def _write(self, records: list[Record], contents: list[Buffer],
               index: memoryview | None) -> int:
        bs = self.record.block_size
        fd = self.img_fd
        written = 0
        run_start = -1
        run: list[Buffer] = []
        for rec, data in zip(records, contents, strict=True):
            i = rec[0]
            if index is not None:
                index[i] = rec[2]
            if run and i == run_start + len(run):
                run.append(data)
                continue
            if run:
                written += os.pwritev(fd, run, run_start * bs)
            run_start, run = i, [data]
        if run:
            written += os.pwritev(fd, run, run_start * bs)
        return written

    def commit(self, applied_seq: int | None = None) -> None:
        """Make everything applied so far durable, then record ``applied_seq``.

        May run in another thread than :meth:`apply`: data written while the fdatasync runs
        may or may not be flushed, which is why the caller passes the sequence it had applied
        *before* calling, and only that is recorded.
        """
        frames = self.wal.frames  # appended to by the volume thread meanwhile
        if frames:
            self.wal.sync()  # staged batches: durable in the redo journal
            if applied_seq is not None:
                self.synced_seq = max(self.synced_seq, applied_seq)
        # Only batches written into the image count as applied there: stop before the first
        # one waiting in the redo journal (staging, once begun, lasts until it is drained).
        direct = applied_seq if applied_seq is not None else self.record.applied_seq
        if frames:
            direct = min(direct, frames[0].seq - 1)
        if direct > self.record.applied_seq or applied_seq is None:
            os.fdatasync(self.img_fd)
            with self.lock:
                self.record.applied_seq = max(self.record.applied_seq, direct)
                self._write_meta()
        if self.divergence is not None and self.closed_cp() > 0:
            # The first consistency point since the demotion is durable: the resync that
            # overwrote the diverged blocks is complete.
            clear_divergence(self.directory, self.name)
            self.divergence = None

    def checkpoint_due(self) -> bool:
        """Is the activity log's checkpoint due (blockindex.py)? A set lookup: on the loop."""
        return self._ix.al.due()

    def checkpoint(self) -> None:
        """The activity log's checkpoint (after a commit's ack, on the volume's sync thread,
        beside its applies: they pin what they change)."""
        self._ix.checkpoint(self.wal)

    def clone(self, name: str, limit: int | None = None) -> tuple[str, str]:
        """A writable copy of the image as applied so far: (path, method); clones.py. Call on
        the volume's thread so no batch is half-applied in the copy."""
        return clone_image(self.img_path, self.img_fd, self.record.size, self.name,
                           check_volume_name(name), limit)

    def drop_clone(self, name: str) -> str:
        return drop_clone_image(self.img_path, self.name, check_volume_name(name))

    def renew_generation(self) -> str:
        """The replica's content is not what a source planned against (a batch was refused as
        a resend): a new generation makes every source plan again from the content it holds
        (the driver re-reads the replica when the generation changes)."""
        with self.lock:
            self.record.generation = str(uuid.uuid4())
            self._write_meta()
        self._ix.generation = self.record.generation
        self.ledger.rebind(self.record.generation)
        return self.record.generation

    def raise_epoch(self, epoch: int) -> None:
        with self.lock:
            if epoch > self.record.epoch:
                self.record.epoch = epoch
                self._write_meta()

    def close(self, keep_index: bool = True) -> None:
        self._ix.close_clean(self.geometry, self._binding(), self.wal, keep_index)
        self.wal.close()
        self.ledger.close()
        for fd in (self.img_fd, self.meta_fd):
            try:
                os.close(fd)
            except OSError:
                pass
