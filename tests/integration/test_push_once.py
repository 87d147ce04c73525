"""`drctl replicate push --once` and `verify` against a real target daemon over loopback."""

from __future__ import annotations

import json
import os
import random

from tests.damage import flip_byte
from tests.procs import DRCTL, Target, metric, push_cmd, run, same_file, write_random

BS = 4096


def push_once(path: str, target: Target, state_dir: str, volume: str = "vol",
              *extra: str) -> dict[str, object]:
    p = run(push_cmd(path, target, volume, state_dir, "--once", "--json", *extra))
    assert p.returncode == 0, p.stderr
    report: dict[str, object] = json.loads(p.stdout.strip().splitlines()[-1])
    return report


def verify(path: str, target: Target, volume: str = "vol") -> int:
    return run([*DRCTL, "replicate", "verify", path, "--to", target.address,
                "--volume", volume, *target.client_flags()]).returncode


def test_initial_then_delta_ships_only_changed_blocks(workdir: str, target: Target,
                                                      state_dir: str) -> None:
    src = os.path.join(workdir, "src.img")
    write_random(src, 8 << 20)
    with open(src, "r+b") as fh:  # a zero region that must never be shipped
        fh.seek(2 << 20)
        fh.write(bytes(1 << 20))
    first = push_once(src, target, state_dir)
    assert first["verified"] is True
    assert first["data_blocks"] == (7 << 20) // BS
    assert first["zero_blocks"] == 0  # the new replica is already zero there
    assert same_file(src, target.image("vol"))

    rng = random.Random(5)
    changed = sorted(rng.sample(range((8 << 20) // BS), 37))
    with open(src, "r+b") as fh:
        for b in changed:
            fh.seek(b * BS)
            fh.write(rng.randbytes(BS))
    second = push_once(src, target, state_dir)
    assert second["changed_blocks"] == 37
    assert second["data_blocks"] == 37
    assert second["full_listing_fetched"] is False
    assert same_file(src, target.image("vol"))
    assert verify(src, target) == 0

    third = push_once(src, target, state_dir)  # nothing changed: nothing shipped
    assert third["changed_blocks"] == 0
    assert third["wire_bytes"] == 0


def test_zero_dedup_coalesce_and_compression(workdir: str, target: Target,
                                             state_dir: str) -> None:
    src = os.path.join(workdir, "src.img")
    write_random(src, 4 << 20, seed=2)
    push_once(src, target, state_dir)
    fd = os.open(src, os.O_RDWR)
    try:
        os.pwrite(fd, bytes(BS), 10 * BS)  # a block zeroed: ZERO record, no payload
        donor = os.pread(fd, BS, 100 * BS)
        os.pwrite(fd, donor, 200 * BS)  # content the replica holds at block 100: COPY
        for i in range(50):  # one block rewritten 50 times before it ships: sent once
            os.pwrite(fd, bytes([i]) * BS, 300 * BS)
        text = b"".join(b"row %06d: the quick brown fox\n" % i for i in range(3000))
        os.pwrite(fd, text[: 16 * BS], 400 * BS)  # compressible
    finally:
        os.close(fd)
    r = push_once(src, target, state_dir)
    assert r["zero_blocks"] == 1
    assert r["dedup_blocks"] == 1
    assert r["data_blocks"] == 1 + 16
    assert r["changed_blocks"] == 19
    assert r["raw_bytes"] == 17 * BS + 2 * BS
    assert int(r["payload_bytes"]) < 17 * BS // 2  # zstd on the text blocks
    assert same_file(src, target.image("vol"))
    samples = target.metrics()
    assert metric(samples, "drctl_replication_applied_bytes_total", volume="vol") > 0


def test_verify_detects_a_damaged_replica(workdir: str, target: Target, state_dir: str) -> None:
    src = os.path.join(workdir, "src.img")
    write_random(src, 2 << 20, seed=3)
    push_once(src, target, state_dir)
    assert verify(src, target) == 0
    flip_byte(target.image("vol"), 12345)
    p = run([*DRCTL, "replicate", "verify", src, "--to", target.address,
             "--volume", "vol", *target.client_flags()])
    assert p.returncode == 1
    assert "1 of 512 blocks mismatch" in p.stderr
    # a source of another size: the sizes first, and never more blocks differing than exist
    small = os.path.join(workdir, "small.img")
    with open(src, "rb") as fh, open(small, "wb") as out:
        out.write(fh.read(1 << 20))
    p = run([*DRCTL, "replicate", "verify", small, "--to", target.address,
             "--volume", "vol", *target.client_flags()])
    assert p.returncode == 1
    assert "replica differs: it holds 2097152 bytes, the source 1048576 (257 of 512 blocks " \
        "differ or are on one side only, the first at block 3)" in p.stderr, p.stderr


def test_lost_source_state_resyncs_from_listing_not_in_full(workdir: str, target: Target,
                                                            state_dir: str) -> None:
    src = os.path.join(workdir, "src.img")
    write_random(src, 4 << 20, seed=4)
    push_once(src, target, state_dir)
    with open(src, "r+b") as fh:
        fh.seek(5 * BS)
        fh.write(b"x" * BS)
    other_state = os.path.join(workdir, "elsewhere")
    r = push_once(src, target, other_state)
    assert r["full_listing_fetched"] is True
    assert r["changed_blocks"] == 1
    assert same_file(src, target.image("vol"))


def test_volume_grows_and_shrinks(workdir: str, target: Target, state_dir: str) -> None:
    src = os.path.join(workdir, "src.img")
    write_random(src, 1 << 20, seed=6)
    push_once(src, target, state_dir)
    with open(src, "ab") as fh:
        fh.write(os.urandom(3 * BS + 100))  # a short last block
    push_once(src, target, state_dir)
    assert same_file(src, target.image("vol"))
    os.truncate(src, 512 * 1024)
    # a shrink that would cut off the replica's data is refused, unless the target allows it
    p = run(push_cmd(src, target, "vol", state_dir, "--once"))
    assert p.returncode == 76 and "shrink_refused" in p.stderr, p.stderr
    target.stop()
    target.extra = (*target.extra, "--allow-shrink")
    target.start()
    push_once(src, target, state_dir)
    assert same_file(src, target.image("vol"))
    assert verify(src, target) == 0
