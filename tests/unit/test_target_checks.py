"""What the target checks before it takes anything: names, batch sizes and enums, compressed
payloads, resends (the ledger), resizes, clone quotas."""

from __future__ import annotations

import os

import pytest
import zstandard

from replicator.batch import MAX_BATCH_RAW, MAX_BATCH_RECORDS, Batch, Compression, Decoder, Kind
from replicator.blockmap import block_hash
from replicator.errors import CorruptBatchError, ProtocolError, QuotaExceededError
from replicator.ledger import WINDOW, BatchLedger
from replicator.replica import Replica, check_volume_name

BS = 4096


def data_batch(seq: int, blocks: dict[int, bytes], size: int) -> Batch:
    idx = sorted(blocks)
    return Batch(volume="v", epoch=0, seq=seq, block_size=BS, volume_size=size, indices=idx,
                 kinds=bytes([Kind.DATA]) * len(idx), hashes=[block_hash(blocks[i]) for i in idx],
                 copy_from=[], compression=Compression.NONE, raw_length=BS * len(idx),
                 payload=b"".join(blocks[i] for i in idx)).seal()


def zstd_batch(seq: int, blocks: int, frame: bytes, raw_length: int, size: int) -> Batch:
    """``blocks`` DATA records whose payload is ``frame`` (whatever it decompresses to)."""
    idx = list(range(blocks))
    return Batch(volume="v", epoch=0, seq=seq, block_size=BS, volume_size=size, indices=idx,
                 kinds=bytes([Kind.DATA]) * blocks, hashes=[0] * blocks, copy_from=[],
                 compression=Compression.ZSTD, raw_length=raw_length, payload=frame).seal()


