"""Per-block hash arrays kept in files and memory-mapped, so that a restart reads 8 bytes per
block instead of the volume, and RAM does not grow with the size of what is described.

``HashFile``      a file of u64 hashes (host byte order) after an optional header, mapped with
                  MAP_SHARED. A store into ``hashes`` goes to the page cache: it outlives the
                  process (kill -9), not the machine. Bulk reads and writes (``read``, ``write``,
                  ``digest``) use pread/pwrite, which map no page into the process: its RSS
                  counts only the pages it stored into.
``ReplicaIndex``  the target's index of one replica, ``NAME.index`` (see its docstring),
                  with its activity log ``NAME.al`` (activity.py) for a crash of the machine.

The source keeps its *view* (what the replica holds, per block) in a ``HashFile`` too
(source_state.py).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import struct
import sys
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import xxhash

from replicator.activity import ActivityLog, new_binding
from replicator.blockmap import Geometry, hash_range, zero_hash
from replicator.staging import StagingLog
from replicator.units import format_bytes

log = logging.getLogger(__name__)

_PIECE = 1 << 20  # u64 entries per pread/pwrite (8 MiB)


def boot_id() -> str:
    """This boot of the machine ("" if unknown): page-cache state of an earlier boot is gone.
    ``DRCTL_BOOT_ID`` (tests and benchmarks only) is added to it: another value looks like a
    restart of the machine (the page cache is kept: a test spoils what would be lost), and a
    real restart still looks like one whatever it is set to."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            real = fh.read().strip()
    except OSError:
        real = ""
    override = os.environ.get("DRCTL_BOOT_ID")
    return f"{real}:{override}" if override else real


def identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What changes when a file is replaced or written: (device, inode, size, mtime_ns)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class HashFile:
    """``hashes``: a memoryview of u64 over the file past ``header`` bytes (a multiple of the
    page size). ``head``: the header bytes, mapped too (for values stored at every write)."""

    def __init__(self, path: str, header: int = 0) -> None:
        self.path = path
        self.header = header
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._map: mmap.mmap | None = None
        self._views: list[memoryview] = []
        self.hashes: memoryview = memoryview(array("Q"))
        self.head: memoryview = memoryview(bytearray(header))
        try:
            if os.fstat(self.fd).st_size < header:
                os.ftruncate(self.fd, header)
            self._remap()
        except BaseException:
            os.close(self.fd)
            raise

    def __len__(self) -> int:
        return len(self.hashes)

    def _remap(self) -> None:
        self._unmap()
        count = max(0, os.fstat(self.fd).st_size - self.header) // 8
        length = self.header + count * 8
        if not length:
            return
        self._map = mmap.mmap(self.fd, length)
        base = memoryview(self._map)
        self._views = [base]
        if count:
            self.hashes = base[self.header:].cast("Q")
            self._views.append(self.hashes)
        if self.header:
            self.head = base[: self.header]
            self._views.append(self.head)

    def _unmap(self) -> None:
        for v in reversed(self._views):
            v.release()
        self._views = []
        self.hashes = memoryview(array("Q"))
        self.head = memoryview(bytearray(self.header))
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a slice of the old view is still alive: unmapped with it
                pass
            self._map = None

    def resize(self, count: int, fill: int = 0) -> None:
        """``count`` entries; new ones are ``fill``."""
        old = len(self)
        self._unmap()
        os.ftruncate(self.fd, self.header + count * 8)
        if count > old:
            self._fill(old, count - old, fill)
        self._remap()

    def assign(self, values: array[int] | memoryview) -> None:
        """Replace every entry with ``values`` (resizing)."""
        raw = memoryview(bytes(memoryview(values).cast("B")))  # it may map this very file
        self._unmap()
        os.ftruncate(self.fd, self.header + len(raw))
        self._pwrite(0, raw)
        self._remap()

    def _fill(self, first: int, count: int, value: int) -> None:
        piece = (array("Q", [value]) * min(count, _PIECE)).tobytes()
        done = 0
        while done < count:
            n = min(count - done, _PIECE)
            self._pwrite(first + done, memoryview(piece)[: n * 8])
            done += n

    def _pwrite(self, first: int, raw: memoryview) -> None:
        at = self.header + first * 8
        done = 0
        while done < len(raw):
            done += os.pwrite(self.fd, raw[done:], at + done)

    def read(self, first: int, count: int) -> array[int]:
        """Entries [first, first + count) (fewer past the end), by pread."""
        count = max(0, min(count, len(self) - first))
        out = array("Q")
        out.frombytes(os.pread(self.fd, count * 8, self.header + first * 8))
        return out

    def write(self, first: int, values: array[int] | list[int]) -> None:
        """Entries from ``first`` on, by pwrite (no page is mapped into the process)."""
        arr = values if isinstance(values, array) else array("Q", values)
        self._pwrite(first, memoryview(arr).cast("B"))

    def pieces(self) -> Iterator[array[int]]:
        for first in range(0, len(self), _PIECE):
            yield self.read(first, _PIECE)

    def digest(self) -> bytes:
        """xxh3-128 of the entries as little-endian bytes (``replica.index_digest``)."""
        h = xxhash.xxh3_128()
        for arr in self.pieces():
            if sys.byteorder == "big":
                arr.byteswap()
            h.update(arr)
        return bytes(h.digest())

    def checksum(self) -> str:
        """xxh3-64 (hex) of the file's entries as stored (the source's state.json)."""
        h = xxhash.xxh3_64()
        for arr in self.pieces():
            h.update(arr)
        return str(h.hexdigest())

    def flush(self) -> None:
        """Make every store durable (msync, then the file's size and data)."""
        if self._map is not None:
            self._map.flush()
        os.fdatasync(self.fd)

    def close(self) -> None:
        self._unmap()
        os.close(self.fd)


