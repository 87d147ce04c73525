"""`drctl replicate verify`: compare a volume with its replica block by block."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from replicator.blockmap import Geometry, MappedVolume, hash_all
from replicator.errors import VerificationError
from replicator.transport.client import TargetClient
from replicator.transport.security import ChannelSecurity


@dataclass(frozen=True)
class VerifyResult:
    volume: str
    source_size: int
    replica_size: int
    blocks: int
    mismatched: int
    first_mismatch: int | None


async def verify_replica(path: str, address: str, volume: str,
                         block_size: int = 4096,
                         security: ChannelSecurity | None = None,
                         connect_timeout: float | None = None) -> VerifyResult:
    """``connect_timeout``: give up (TargetUnavailableError) when the target is not reached
    within it (None: wait for it as long as the listing may take)."""
    client = TargetClient(address, security)
    try:
        if connect_timeout is not None:
            await client.connect(connect_timeout)
        with MappedVolume(path) as vol:
            geo = Geometry(vol.size, block_size)
            local_task = asyncio.create_task(asyncio.to_thread(hash_all, vol.view, geo))
            try:
                remote, rsize, _seq = await client.block_hashes(volume, from_disk=True)
            finally:
                local = await local_task
    finally:
        await client.close()
    mismatched = [i for i, (a, b) in enumerate(zip(local, remote, strict=False)) if a != b]
    extra = abs(len(local) - len(remote))  # blocks only one side has: they differ too
    result = VerifyResult(volume, geo.size, rsize, max(len(local), len(remote)),
                          len(mismatched) + extra,
                          mismatched[0] if mismatched else (min(len(local), len(remote))
                                                            if extra else None))
    if rsize != geo.size:
        raise VerificationError(
            f"volume {volume}: replica differs: it holds {rsize} bytes, the source {geo.size}"
            + (f" ({result.mismatched} of {result.blocks} blocks differ or are on one side "
               f"only, the first at block {result.first_mismatch})" if result.mismatched
               else ""))
    if result.mismatched:
        raise VerificationError(
            f"volume {volume}: replica differs: {result.mismatched} of {result.blocks} blocks "
            f"mismatch (first at block {result.first_mismatch})")
    return result
