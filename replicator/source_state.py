"""What a source agent remembers between runs, so a restart ships only what changed.

Per (volume path, target, volume name) the state directory holds:
  state.json   identity and progress: source_id, the replica generation, acked_seq, geometry,
               the checksum of seen.hashes, and how the agent stopped (below)
  view.hashes  per-block hashes of what the replica holds (host-order u64), memory-mapped and
               updated in place as batches are planned (blockindex.HashFile): after a kill -9
               it holds the view as the agent left it (the page cache outlives the process)
  seen.hashes  per-chunk hashes of the source content last fully planned
state.json and seen.hashes are written to temporary names and renamed, state.json last.

How the last agent stopped, in state.json: ``clean`` (a clean stop: the view was synced and
checksummed, ``view_xxh3``, and the volume's identity noted: device, inode, size, mtime, after
it was synced) or ``boot`` only (an agent of that boot of the machine was running: if it is
this boot, the view file is what that agent left). ``load`` checks it and says in ``how``:
"clean", "live" (a killed agent of this boot) or "" (the view's content is not known: a
listing is fetched). Whether the capture agent may then skip its whole-volume comparison is
decided in capture/resume.py. Otherwise the state is a cache, not a source of truth: at every
start it is checked against the replica (generation, applied sequence and a digest of the
whole hash index). A state that does not check out is set aside and rebuilt from the target's
hash listing: nothing is lost, only a listing is fetched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import uuid
from array import array
from dataclasses import dataclass, field
from typing import Any

import xxhash

from drctl.files import atomic_write
from replicator.blockindex import HashFile, boot_id, identity
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


Identity = tuple[int, int, int, int]  # blockindex.identity: device, inode, size, mtime_ns


@dataclass
class SourceState:
    source_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    generation: str = ""
    acked_seq: int = 0
    size: int = 0
    block_size: int = 0
    view: array[int] | memoryview = field(default_factory=lambda: array("Q"))
    seen: array[int] = field(default_factory=lambda: array("Q"))
    how: str = ""  # "clean", "live", "saved" (older format) or "" (see the docstring)
    why: str = ""  # why not "clean" or "live", for the log
    stopped: Identity | None = None  # the volume's identity at the clean stop
    started: Identity | None = None  # ... when the agent that was killed started (live)


class StateStore:
    def __init__(self, directory: str, volume_path: str = "") -> None:
        self.directory = directory
        self.volume_path = volume_path
        self.view_file: HashFile | None = None
        self.volume: Identity | None = None  # noted in state.json while running (``opened``)
        if volume_path:
            with contextlib.suppress(OSError):
                self.volume = identity(os.stat(volume_path))

    def _p(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def load(self) -> SourceState:
        """The saved state, or a fresh one (keeping the source_id if only the hashes are bad).
        Then state.json is marked as this boot's, durably, before the view file is written."""
        os.makedirs(self.directory, exist_ok=True)
        if self.view_file is None:
            self.view_file = HashFile(self._p("view.hashes"))
        st = self._load(self.view_file)
        if not st.how:
            self.view_file.resize(0)
        st.view = self.view_file.hashes
        self._write_meta(st, None, durable=True)
        return st

    def _load(self, view: HashFile) -> SourceState:
        meta_path = self._p("state.json")
        if not os.path.exists(meta_path):
            return SourceState(why="no saved state")
        try:
            with open(meta_path, encoding="utf-8") as fh:
                meta = json.load(fh)
            with open(self._p("seen.hashes"), "rb") as fh:
                seen_raw = fh.read()
            if xxhash.xxh3_64_hexdigest(seen_raw) != meta["seen_xxh3"]:
                raise StateError(f"{self._p('seen.hashes')}: checksum mismatch")
            st = SourceState(
                source_id=str(meta["source_id"]), generation=str(meta["generation"]),
                acked_seq=int(meta["acked_seq"]), size=int(meta["size"]),
                block_size=int(meta["block_size"]), seen=_from_bytes(seen_raw))
            st.how, st.why = _how(meta, view)
            if meta.get("clean"):
                st.stopped = _identity(meta["clean"]["volume"])
            elif meta.get("opened"):
                st.started = _identity(meta["opened"])
            return st
        except (OSError, ValueError, KeyError, TypeError, StateError) as exc:
            what = str(exc) if isinstance(exc, StateError) else f"{meta_path}: {exc!r}"
            log.warning("source state in %s is unusable (%s): rebuilding it from the target",
                        self.directory, what)
            try:
                os.replace(meta_path, meta_path + ".corrupt")
            except OSError:
                pass
            return SourceState(why=f"the saved state was unusable ({exc})")

    def set_view(self, values: array[int]) -> memoryview:
        """The view file now holds ``values``: its mapping (the state's ``view``)."""
        assert self.view_file is not None
        self.view_file.assign(values)
        return self.view_file.hashes

    def save(self, st: SourceState, clean: bool = False, volume_fd: int | None = None) -> None:
        """Save the state; ``clean``: the agent stops, nothing writes the view or the volume
        any more: the volume (``volume_fd``) and the view are synced, the view checksummed and
        the volume's identity noted, durably."""
        stopped = None
        if clean and self.volume_path:
            if volume_fd is not None:
                os.fsync(volume_fd)
            stopped = identity(os.stat(self.volume_path))
        os.makedirs(self.directory, exist_ok=True)
        view = self.view_file
        if view is None:
            view = self.view_file = HashFile(self._p("view.hashes"))
        if st.view is not view.hashes:  # a view made elsewhere (tests, a new state)
            view.assign(st.view)
            st.view = view.hashes
        seen_raw = _to_bytes(st.seen)  # once: the planner may change it meanwhile
        self._atomic("seen.hashes", seen_raw)
        self._write_meta(st, stopped, durable=stopped is not None, seen_raw=seen_raw)

    def _write_meta(self, st: SourceState, stopped: Identity | None, durable: bool,
                    seen_raw: bytes | None = None) -> None:
        assert self.view_file is not None
        seen = _to_bytes(st.seen) if seen_raw is None else seen_raw
        meta: dict[str, Any] = {
            "version": 2, "source_id": st.source_id, "generation": st.generation,
            "acked_seq": st.acked_seq, "size": st.size, "block_size": st.block_size,
            "seen_xxh3": xxhash.xxh3_64_hexdigest(seen), "boot": boot_id()}
        if stopped is not None:
            self.view_file.flush()
            meta["clean"] = {"volume": list(stopped), "view_xxh3": self.view_file.checksum()}
        elif self.volume is not None:
            meta["opened"] = list(self.volume)
        data = json.dumps(meta, indent=1).encode()
        if durable:
            atomic_write(self._p("state.json"), data)
        else:
            self._atomic("state.json", data)

    def close(self) -> None:
        if self.view_file is not None:
            self.view_file.close()
            self.view_file = None

    def _atomic(self, name: str, data: bytes) -> None:
        tmp = self._p(name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, self._p(name))


def _how(meta: dict[str, Any], view: HashFile) -> tuple[str, str]:
    """Whether the view file's content is known ("clean", "live", "saved": an older format,
    checksummed, not resumable; "") and why not "clean" or "live"."""
    clean = meta.get("clean")
    if clean:
        if view.checksum() != clean["view_xxh3"]:
            raise StateError(f"{view.path}: checksum mismatch")
        return "clean", ""
    if meta.get("version", 1) < 2:  # the view file was written whole, with its checksum
        if view.checksum() != meta["view_xxh3"]:
            raise StateError(f"{view.path}: checksum mismatch")
        return "saved", "the state was saved by an older version"
    if meta.get("boot") and meta["boot"] == boot_id():
        return "live", ""
    return "", "the agent did not stop cleanly and the machine restarted since"


def _identity(raw: list[int]) -> Identity:
    dev, ino, size, mtime = (int(x) for x in raw)
    return dev, ino, size, mtime