# -- the target's index ---------------------------------------------------------------------------

INDEX_HEADER = 64 << 10  # the header page, the live values and the in-flight list
_LIVE = 512  # u64: [0] the image's mtime_ns after our last write, [1] in-flight count
_INFLIGHT = 4096  # u64 block numbers being written into the image directly, up to the array
MAX_INFLIGHT = (INDEX_HEADER - _INFLIGHT) // 8
STAGED = (1 << 64) - 1  # in-flight count: staged points being written (the redo journal has them)
CLEAN, OPEN = 1, 2
_MAGIC = b"DRCTLIX1"
_HFMT1 = struct.Struct("<8sIIIQQ36sQQQQQQQ36s16s")  # version 1, without the activity log's binding
_HFMT = struct.Struct(_HFMT1.format + "16s")
_CHECK = struct.Struct("<Q")


@dataclass(frozen=True)
class Binding:
    """What an index describes: a replica's commit record, its redo journal, its image."""

    generation: str
    counter: int
    applied_seq: int
    wal_seq: int


@dataclass
class _Header:
    state: int
    block_size: int
    size: int
    blocks: int
    generation: str
    counter: int = 0
    applied_seq: int = 0
    wal_seq: int = 0
    image: tuple[int, int, int, int] = (0, 0, 0, 0)
    boot: str = ""
    digest: bytes = b""
    binding: bytes = b""  # the activity log's (version 2)

    def pack(self) -> bytes:
        body = _HFMT.pack(_MAGIC, 2, self.state, self.block_size, self.size, self.blocks,
                          self.generation.encode().ljust(36, b"\0"), self.counter,
                          self.applied_seq, self.wal_seq, *self.image,
                          self.boot.encode().ljust(36, b"\0"), self.digest.ljust(16, b"\0"),
                          self.binding.ljust(16, b"\0"))
        return body + _CHECK.pack(xxhash.xxh3_64_intdigest(body))

    @classmethod
    def unpack(cls, raw: bytes) -> _Header | None:
        for fmt in (_HFMT, _HFMT1):
            body = raw[: fmt.size]
            if len(raw) >= fmt.size + _CHECK.size and _CHECK.unpack_from(raw, fmt.size)[0] \
                    == xxhash.xxh3_64_intdigest(body):
                break
        else:
            return None
        (magic, _v, state, bs, size, blocks, gen, counter, seq, wal, dev, ino, isize, mtime,
         boot, digest, *binding) = fmt.unpack(body)
        if magic != _MAGIC:
            return None
        return cls(state, bs, size, blocks, gen.rstrip(b"\0").decode(), counter, seq, wal,
                   (dev, ino, isize, mtime), boot.rstrip(b"\0").decode(), digest,
                   binding[0] if binding and any(binding[0]) else b"")


