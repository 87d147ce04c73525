"""Benchmark: what a small record's fdatasync costs appended to a log file, against written
into space the file already has (drctl/files.py, "space written ahead").

Each mode writes ``--count`` records of ``--size`` bytes one at a time, each followed by an
fdatasync, into a new file in ``--dir`` (default: a directory under /var/tmp, on the disk the
journals use), and prints the latency of each write + sync (p50, p99, mean):

* append: an O_APPEND file that grows with every record (as both journals were written);
* written ahead: the file written with zeroes first (and synced), records written over them
  (what the journals do now while their syncs cover little);
* fallocate: space reserved with posix_fallocate (unwritten extents: each first write still
  changes the file's metadata), records written over it.

The modes alternate ``--rounds`` times; every run is printed.

Run: python bench/fsync_append.py [--count 2000] [--size 4117] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable


def _run(path: str, count: int, size: int, prepare: Callable[[str, int], int],
         append: bool) -> list[float]:
    fd = prepare(path, count * size)
    record = os.urandom(size)
    out = []
    try:
        for i in range(count):
            t = time.perf_counter()
            if append:
                os.write(fd, record)
            else:
                os.pwrite(fd, record, i * size)
            os.fdatasync(fd)
            out.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        os.unlink(path)
    return out


def _appending(path: str, _total: int) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)


def _written_ahead(path: str, total: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.write(fd, bytes(total))
    os.fsync(fd)
    return fd


def _fallocated(path: str, total: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.posix_fallocate(fd, 0, total)
    os.fsync(fd)
    return fd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--size", type=int, default=4096 + 21, help="bytes per record (a 4 KiB "
                    "write and its journal header)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    work = args.dir or tempfile.mkdtemp(prefix="fsync-append-", dir="/var/tmp")
    modes = [("append", _appending, True), ("written ahead", _written_ahead, False),
             ("fallocate", _fallocated, False)]
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {args.count} records of {args.size} "
          f"bytes, each followed by fdatasync, in {work}")
    try:
        for rnd in range(1, args.rounds + 1):
            for name, prepare, append in modes:
                lat = sorted(_run(os.path.join(work, "log"), args.count, args.size, prepare,
                                  append))
                n = len(lat)
                print(f"round {rnd} {name:13}: p50 {lat[n // 2] * 1e3:.3f} ms, p99 "
                      f"{lat[int(n * 0.99)] * 1e3:.3f} ms, mean {sum(lat) / n * 1e3:.3f} ms",
                      flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(work, True)


if __name__ == "__main__":
    main()
