"""A replica's place in a failover: promoted (served as the site's primary volume, not as a
replica) and demoted (a former primary's volume taken back as a replica).

Files under the target directory, next to the replica's (see replica.py), per volume NAME:
  NAME.primary   present while the image is this site's primary volume (after a Fence with
                 ``release``): the target refuses to open it as a replica
  NAME.diverged  written when a former primary volume is demoted: the blocks written there
                 that the other site never received (from the old primary's change journal),
                 relative to the replica generation the other site promoted. Removed once the
                 first consistency point after the demotion is durable here (the resync that
                 overwrote them is complete).

Every file is written to a temporary name, fsynced and renamed.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass

from drctl.files import atomic_write
from replicator.errors import VolumeError

MARK_PRIMARY = ".primary"
DIVERGED = ".diverged"


def _path(directory: str, name: str, suffix: str) -> str:
    return os.path.join(directory, f"{name}{suffix}")


def is_primary(directory: str, name: str) -> bool:
    return os.path.exists(_path(directory, name, MARK_PRIMARY))


def mark_primary(directory: str, name: str, epoch: int, cp: int = 0) -> None:
    """From now on ``name`` is this site's primary volume: the target does not serve it.
    ``cp``: the consistency point it was promoted at (a group's members still to be promoted
    are settled at that same point)."""
    atomic_write(_path(directory, name, MARK_PRIMARY),
                  json.dumps({"epoch": epoch, "cp": cp}).encode())


def promoted_at(directory: str, name: str) -> int | None:
    """The consistency point ``name`` was promoted at (None: not promoted)."""
    try:
        with open(_path(directory, name, MARK_PRIMARY), encoding="utf-8") as fh:
            return int(json.load(fh).get("cp", 0))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


@dataclass
class Divergence:
    """Blocks a demoted volume may hold that the promoted replica (``base_generation``) did
    not; ``base_generation`` empty: unknown (journal lost), compare the whole volumes."""

    base_generation: str
    blocks: list[int]
    saved_to: str = ""  # where their content was set aside before being overwritten

    @property
    def exact(self) -> bool:
        return bool(self.base_generation)


def load_divergence(directory: str, name: str) -> Divergence | None:
    path = _path(directory, name, DIVERGED)
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
        return Divergence(str(doc["base_generation"]), [int(b) for b in doc["blocks"]],
                          str(doc.get("saved_to", "")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        # An unreadable record must not pass for "nothing diverged": compare everything.
        return Divergence("", [], f"unreadable {path}: {exc}")


def clear_divergence(directory: str, name: str) -> None:
    try:
        os.unlink(_path(directory, name, DIVERGED))
    except FileNotFoundError:
        pass


def demote(directory: str, name: str, block_size: int, epoch: int,
           divergence: Divergence) -> str:
    """Take the image ``directory/NAME.img`` (the site's primary volume until now) back as a
    replica: a new generation (sources re-plan against its real content), no staged batches
    (any left from before the promotion are older than the image), the divergence record,
    and the primary mark removed. Returns the new generation."""
    from replicator.replica import CommitRecord, check_volume_name

    check_volume_name(name)
    img = _path(directory, name, ".img")
    try:
        size = os.stat(img).st_size
    except OSError as exc:
        raise VolumeError(f"cannot demote {img}: {exc.strerror}") from exc
    atomic_write(_path(directory, name, DIVERGED), json.dumps({
        "base_generation": divergence.base_generation, "blocks": sorted(divergence.blocks),
        "saved_to": divergence.saved_to}).encode())
    for stale in (".wal", ".meta", ".index", ".al"):
        try:
            os.unlink(_path(directory, name, stale))
        except FileNotFoundError:
            pass
    generation = str(uuid.uuid4())
    record = CommitRecord(0, epoch, size, block_size, generation, 1)
    atomic_write(_path(directory, name, ".meta"), record.pack() * 2)
    try:
        os.unlink(_path(directory, name, MARK_PRIMARY))
    except FileNotFoundError:
        pass
    return generation