class ReplicaIndex:
    """``NAME.index``: the replica's block hashes (the image with its staged batches laid over
    it), memory-mapped, after a header that says whether they can be believed at the next open:

    * CLEAN (written by a clean stop, after the image and the array are synced): bound to the
      commit record (generation, counter, applied sequence), the redo journal's last sequence,
      the image's (device, inode, size, mtime) and the array's xxh3-128. All equal: loaded as
      it is (it is also the digest a handshake sends).
    * OPEN (marked, and synced, before the first change): a process had it open. If it died on
      this boot of the machine (kill -9), every store it made is in the page cache, so the array
      is what it kept, except the blocks it was writing into the image directly (listed in the
      header before each write: re-hashed from the image); the staged batches are laid over it
      again. The image's mtime, noted after each write, must not have moved since (nothing
      else wrote it). After a restart of the machine, the activity log ``NAME.al`` (bound to
      the header by a random binding) lists the extents where the image or the array may differ
      from what the last checkpoint made durable: only those are hashed again from the image
      (the same image: its inode is in the header), then the staged batches laid over.

    Anything else (missing, torn, another size or generation, a checksum that does not match, a
    restart of the machine without a usable activity log) is one WARNING line naming the file
    and the reason, and the image is hashed again, its holes skipped (SEEK_DATA).

    A change to the image or the array pins its extents in the activity log first (one sync
    for the new ones of a batch), until made. Checkpoints: at a commit when due, and at a clean
    stop (the redo journal, the image and the array synced before the log is emptied).
    """

    def __init__(self, path: str, img_fd: int) -> None:
        self.path = path
        self.img_fd = img_fd
        self.existed = os.path.exists(path)  # none after a demotion or an upgrade: no warning
        self.file = HashFile(path, INDEX_HEADER)
        self.al = ActivityLog(os.path.splitext(path)[0] + ".al")
        self.binding = b""  # the activity log's, in the header
        self._keep: set[int] | None = None  # extents the log keeps listing after the open
        self._held: list[set[int]] = []
        self.generation = ""
        self.digest_cache: bytes | None = None
        self.how = ""

    @property
    def hashes(self) -> memoryview:
        return self.file.hashes

    def _live(self) -> memoryview:
        """[0] the image's mtime_ns after our last write, [1] how many blocks are in flight
        (a fresh view each time: a resize remaps the file)."""
        return self.file.head[_LIVE:_INFLIGHT].cast("Q")

    def _inflight(self) -> memoryview:
        return self.file.head[_INFLIGHT:].cast("Q")

    @classmethod
    def open(cls, path: str, img_fd: int, geo: Geometry, binding: Binding, wal: StagingLog,
             created: bool) -> ReplicaIndex:
        ix = cls(path, img_fd)
        try:
            ix._open(geo, binding, wal, created)
        except BaseException:
            ix.close()
            raise
        return ix

    def _open(self, geo: Geometry, binding: Binding, wal: StagingLog, created: bool) -> None:
        self.generation = binding.generation
        started = time.monotonic()
        self._keep = None
        if created:
            self._invalidate()
            self._zero(geo)
        else:
            why = self._check(geo, binding, wal)
            if why:
                log.log(logging.WARNING if self.existed else logging.INFO,
                        "%s: %s: hashing the image again (%s)", self.path, why,
                        format_bytes(geo.size))
                self._invalidate()
                self.rebuild(geo, wal)
                self.how = "hashed from the image"
            log.info("%s: %s in %.3fs", self.path, self.how, time.monotonic() - started)
        if self._keep is None:  # rewritten here, or no log vouches for what the last process
            self.binding = new_binding()  # left unsynced: all of it, until a checkpoint
        self.al.start(self.binding, self._keep or (), everything=self._keep is None)
        self._mark_open(geo)
        self._live()[1] = 0
        self.note_written()

    def _check(self, geo: Geometry, binding: Binding, wal: StagingLog) -> str:
        """Why the array cannot be used as it is ("": it can, and is now right)."""
        h = _Header.unpack(os.pread(self.file.fd, _HFMT.size + _CHECK.size, 0))
        if h is None:
            return "its header is torn" if self.existed else "no saved index"
        if h.state not in (CLEAN, OPEN):
            return "an earlier hashing of the image did not finish"
        if (h.block_size, h.size, h.blocks, len(self.file)) != (
                geo.block_size, geo.size, geo.blocks, geo.blocks):
            return "it describes a replica of another size"
        if h.generation != binding.generation:
            return "it describes another generation of the replica"
        self.binding = h.binding
        if h.state == CLEAN:
            return self._check_clean(h, binding)
        return self._recover(h, geo, wal)

    def _check_clean(self, h: _Header, binding: Binding) -> str:
        if (h.counter, h.applied_seq, h.wal_seq) != (binding.counter, binding.applied_seq,
                                                     binding.wal_seq):
            return "the commit record or the redo journal moved since it was saved"
        if h.image != identity(os.fstat(self.img_fd)):
            return "the image was changed since it was saved (size, mtime or inode)"
        digest = self.file.digest()
        if digest != h.digest:
            return "checksum mismatch"
        self.digest_cache = digest
        self.how = "loaded (saved at a clean stop)"
        self._keep = set() if h.binding else None  # all of it was synced at the stop
        return ""

    def _recover(self, h: _Header, geo: Geometry, wal: StagingLog) -> str:
        """After a kill: the array as the process left it, the blocks in flight re-hashed.
        After a restart of the machine: the extents of the activity log re-hashed."""
        logged, why = self.al.load(h.binding)
        if not h.boot or h.boot != boot_id():
            return self._after_reboot(h, geo, wal, logged, why)
        mtime, count = self._live().tolist()[:2]
        if count != STAGED and count > MAX_INFLIGHT:
            return "its list of blocks in flight is unreadable"
        if count == 0 and os.fstat(self.img_fd).st_mtime_ns != mtime:
            return "the image was written by something else since it was last open"
        blocks = [] if count == STAGED else sorted(set(self._inflight()[:count].tolist()))
        self.refresh(geo, blocks, wal)
        self.overlay(wal, None)
        self.how = f"recovered after a crash ({len(blocks)} blocks in flight hashed again)"
        self._keep = logged  # the killed process's changes may not be durable yet
        return ""

    def _after_reboot(self, h: _Header, geo: Geometry, wal: StagingLog,
                      logged: set[int] | None, why: str) -> str:
        if logged is None:
            return (f"the machine restarted since it was last open and its activity log "
                    f"{self.al.path} cannot be used ({why})")
        if h.image[1] != os.fstat(self.img_fd).st_ino:
            return "the machine restarted since it was last open and the image was replaced"
        eb, disk = self.al.extent_blocks, Geometry(min(geo.size, os.fstat(
            self.img_fd).st_size), geo.block_size)
        spans = [(e * eb, min((e + 1) * eb, geo.blocks)) for e in sorted(logged)
                 if e * eb < geo.blocks]
        for first, last in spans:
            got = array("Q", hash_range(self.img_fd, disk, first, last - first))
            got.extend(zero_hash(geo.block_len(b)) for b in range(first + len(got), last))
            self.file.write(first, got)
        self.overlay(wal, None)
        done = sum(last - first for first, last in spans)
        self.how = (f"after a restart of the machine, {len(logged)} extents "
                    f"({format_bytes(done * geo.block_size)}) from the activity log re-hashed")
        self._keep = logged
        return ""

    def _invalidate(self) -> None:
        """Before the array is rewritten: whatever the header said no longer holds."""
        self._write_header(_Header(0, 0, 0, 0, ""))

    def _zero(self, geo: Geometry) -> None:
        self.file.resize(0)
        self.file.resize(geo.blocks, zero_hash(geo.block_size))
        if geo.blocks and geo.size % geo.block_size:
            self.file.write(geo.blocks - 1, [zero_hash(geo.size % geo.block_size)])
        self.digest_cache = None

    def rebuild(self, geo: Geometry, wal: StagingLog) -> None:
        """Every block hashed from the image (a hole is a zero block), staged batches over it."""
        self._zero(geo)
        end = min(geo.size, os.fstat(self.img_fd).st_size)
        step = 16384  # blocks per read (64 MiB of 4 KiB blocks)
        for start, stop in data_extents(self.img_fd, end):
            first, last = start // geo.block_size, -(-stop // geo.block_size)
            for at in range(first, last, step):
                n = min(step, last - at)
                self.file.write(at, hash_range(self.img_fd, Geometry(end, geo.block_size),
                                               at, n))
        self.overlay(wal, None)

    def refresh(self, geo: Geometry, blocks: Iterable[int], wal: StagingLog) -> None:
        """Hash ``blocks`` from the image again, their staged content laid over them."""
        wanted = sorted({b for b in blocks if b < geo.blocks})
        if not wanted:
            return
        end = min(geo.size, os.fstat(self.img_fd).st_size)
        with self.al.holding(self.al.extents_of(wanted)):
            for b in wanted:
                got = hash_range(self.img_fd, Geometry(end, geo.block_size), b, 1)
                self.hashes[b] = got[0] if got else zero_hash(geo.block_len(b))
            self.overlay(wal, set(wanted))

    def overlay(self, wal: StagingLog, only: set[int] | None) -> None:
        """Lay the staged batches' hashes over the array (``only``: these blocks)."""
        hashes = self.hashes
        for frame in wal.frames:
            batch = wal.read(frame)
            for i, h in zip(batch.indices, batch.hashes, strict=True):
                if i < len(hashes) and (only is None or i in only):
                    hashes[i] = h
        self.digest_cache = None

    def resize(self, geo: Geometry, old_size: int, wal: StagingLog,
               truncate: Callable[[], None]) -> None:
        """The replica is resized from ``old_size`` (``truncate`` cuts or extends the image,
        once the extents it changes are listed): new blocks are zeros; the old and new last
        blocks (maybe partial) are hashed again."""
        old_blocks = -(-old_size // geo.block_size)
        eb = self.al.extent_blocks
        changed = range(max(0, min(old_blocks, geo.blocks) - 1) // eb,
                        (max(old_blocks, geo.blocks, 1) - 1) // eb + 1)
        with self.al.holding(changed):  # the entries added (or cut), the last blocks
            truncate()
            self.file.resize(geo.blocks, zero_hash(geo.block_size))
            self.digest_cache = None
            self._mark_open(geo)
            self.refresh(geo, {old_blocks - 1, geo.blocks - 1} - {-1}, wal)
            self.note_written()

    # -- while open ------------------------------------------------------------------------

    def begin(self, blocks: list[int] | None, inflight: bool = True) -> None:
        """Blocks about to be written into the image (None: staged points, which the redo
        journal holds until they are recorded as applied), their extents pinned in the activity
        log until :meth:`done`; ``inflight``: listed in the header too (a direct write)."""
        if blocks is not None:
            self._release()  # left by a batch that failed (its writes, if any, were made)
            extents = self.al.extents_of(blocks)
            self.al.pin(extents)
            self._held.append(extents)
        if not inflight:
            return
        live = self._live()
        if blocks is None:
            live[1] = STAGED
            return
        n = min(len(blocks), MAX_INFLIGHT + 1)
        if n <= MAX_INFLIGHT:
            self._inflight()[:n] = array("Q", blocks)
        live[1] = n  # after the list: a kill between the two leaves the previous count (0)
        self.digest_cache = None

    def done(self, inflight: bool = True) -> None:
        """The writes begun are in the image (and the array)."""
        self._release()
        if inflight:
            live = self._live()
            live[0] = os.fstat(self.img_fd).st_mtime_ns
            live[1] = 0

    def _release(self) -> None:
        for extents in self._held:
            self.al.unpin(extents)
        self._held.clear()

    def store(self, blocks: list[int], hashes: list[int]) -> None:
        """Staged hashes into the array (their extents logged first)."""
        with self.al.holding(self.al.extents_of(blocks)):
            index = self.hashes
            for i, h in zip(blocks, hashes, strict=True):
                index[i] = h
        self.digest_cache = None

    def note_written(self) -> None:
        self._live()[0] = os.fstat(self.img_fd).st_mtime_ns

    def digest(self) -> bytes:
        if self.digest_cache is None:
            self.digest_cache = self.file.digest()
        return self.digest_cache

    def checkpoint(self, wal: StagingLog) -> None:
        """The redo journal, the image and the array synced, then the activity log lists only
        what changed since this began."""
        began = self.al.begin_checkpoint()
        if wal.frames:
            wal.sync()
        os.fdatasync(self.img_fd)
        # the array's stores go through a MAP_SHARED map: on Linux an fdatasync of the file
        # writes those pages (as msync would) without touching the map (a resize remaps it)
        os.fdatasync(self.file.fd)
        self.al.end_checkpoint(began)

    def _mark_open(self, geo: Geometry) -> None:
        self._write_header(_Header(OPEN, geo.block_size, geo.size, geo.blocks, self.generation,
                                   image=(0, os.fstat(self.img_fd).st_ino, 0, 0),
                                   boot=boot_id(), binding=self.binding))

    def _write_header(self, h: _Header) -> None:
        os.pwrite(self.file.fd, h.pack(), 0)
        os.fdatasync(self.file.fd)  # OPEN is durable before the first change

    def close_clean(self, geo: Geometry, binding: Binding, wal: StagingLog,
                    save: bool = True) -> None:
        """A clean stop: image and array synced, the activity log emptied, then the header
        that binds them (not if a write into the image did not finish: the next open hashes
        its blocks again). Not ``save``: a promotion, after which the image is the primary
        volume (a demotion removes the index): left OPEN, it is believed again on this boot
        only if the image's mtime has not moved, and after a restart of the machine not at
        all (the activity log says everything)."""
        if not save:
            self.al.invalidate()
        if not save or self._live()[1]:
            self.close()
            return
        if wal.frames:  # staged batches the header's wal_seq counts: durable first
            wal.sync()
        os.fdatasync(self.img_fd)
        self.file.flush()
        self.al.checkpoint(keep_hot=False)
        self._write_header(_Header(CLEAN, geo.block_size, geo.size, geo.blocks,
                                   binding.generation, binding.counter, binding.applied_seq,
                                   binding.wal_seq, identity(os.fstat(self.img_fd)), "",
                                   self.digest(), self.binding))
        self.close()

    def close(self) -> None:
        self.al.close()
        self.file.close()


def image_hashes(fd: int, geo: Geometry) -> array[int]:
    """The hashes of an image's blocks (as far as it goes), read with pread: nothing of the
    image stays mapped into the process."""
    disk = Geometry(min(os.fstat(fd).st_size, geo.size), geo.block_size)
    out = array("Q")
    for at in range(0, disk.blocks, 16384):
        out.extend(hash_range(fd, disk, at, 16384))
    return out


def data_extents(fd: int, end: int) -> Iterator[tuple[int, int]]:
    """[start, stop) byte ranges of ``fd`` below ``end`` that may hold data (the rest are
    holes, which read as zeros); the whole range where the file system cannot tell."""
    pos = 0
    while pos < end:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
            stop = os.lseek(fd, start, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole from pos on
                return
            yield pos, end
            return
        if start >= end:
            return
        yield start, min(stop, end)
        pos = stop
