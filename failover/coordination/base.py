"""The coordination store interface. Every method states what it guarantees.

Keys are strings, values bytes. Revisions are the store's global, monotonically increasing
counter (etcd's revision): every change gets a new one, and a key's ``mod_revision`` is the
revision of its last change (0 for an absent key). Implementations: ``etcd.EtcdStore`` (etcd v3
through aetcd) and ``memory.MemoryStore`` (a fake for fast unit tests). One conformance suite,
``tests/conformance/test_store.py``, runs against both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from enum import StrEnum


@dataclass(frozen=True)
class Entry:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int


@dataclass(frozen=True)
class Snapshot:
    """Every key under a prefix as of one revision."""

    revision: int
    entries: Mapping[str, Entry]

    def value(self, key: str) -> bytes | None:
        e = self.entries.get(key)
        return e.value if e is not None else None


class EventKind(StrEnum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True)
class WatchEvent:
    kind: EventKind
    key: str
    value: bytes
    revision: int


class Lease(ABC):
    id: int
    ttl: int

    @abstractmethod
    async def refresh(self) -> int:
        """Extend the lease to its full TTL. Returns the TTL granted; raises LeaseLostError if
        the lease no longer exists (it expired: every key attached to it is gone)."""

    @abstractmethod
    async def revoke(self) -> None:
        """End the lease now; keys attached to it are deleted atomically. Idempotent."""


class CoordinationStore(ABC):
    @abstractmethod
    async def snapshot(self, prefix: str) -> Snapshot:
        """One linearizable read of every key under ``prefix``, all at the same revision."""

    @abstractmethod
    async def put(self, key: str, value: bytes, lease: Lease | None = None) -> int:
        """Unconditional write. Returns the new revision."""

    @abstractmethod
    async def create(self, key: str, value: bytes, lease: Lease | None = None) -> bool:
        """Atomic create-if-absent (compare create_revision == 0). True if this call created
        the key; False if it already existed (nothing written)."""

    @abstractmethod
    async def compare_and_set(self, key: str, value: bytes, expected_mod_revision: int,
                              lease: Lease | None = None) -> bool:
        """Atomic: write only if the key's mod_revision still equals ``expected_mod_revision``
        (0 means: only if the key is absent). True if written."""

    @abstractmethod
    async def delete_if(self, key: str, expected_mod_revision: int) -> bool:
        """Atomic: delete only if the key's mod_revision equals the expected one."""

    @abstractmethod
    async def grant_lease(self, ttl: int) -> Lease:
        """A new lease of ``ttl`` seconds (the store's clock is the authority)."""

    @abstractmethod
    def watch(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        """Every change under ``prefix`` from ``start_revision`` (inclusive), in revision
        order, each exactly once. A broken connection is resumed from the last delivered
        revision + 1, invisibly to the caller. Raises CompactedError if ``start_revision`` is
        older than the store keeps."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections. Leases are not revoked (they expire on their own)."""

    @abstractmethod
    async def create_and_swap(self, key: str, value: bytes, head: str, head_value: bytes,
                              expected_head_revision: int) -> int:
        """Atomic, both or neither: create ``key`` (only if absent) and write ``head_value``
        to ``head`` (only if its mod_revision still equals ``expected_head_revision``; 0: only
        if absent). Returns the new revision (``head``'s mod_revision from now on), 0 if
        nothing was written. (The audit log's append: the next record and the head.)"""

    async def snapshot_without(self, prefix: str, skip: str) -> Snapshot:
        """``snapshot(prefix)`` without the keys under ``skip`` (a prefix inside ``prefix``):
        still one read at one revision. Readers of the cluster use it to leave the audit log
        out. This version reads everything and drops those keys; etcd skips them in the
        server."""
        snap = await self.snapshot(prefix)
        return Snapshot(snap.revision, {k: e for k, e in snap.entries.items()
                                        if not k.startswith(skip)})
