"""The C allocator's settings for drctl's processes (glibc's ``mallopt``).

The data path allocates and frees buffers of 64 KiB to a few MiB many times a second (gRPC
messages, batches, journal and redo-journal reads). With glibc's defaults a buffer that size is
often a fresh ``mmap`` (or heap memory just trimmed and given back), so every allocation pays
page faults and the kernel's zeroing of each page: about half of the target's system time per
MiB in ``perf`` (bench/nbd_peer.py, 1 MiB writes). Keeping such buffers in the heap removes
that: allocations up to 32 MiB come from the heap, whose free top is given back to the system
only past 16 MiB (2 MiB of slack kept when it grows), in at most 4 arenas (glibc's default is 8
per core, each keeping its own free top: 100 replicas on one target then held 559 MiB of RSS
after their creation, against 204 MiB with 4 and 173 MiB with glibc's defaults;
docs/performance.md).

Set once at start, before any thread. An operator's own settings win: nothing is changed if
any ``MALLOC_*`` environment variable is set, or ``GLIBC_TUNABLES`` names a ``glibc.malloc``
tunable; elsewhere than glibc nothing is done."""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

SETTINGS = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 16 << 20), (M_TOP_PAD, 2 << 20),
            (M_ARENA_MAX, 4))


def tune_malloc() -> bool:
    """Apply :data:`SETTINGS`; True if the allocator took them all."""
    if any(k.startswith("MALLOC_") for k in os.environ) or \
            "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in SETTINGS)
