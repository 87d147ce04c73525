"""The old primary's side of re-protection: what it wrote that the other site never got.

When a site that was primary comes back as the replica, its capture agent's change journal
holds every write it acknowledged that the replica did not acknowledge (journaled records, the
change bitmap, an unfinished resync). Those blocks are overwritten by the resync from the new
primary; before that they are replayed into the volume (the journal is a redo log), copied
aside into a file the operator can recover them from, and reported. The journal's lineage
says which replica generation they are relative to; without it (a wiped disk, a lost journal)
the divergence is unknown and the resync compares both images.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field

from replicator.capture.journal import ChangeJournal
from replicator.capture.journal_records import BLOCK_MASK, KEY_SHIFT
from replicator.capture.lineage import Lineage
from replicator.demotion import Divergence

log = logging.getLogger(__name__)


@dataclass
class Unreplicated:
    """Per volume: the divergence to report to the target, and where the blocks were saved."""

    divergence: dict[str, Divergence] = field(default_factory=dict)
    blocks: int = 0
    saved_to: str = ""
    reason: str = ""  # why the divergence is unknown ("" when it is exact)


def collect(journal_path: str, volumes: list[tuple[str, str]], block_size: int,
            aside_dir: str) -> Unreplicated:
    """Replay the old primary's journal into ``volumes`` ((name, path) in journal order), set
    the unreplicated blocks aside under ``aside_dir`` and say what may differ."""
    out = Unreplicated()
    lineage = Lineage.load(os.path.dirname(journal_path))
    if not os.path.exists(journal_path):
        out.reason = ("the change journal is missing" if lineage.journal_started
                      else "this site never journaled the volumes")
        out.divergence = {n: Divergence("", []) for n, _ in volumes}
        return out
    fds = [os.open(p, os.O_RDWR | os.O_CLOEXEC) for _, p in volumes]
    try:
        journal = ChangeJournal(journal_path, block_size, fds, limit=1 << 62)
        try:
            keys = journal.dirty | journal.resyncing
        finally:
            journal.close()
        per_volume: dict[int, list[int]] = {}
        for k in keys:
            per_volume.setdefault(k >> KEY_SHIFT, []).append(k & BLOCK_MASK)
        out.blocks = len(keys)
        if keys:
            out.saved_to = _set_aside(aside_dir, volumes, fds, per_volume, block_size)
    finally:
        for fd in fds:
            os.close(fd)
    for i, (name, _path) in enumerate(volumes):
        base = lineage.synced.get(name, "")
        if not base:
            out.reason = "the change journal is not relative to a synced replica"
        out.divergence[name] = Divergence(base, sorted(per_volume.get(i, [])), out.saved_to)
    if out.reason:
        for d in out.divergence.values():
            d.base_generation = ""
    return out


def _set_aside(aside_dir: str, volumes: list[tuple[str, str]], fds: list[int],
               per_volume: dict[int, list[int]], block_size: int) -> str:
    """Copy the blocks into ``aside_dir/<time>/`` as sparse images of the volumes' size (the
    blocks at their own offsets) plus ``blocks.json``; fsynced. Returns the directory."""
    where = os.path.join(aside_dir, time.strftime("%Y%m%dT%H%M%S"))
    os.makedirs(where, exist_ok=True)
    listing: dict[str, list[int]] = {}
    for i, (name, _path) in enumerate(volumes):
        blocks = sorted(per_volume.get(i, []))
        if not blocks:
            continue
        listing[name] = blocks
        size = os.fstat(fds[i]).st_size
        fd = os.open(os.path.join(where, f"{name}.img"),
                     os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            for b in blocks:
                data = os.pread(fds[i], block_size, b * block_size)
                os.pwrite(fd, data, b * block_size)
            os.fsync(fd)
        finally:
            os.close(fd)
    with open(os.path.join(where, "blocks.json"), "w", encoding="utf-8") as fh:
        json.dump({"block_size": block_size, "blocks": listing,
                   "note": "blocks this site acknowledged to its clients whose replication "
                           "the other site never acknowledged (some may have arrived); each "
                           "<volume>.img holds them at their own offsets"}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    log.warning("%d blocks written here were never acknowledged by the replica: set aside in "
                "%s before the resync overwrites them", sum(len(b) for b in listing.values()),
                where)
    return where
