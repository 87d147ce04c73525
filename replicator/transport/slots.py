"""The target's open replicas: one slot per volume, each with its own threads."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from replicator.demotion import is_primary
from replicator.errors import QuotaExceededError, VolumeBusyError, VolumeNotFoundError
from replicator.replica import Replica, check_volume_name

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    """What a target lets its clients create or change (``drctl replicate serve`` flags)."""

    max_volumes: int = 64  # replicas under --dir (a handshake creates one)
    max_volume_size: int = 1 << 40  # bytes; the hash index takes 8 bytes per block in memory
    max_clones: int = 4  # drill clones held at once, per volume
    allow_shrink: bool = False  # may a handshake cut off a replica's data?


class VolumeSlot:
    """A replica plus the single thread that touches its files and the stream ownership lock."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"vol-{replica.name}")
        # fdatasync runs on its own thread so that applying the next batches overlaps the flush
        self.syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sync-{replica.name}")
        self.stream_lock = asyncio.Lock()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.syncer, fn, *args)

    def close(self, keep_index: bool = True) -> None:
        self.executor.shutdown(wait=True)
        self.syncer.shutdown(wait=True)
        self.replica.close(keep_index)


class SlotRegistry:
    """Opens each replica once (on first use) and closes them all at shutdown."""

    def __init__(self, directory: str, mode: str, limits: Limits | None = None) -> None:
        self.directory = directory
        self.mode = mode
        self.limits = limits or Limits()
        self.slots: dict[str, VolumeSlot] = {}
        self._lock = asyncio.Lock()

    async def get(self, name: str, create: bool = False) -> tuple[VolumeSlot, bool]:
        """The slot of ``name`` and whether this call opened it. Only with ``create`` (a
        handshake) is a replica that does not exist made, within ``limits.max_volumes``."""
        check_volume_name(name)
        async with self._lock:
            slot = self.slots.get(name)
            if slot is not None:
                return slot, False
            if is_primary(self.directory, name):
                raise VolumeBusyError(f"volume_promoted: {name} is this site's primary volume "
                                      "(promoted); it is not served as a replica until the "
                                      "site is demoted")
            if not self.exists(name):
                if not create:
                    raise VolumeNotFoundError(f"no such replica: volume {name} has no replica "
                                              "on this target (a push creates it)")
                held = await asyncio.to_thread(self.count)
                if held >= self.limits.max_volumes:
                    raise QuotaExceededError(
                        f"quota_exceeded: this target holds {held} replicas, the most it "
                        f"creates (serve --max-volumes {self.limits.max_volumes}); volume "
                        f"{name} is not created")
            replica = await asyncio.to_thread(Replica, self.directory, name, self.mode)
            slot = self.slots[name] = VolumeSlot(replica)
            if replica.wal.frames:
                log.info("volume %s: %d staged batches in the redo journal", name,
                         len(replica.wal.frames))
            return slot, True

    async def release(self, name: str) -> None:
        """Close ``name``'s replica (a promotion: the site serves it as its primary volume)."""
        async with self._lock:
            slot = self.slots.pop(name, None)
        if slot is not None:
            # the image becomes the primary volume: its index will not describe it (a
            # demotion removes it), so the clean stop's sync and checksum are not paid here
            await asyncio.to_thread(slot.close, False)

    def exists(self, name: str) -> bool:
        return name in self.slots or os.path.exists(
            os.path.join(self.directory, f"{name}.meta"))

    def count(self) -> int:
        """Replicas under the directory (promoted ones included: their files are here)."""
        with os.scandir(self.directory) as entries:
            return sum(1 for e in entries if e.name.endswith(".meta"))

    def close(self) -> None:
        for slot in self.slots.values():
            slot.close()
        self.slots.clear()