def bomb(raw: int, declare: bool) -> bytes:
    """A small zstd frame of ``raw`` zero bytes, declaring its size in the header or not."""
    cobj = zstandard.ZstdCompressor(level=1, write_content_size=declare).compressobj(
        size=raw if declare else -1)
    chunk = bytes(1 << 20)
    out = [cobj.compress(chunk) for _ in range(raw // len(chunk))]
    out.append(cobj.flush())
    return b"".join(out)


def test_volume_names_are_matched_whole() -> None:
    assert check_volume_name("db-1.data_x") == "db-1.data_x"
    for bad in ("vol\n", "vol\nx", "\nvol", "../x", "", ".x", "a" * 129, "a/b", "vol "):
        with pytest.raises(ProtocolError):
            check_volume_name(bad)


def test_decoder_refuses_unknown_compression_and_oversized_batches() -> None:
    dec = Decoder()
    b = data_batch(1, {1: os.urandom(BS)}, 4 * BS)
    b.compression = None  # type: ignore[assignment]  # what the wire makes of an unknown value
    with pytest.raises(CorruptBatchError, match="unknown compression") as info:
        dec.open(b)
    assert info.value.reason == "malformed"
    lying = data_batch(1, {1: os.urandom(BS)}, 4 * BS)
    lying.raw_length = 1 << 30
    lying.seal()
    with pytest.raises(CorruptBatchError, match="raw_length"):
        dec.open(lying)
    n = MAX_BATCH_RECORDS + 1
    many = Batch("v", 0, 1, BS, n * BS, list(range(n)), bytes([Kind.ZERO]) * n,
                 [block_hash(bytes(BS))] * n, [], Compression.NONE, 0, b"").seal()
    with pytest.raises(CorruptBatchError, match="records"):
        dec.open(many)


def test_a_small_payload_claiming_a_huge_size_is_refused_before_decompressing() -> None:
    dec = Decoder()
    size = 1024 * BS
    declared = bomb(64 << 20, declare=True)  # says 64 MiB in its header
    assert len(declared) < 64 << 10
    # raw_length honest about the frame, but more than the records hold
    with pytest.raises(CorruptBatchError, match="raw_length"):
        dec.open(zstd_batch(1, 1, declared, 64 << 20, size))
    # raw_length matching the records, the frame declaring more
    with pytest.raises(CorruptBatchError, match="declares") as info:
        dec.open(zstd_batch(1, 16, declared, 16 * BS, size))
    assert info.value.reason == "decompress"
    # no size in the header: the decompressor stops at raw_length
    undeclared = bomb(64 << 20, declare=False)
    with pytest.raises(CorruptBatchError) as info:
        dec.open(zstd_batch(1, 16, undeclared, 16 * BS, size))
    assert info.value.reason == "decompress"
    # a batch that may never be larger than MAX_BATCH_RAW, whatever its block size
    big_bs = 1 << 20
    n = MAX_BATCH_RAW // big_bs + 1
    over = Batch("v", 0, 1, big_bs, n * big_bs, list(range(n)), bytes([Kind.DATA]) * n,
                 [0] * n, [], Compression.ZSTD, n * big_bs, bomb(n * big_bs, True)).seal()
    with pytest.raises(CorruptBatchError, match="at most"):
        dec.open(over)


def test_ledger_persists_forgets_and_belongs_to_one_generation(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "v.ledger")
    led = BatchLedger(path, "gen-1", 0)
    batches = [data_batch(s, {s % 4: os.urandom(BS)}, 4 * BS) for s in range(1, 6)]
    for b in batches:
        led.record(b.seq, led.digest(b))
    assert led.get(3) == led.digest(batches[2])
    assert led.get(0) is None and led.get(6) is None
    other = data_batch(3, {3: os.urandom(BS)}, 4 * BS)
    assert led.digest(other) != led.digest(batches[2])
    led.close()
    # reopened: records past the durable sequence were never acknowledged and are dropped
    led = BatchLedger(path, "gen-1", 4)
    assert (led.first, led.last) == (1, 4)
    assert led.get(4) == led.digest(batches[3])
    led.forget_after(2)
    assert led.get(3) is None and led.get(2) == led.digest(batches[1])
    led.record(3, led.digest(other))
    led.close()
    led = BatchLedger(path, "gen-1", 10)
    assert led.last == 3 and led.get(3) == led.digest(other)
    led.close()
    # another generation (recreated, demoted): a new secret, nothing known
    led = BatchLedger(path, "gen-2", 10)
    assert led.get(1) is None and led.last < led.first
    led.close()


def test_ledger_keeps_a_window_and_compacts_its_file(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "v.ledger")
    led = BatchLedger(path, "g", 0)
    digest = bytes(range(16))
    last = 2 * WINDOW + 10
    for seq in range(1, last + 1):
        led.record(seq, digest)
    assert led.get(last - WINDOW + 1) == digest and led.get(last - WINDOW) is None
    assert os.path.getsize(path) < 2 * WINDOW * 32 + 4096
    led.close()
    led = BatchLedger(path, "g", last)
    assert (led.first, led.last) == (last - WINDOW + 1, last)
    led.record(last + 5, digest)  # a gap: start over
    assert led.first == led.last == last + 5
    led.close()


def test_replica_answers_a_resend_only_for_the_batch_it_took(tmp_path: object) -> None:
    d = str(tmp_path)
    r = Replica(d, "v")
    r.prepare(8 * BS, BS)
    taken = data_batch(1, {2: b"a" * BS}, 8 * BS)
    r.apply(taken)
    r.commit(1)
    forged = data_batch(1, {2: b"b" * BS}, 8 * BS)
    assert r.same_as_taken(taken) is True
    assert r.same_as_taken(forged) is False
    assert r.same_as_taken(data_batch(7, {2: b"a" * BS}, 8 * BS)) is None
    r.close()
    r = Replica(d, "v")  # a restarted target remembers
    assert r.same_as_taken(taken) is True and r.same_as_taken(forged) is False
    r.close()


def test_staged_batches_missing_from_the_ledger_are_recovered_from_the_journal(
        tmp_path: object) -> None:
    d = str(tmp_path)
    r = Replica(d, "v", mode="warm")
    r.prepare(8 * BS, BS)
    staged = data_batch(1, {1: b"s" * BS}, 8 * BS)
    r.stage(staged)
    r.commit(1)
    r.close()
    os.truncate(os.path.join(d, "v.ledger"), 100)  # as if a power loss ate the records
    r = Replica(d, "v", mode="warm")
    assert r.same_as_taken(staged) is True
    r.close()


def test_only_a_handshake_resizes_and_a_shrink_keeps_data(tmp_path: object) -> None:
    d = str(tmp_path)
    r = Replica(d, "v")
    r.prepare(16 * BS, BS)
    r.apply(data_batch(1, {10: os.urandom(BS)}, 16 * BS))
    r.commit(1)
    empty = Batch("v", 0, 2, BS, 0, [], b"", [], [], Compression.NONE, 0, b"").seal()
    with pytest.raises(CorruptBatchError) as info:
        r.apply(empty)
    assert info.value.reason == "geometry"
    assert os.path.getsize(r.img_path) == 16 * BS and r.record.size == 16 * BS
    with pytest.raises(ProtocolError, match=r"shrink_refused.*block 10"):
        r.prepare(0, BS)
    with pytest.raises(ProtocolError, match="shrink_refused"):
        r.prepare(10 * BS + 1, BS)  # cuts part of block 10
    assert r.prepare(12 * BS, BS) == 16 * BS  # only zeros cut off
    assert r.prepare(20 * BS, BS) == 12 * BS  # grows
    assert r.prepare(4 * BS, BS, allow_shrink=True) == 20 * BS
    assert os.path.getsize(r.img_path) == 4 * BS
    r.close()


def test_clones_have_a_quota(tmp_path: object) -> None:
    d = str(tmp_path)
    r = Replica(d, "v")
    r.prepare(4 * BS, BS)
    for k in range(2):
        r.clone(f"c{k}", limit=2)
    with pytest.raises(QuotaExceededError, match="max-clones 2"):
        r.clone("c2", limit=2)
    r.drop_clone("c0")
    r.clone("c2", limit=2)
    with pytest.raises(ProtocolError):
        r.clone("x\n", limit=2)
    r.close()
