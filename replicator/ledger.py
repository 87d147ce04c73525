"""What a replica took under each sequence number, so that a resend is answered only if it is
the same batch.

A source resends the batches it holds no acknowledgement for: after a reconnect some of them
may already be on the target. The target used to take any batch under a sequence it had passed
for such a resend and drop it, so a client that got a batch in under the next number made the
real source's batch with that number vanish, acknowledged. Now every batch applied or staged
leaves a keyed digest here, by sequence, and a batch sent again under a sequence already taken
is answered only if its digest is the same (the target refuses anything else and logs it).

The digest is BLAKE2b-128 keyed with a secret of this replica, over every field of the batch but
the commit flag (a transport hint), the payload entering as its XXH3-128 seeded from the same
secret (about 45 us of CPU for a 2 MiB batch, 30 of them the payload). Nobody without the secret
can make a different batch match.

NAME.ledger: a header (magic, secret, the replica generation it belongs to, checksum), then one
32-byte record per sequence (seq, digest, check), appended as batches are taken. The file is
not synced: a killed daemon keeps it (the page cache survives the process), and after a power
loss the last records may be missing, so a resend of those batches is refused as unverifiable
(never taken for a match). Records past the replica's durable sequence are dropped at open
(those batches were never acknowledged and will come again, maybe different). Only the last
WINDOW sequences are kept. A ledger of another generation (a replica recreated or demoted)
starts empty. Not thread-safe: used on the volume's thread only.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import struct

import xxhash

from drctl.files import fsync_dir
from replicator.batch import Batch, _u64_bytes
from replicator.errors import VolumeError

WINDOW = 1 << 15  # sequences remembered (a source resends what it sent since its last ack)
DIGEST = 16
_MAGIC = b"DRCTLLG1"
_HEAD = struct.Struct("<8s32s36sQ")  # magic, secret, generation, xxh3-64 of the rest
_REC = struct.Struct("<Q16sQ")  # seq, digest, xxh3-64 of seq and digest
_FIELDS = struct.Struct("<QQIQIIQBIII")


class BatchLedger:
    def __init__(self, path: str, generation: str, durable_seq: int) -> None:
        self.path = path
        self.generation = generation
        self._ring = bytearray(WINDOW * DIGEST)
        self.first, self.last = 1, 0  # sequences held: first..last (empty when last < first)
        self._file_first = 0  # sequence of the first record in the file (0: none)
        self.secret = b""
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise VolumeError(f"cannot open {path}: {exc.strerror}") from exc
        if not self._load(durable_seq):
            self._reset()

    # -- the digest --------------------------------------------------------------------------

    def digest(self, batch: Batch) -> bytes:
        h = hashlib.blake2b(key=self.secret, digest_size=DIGEST)
        h.update(_FIELDS.pack(batch.seq, batch.epoch, batch.block_size, batch.volume_size,
                              int(batch.compression), batch.raw_length, batch.cp,
                              batch.staged, len(batch.indices), len(batch.copy_from),
                              len(batch.payload)))
        h.update(_u64_bytes(batch.indices))
        h.update(batch.kinds)
        h.update(_u64_bytes(batch.hashes))
        h.update(_u64_bytes(batch.copy_from))
        h.update(xxhash.xxh3_128_digest(batch.payload, seed=self._seed))
        return h.digest()

    # -- by sequence -----------------------------------------------------------------------

    def get(self, seq: int) -> bytes | None:
        """The digest of the batch taken under ``seq``; None if not (or no longer) known."""
        if not self.first <= seq <= self.last:
            return None
        at = (seq % WINDOW) * DIGEST
        return bytes(self._ring[at : at + DIGEST])

    def record(self, seq: int, digest: bytes) -> None:
        """``seq`` was taken (applied or staged) with this digest. A sequence at or below the
        last one replaces it and everything after (a batch that was never acknowledged, sent
        again by a source that planned anew); a gap starts the ledger over."""
        if seq <= self.last:
            self.forget_after(seq - 1)
        elif seq != self.last + 1:
            self._restart()
        if not self._file_first:
            self._file_first = seq
        rec = _REC.pack(seq, digest, 0)
        rec = rec[:-8] + struct.pack("<Q", xxhash.xxh3_64_intdigest(rec[:-8]))
        os.pwrite(self.fd, rec, self._offset(seq))
        self._put(seq, digest)
        if seq - self._file_first >= 2 * WINDOW:
            self._compact()

    def forget_after(self, seq: int) -> None:
        """Batches after ``seq`` were dropped (never acknowledged): forget their digests."""
        if seq >= self.last:
            return
        if seq < self.first:
            self.first, self.last = seq + 1, seq
        else:
            self.last = seq
        if self._file_first and seq >= self._file_first:
            os.ftruncate(self.fd, self._offset(seq + 1))
        else:
            os.ftruncate(self.fd, _HEAD.size)
            self._file_first = 0

    def rebind(self, generation: str) -> None:
        """The replica took a new generation: the digests still describe what it took."""
        self.generation = generation
        os.pwrite(self.fd, self._header(), 0)

    def close(self) -> None:
        os.close(self.fd)

    # -- internals -------------------------------------------------------------------------

    @property
    def _seed(self) -> int:
        return int.from_bytes(self.secret[:8], "little")

    def _offset(self, seq: int) -> int:
        return _HEAD.size + (seq - self._file_first) * _REC.size

    def _put(self, seq: int, digest: bytes) -> None:
        if self.last < self.first:
            self.first = seq
        at = (seq % WINDOW) * DIGEST
        self._ring[at : at + DIGEST] = digest
        self.last = seq
        self.first = max(self.first, seq - WINDOW + 1)

    def _header(self) -> bytes:
        body = _HEAD.pack(_MAGIC, self.secret, self.generation.encode()[:36].ljust(36, b"\0"),
                          0)[:-8]
        return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))

    def _load(self, durable_seq: int) -> bool:
        raw = memoryview(os.pread(self.fd, os.fstat(self.fd).st_size, 0))
        if len(raw) < _HEAD.size:
            return False
        magic, secret, generation, check = _HEAD.unpack_from(raw, 0)
        if (magic != _MAGIC or xxhash.xxh3_64_intdigest(raw[: _HEAD.size - 8]) != check
                or generation.rstrip(b"\0").decode(errors="replace") != self.generation):
            return False
        self.secret = secret
        pos = _HEAD.size
        while pos + _REC.size <= len(raw):
            seq, digest, check = _REC.unpack_from(raw, pos)
            if (xxhash.xxh3_64_intdigest(raw[pos : pos + _REC.size - 8]) != check
                    or seq > durable_seq or (self._file_first and seq != self.last + 1)):
                break
            if not self._file_first:
                self._file_first = seq
            self._put(seq, digest)
            pos += _REC.size
        if pos != len(raw):
            os.ftruncate(self.fd, pos)  # torn, or never acknowledged
        return True

    def _reset(self) -> None:
        self.secret = secrets.token_bytes(32)
        self.first, self.last, self._file_first = 1, 0, 0
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, self._header(), 0)

    def _restart(self) -> None:
        """Forget every sequence (the next one does not follow the last)."""
        self.first, self.last, self._file_first = 1, 0, 0
        os.ftruncate(self.fd, _HEAD.size)

    def _compact(self) -> None:
        """Keep only the records of the window (the file holds twice as many by now)."""
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            out = [self._header()]
            for seq in range(self.first, self.last + 1):
                rec = _REC.pack(seq, self.get(seq) or b"", 0)[:-8]
                out.append(rec + struct.pack("<Q", xxhash.xxh3_64_intdigest(rec)))
            os.write(fd, b"".join(out))
            os.fsync(fd)
            os.replace(tmp, self.path)
            fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        except BaseException:
            os.close(fd)
            raise
        os.close(self.fd)
        self.fd = fd
        self._file_first = self.first
