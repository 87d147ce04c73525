"""What a source agent remembers between runs, so a restart ships only what changed.

Per (volume path, target, volume name) the state directory holds:
  state.json   identity and progress: source_id, the replica generation, acked_seq, geometry,
               and checksums of the two hash files
  view.hashes  per-block hashes of what the replica holds (little-endian u64)
  seen.hashes  per-chunk hashes of the source content last fully planned
All three are written to temporary names and renamed, state.json last. The state is a cache,
not a source of truth: at every start it is checked against the replica (generation, applied
sequence and a digest of the whole hash index), so it is not fsynced. A state that does not
check out, torn by a crash or stale, is set aside and rebuilt from the target's hash listing:
nothing is lost, only a listing is fetched.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from array import array
from dataclasses import asdict, dataclass, field

import xxhash

from replicator.errors import StateError

log = logging.getLogger(__name__)


def default_state_root() -> str:
    root = os.environ.get("DRCTL_STATE_DIR")
    if root:
        return root
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "drctl")


def state_dir_for(root: str, path: str, address: str, volume: str) -> str:
    key = xxhash.xxh3_64_hexdigest(f"{os.path.abspath(path)}\0{address}\0{volume}".encode())
    return os.path.join(root, "push", f"{volume}-{key}")


def group_journal_path(root: str, group: str, address: str,
                       members: list[tuple[str, str]]) -> str:
    """The change journal of a consistency group (``members``: (volume, path) in order)."""
    key = xxhash.xxh3_64_hexdigest("\0".join([group, address, *(
        f"{n}={os.path.abspath(p)}" for n, p in members)]).encode())
    return os.path.join(root, "push", f"group-{group}-{key}", "journal")


def _to_bytes(arr: array[int]) -> bytes:
    if sys.byteorder == "big":
        arr = array("Q", arr)
        arr.byteswap()
    return arr.tobytes()


def _from_bytes(raw: bytes) -> array[int]:
    arr = array("Q")
    arr.frombytes(raw)
    if sys.byteorder == "big":
        arr.byteswap()
    return arr


@dataclass
class SourceState:
    source_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    generation: str = ""
    acked_seq: int = 0
    size: int = 0
    block_size: int = 0
    view: array[int] = field(default_factory=lambda: array("Q"))
    seen: array[int] = field(default_factory=lambda: array("Q"))


class StateStore:
    def __init__(self, directory: str) -> None:
        self.directory = directory

    def _p(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def load(self) -> SourceState:
        """The saved state, or a fresh one (keeping the source_id if only the hashes are bad)."""
        meta_path = self._p("state.json")
        if not os.path.exists(meta_path):
            return SourceState()
        try:
            with open(meta_path, encoding="utf-8") as fh:
                meta = json.load(fh)
            with open(self._p("view.hashes"), "rb") as fh:
                view_raw = fh.read()
            with open(self._p("seen.hashes"), "rb") as fh:
                seen_raw = fh.read()
            if (xxhash.xxh3_64_hexdigest(view_raw) != meta["view_xxh3"]
                    or xxhash.xxh3_64_hexdigest(seen_raw) != meta["seen_xxh3"]):
                raise StateError("hash files do not match state.json")
            return SourceState(
                source_id=str(meta["source_id"]), generation=str(meta["generation"]),
                acked_seq=int(meta["acked_seq"]), size=int(meta["size"]),
                block_size=int(meta["block_size"]),
                view=_from_bytes(view_raw), seen=_from_bytes(seen_raw),
            )
        except (OSError, ValueError, KeyError, TypeError, StateError) as exc:
            log.warning("source state in %s is unusable (%s): rebuilding it from the target",
                        self.directory, exc)
            source_id = uuid.uuid4().hex
            try:
                os.replace(meta_path, meta_path + ".corrupt")
            except OSError:
                pass
            return SourceState(source_id=source_id)

    def save(self, st: SourceState) -> None:
        os.makedirs(self.directory, exist_ok=True)
        view_raw, seen_raw = _to_bytes(st.view), _to_bytes(st.seen)
        self._atomic("view.hashes", view_raw)
        self._atomic("seen.hashes", seen_raw)
        meta = {k: v for k, v in asdict(st).items() if k not in ("view", "seen")}
        meta["view_xxh3"] = xxhash.xxh3_64_hexdigest(view_raw)
        meta["seen_xxh3"] = xxhash.xxh3_64_hexdigest(seen_raw)
        self._atomic("state.json", json.dumps(meta, indent=1).encode())

    def _atomic(self, name: str, data: bytes) -> None:
        tmp = self._p(name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, self._p(name))
