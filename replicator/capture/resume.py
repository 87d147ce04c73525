"""Whether a capture agent that starts may skip its whole-volume comparison.

The journal holds every write a client was answered for that the target has not acknowledged;
``lineage.synced`` says which replica generation a verified resync went into. While both hold,
the volume differs from that replica only in the journal's blocks, and the view (the source's
per-block hashes of what the replica holds, source_state.py) is right except for those blocks,
whose batches may have been planned and never acknowledged. So after a start the first resync
may cover only the journal's blocks (their view entries forgotten first, so they ship again)
instead of reading the whole volume, if:

* the view file's content is known: saved at a clean stop (checksummed), left by an agent
  killed on this boot of the machine (the page cache outlived it), or, after a restart of the
  machine, known but for the extents of the activity log (activity.py), which lists every
  extent where the view or the volume may differ from what its last checkpoint made durable;
* the volume is the one the state describes: after a clean stop, the same device, inode, size
  and mtime as noted then (taken before the journal replays into it); after a kill, the same
  device, inode and size (a write to the volume outside the export while no agent ran leaves
  no other trace), and the same after a restart of the machine;
* the last verified resync went into the replica generation the state describes, and the
  target still has that generation, no acknowledged batch missing, and is no demoted primary
  (whose re-protect has rules of its own, shipper.py).

Otherwise the whole volumes are compared, and one line says why. After a restart of the
machine, the view entries of the logged extents are fetched from the replica (its index,
``BlockHashes`` with a range) and the first resync covers those blocks too: it compares them
with the volume and ships those that differ; the log keeps them until that resync is verified
(the checkpoints start then: capture/checkpoint.py). The digest check after the resync
(``PushDriver.verify``) catches a view that was wrong after all: the agent then starts over
with a whole-volume comparison.
"""

from __future__ import annotations

import asyncio
import logging
import os

from replicator.blockindex import identity
from replicator.capture.journal import ChangeJournal
from replicator.capture.journal_records import volume_blocks
from replicator.capture.lineage import Lineage
from replicator.driver import PushDriver
from replicator.errors import ProtocolError
from replicator.source_state import Identity
from replicator.units import format_bytes
from replicator.waiting import until_stopped

log = logging.getLogger(__name__)


def volumes_before_replay(drivers: list[PushDriver]) -> list[Identity | None]:
    """The volumes' identities before the journal replays into them (a replay writes them)."""
    out: list[Identity | None] = []
    for d in drivers:
        try:
            out.append(identity(os.stat(d.o.path)))
        except OSError:
            out.append(None)
    return out


def local_reason(d: PushDriver, lineage: Lineage, before: Identity | None) -> str:
    """Why this member's saved state cannot stand for its replica ("": it can, if the target
    agrees)."""
    st = d.state
    name = d.o.volume
    if st.how not in ("clean", "live", "crash"):
        return f"{name}: {st.why or 'no saved state'}"
    if not lineage.synced.get(name) or lineage.synced[name] != st.generation:
        return f"{name}: no verified resync into the replica the saved state describes"
    if before is None:
        return f"{name}: the volume cannot be examined"
    if st.how == "clean":
        if st.stopped != before:
            return (f"{name}: the volume changed while the agent was stopped (device, inode, "
                    "size or mtime differ from the clean stop's)")
    elif st.started is None or st.started[:3] != before[:3]:
        return (f"{name}: the volume is not the one the agent that ran last served (device, "
                "inode, size)")
    return ""


async def reconcile(drivers: list[PushDriver], lineage: Lineage, journal: ChangeJournal,
                    before: list[Identity | None], stop: asyncio.Event) -> bool | None:
    """Agree with the target on every member. True: resume (the first resync covers the
    journal's blocks only); False: compare the whole volumes; None: stopped meanwhile."""
    names = ", ".join(d.o.volume for d in drivers)
    why = next((r for r in (local_reason(d, lineage, b) for d, b in
                            zip(drivers, before, strict=True)) if r), "")
    kept: list[bool] = []

    async def agree(d: PushDriver, keep: bool) -> None:
        if keep and d.state.how in ("live", "crash"):
            d.state.seen = d.state.seen[:0]  # the chunk scan cache is not kept after a kill
        kept.append(await d.reconcile(keep_view=keep))

    for d in drivers:
        if not await until_stopped(agree(d, not why), stop):
            return None
    if not why and not all(kept):
        d = drivers[kept.index(False)]
        demoted = d.handshake_info is not None and d.handshake_info.demoted
        why = f"{d.o.volume}: " + ("the target is a demoted primary (re-protect)" if demoted
                                   else "the replica is not the one the saved state describes "
                                   "(generation, size, or an acknowledged batch missing)")
        for d, k in zip(drivers, kept, strict=True):
            # a view kept on our word: checked against the replica's digest instead
            if k and not await until_stopped(d.reconcile(), stop):
                return None
    if why:
        # expected on a first start and at a re-protect; otherwise a full read worth a warning
        expected = all(d.state.why == "no saved state" for d in drivers) or "demoted" in why
        log.log(logging.INFO if expected else logging.WARNING,
                "%s: not resumed from saved state, the whole volumes are compared: %s", names,
                why)
        return False
    for d in drivers:
        if d.state.logged and not await until_stopped(recheck(d), stop):
            return None
    keys = journal.dirty | journal.resyncing
    for i, d in enumerate(drivers):
        assert d.planner is not None
        d.planner.forget(volume_blocks(keys, i))  # planned maybe, acknowledged not: shipped
    how = {d.state.how for d in drivers}
    log.info("%s: resumed from saved state (%s): no whole-volume comparison; the %d blocks "
             "the target has not acknowledged are shipped first", names,
             "clean stop" if how == {"clean"} else "after a restart of the machine"
             if "crash" in how else "after the agent was killed", len(keys))
    return True


async def recheck(d: PushDriver) -> None:
    """After a restart of the machine: the view entries of the activity log's extents (or of
    those a stop came before comparing) taken from the replica's index, and those blocks
    compared with the volume by the first resync (``state.recheck``)."""
    st, planner, al = d.state, d.planner, d.store.al
    assert planner is not None and al is not None
    eb, blocks = al.extent_blocks, d.geo.blocks
    runs: list[list[int]] = []  # [first extent, last extent]
    for e in sorted(st.logged):
        if e * eb >= blocks:
            break
        if runs and runs[-1][1] == e - 1:
            runs[-1][1] = e
        else:
            runs.append([e, e])
    with planner.holding(r * eb for r in st.logged):
        for lo, hi in runs:
            first, count = lo * eb, min(blocks, (hi + 1) * eb) - lo * eb
            got, size, _seq = await d.client.block_hashes(d.o.volume, first_block=first,
                                                          count=count)
            if size != d.geo.size or len(got) != count:
                raise ProtocolError(f"replica listing of blocks {first}+{count} has "
                                    f"{len(got)} of a volume of {size} bytes, expected "
                                    f"{count} of {d.geo.size}")
            planner.view[first : first + count] = got
            st.recheck.update(range(first, first + count))
    log.info("%s: after a restart of the machine, %d extents (%s) from the activity log: the "
             "first resync compares their blocks with the replica's", d.o.volume,
             len(st.logged), format_bytes(len(st.recheck) * d.geo.block_size))
