"""What a source agent remembers between runs, so a restart ships only what changed.

Per (volume path, target, volume name) the state directory holds:
  state.json   identity and progress: source_id, the replica generation, acked_seq, geometry,
               the checksum of seen.hashes, and how the agent stopped (below)
  view.hashes  per-block hashes of what the replica holds (host-order u64), memory-mapped and
               updated in place as batches are planned (blockindex.HashFile): after a kill -9
               it holds the view as the agent left it (the page cache outlives the process)
  seen.hashes  per-chunk hashes of the source content last fully planned
  activity.log with write capture: the extents where the volume or the view may differ from
               what the last checkpoint made durable (activity.py), bound to state.json by a
               random binding (``al``); the capture agent checkpoints it (capture/checkpoint.py)
state.json and seen.hashes are written to temporary names and renamed, state.json last.

How the last agent stopped, in state.json: ``clean`` (a clean stop: the view was synced and
checksummed, ``view_xxh3``, and the volume's identity noted: device, inode, size, mtime, after
it was synced) or ``boot`` only (an agent of that boot of the machine was running: if it is
this boot, the view file is what that agent left). ``load`` checks it and says in ``how``:
"clean", "live" (a killed agent of this boot), "crash" (the machine restarted, but the
activity log says which extents of the view and the volume may have changed since its last
checkpoint: ``logged``) or "" (the view's content is not known: a listing is fetched).
Whether the capture agent may then skip its whole-volume comparison is decided in
capture/resume.py. Otherwise the state is a cache, not a source of truth: at every
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
from replicator.activity import ActivityLog, new_binding
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
    how: str = ""  # "clean", "live", "crash", "saved" (older format) or "" (the docstring)
    why: str = ""  # why not "clean", "live" or "crash", for the log
    stopped: Identity | None = None  # the volume's identity at the clean stop
    started: Identity | None = None  # ... when the agent that was killed started (live)
    # extents to compare with the replica (an activity log's after a restart of the machine),
    # kept in state.json until a resync compared them (``recheck``: their blocks, resume.py)
    logged: set[int] = field(default_factory=set)
    recheck: set[int] = field(default_factory=set)

    def rechecked(self) -> None:
        """A verified resync compared them."""
        self.logged, self.recheck = set(), set()


_REBOOTED = "the agent did not stop cleanly and the machine restarted since"


class StateStore:
    def __init__(self, directory: str, volume_path: str = "", activity: bool = False) -> None:
        self.directory = directory
        self.volume_path = volume_path
        self.view_file: HashFile | None = None
        self.activity = activity  # keep an activity log (write capture)
        self.al: ActivityLog | None = None
        self.binding = b""  # the activity log's, in state.json
        self.volume: Identity | None = None  # noted in state.json while running (``opened``)
        self._seen_saved = False
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
        if self.activity:
            self._start_log(st)
        if not st.how:
            self.view_file.resize(0)
        st.view = self.view_file.hashes
        seen_raw = _to_bytes(st.seen)
        if not self._seen_saved:  # a fresh state: the file state.json will name must match it
            atomic_write(self._p("seen.hashes"), seen_raw)
        self._write_meta(st, None, durable=True, seen_raw=seen_raw)
        return st

    def _start_log(self, st: SourceState) -> None:
        """After a restart of the machine a usable activity log makes the view "crash" (known
        but for its extents). The log keeps what it lists (what the last agent may have left
        unsynced) until the next checkpoint; without a usable one, a new binding, and it says
        everything until then."""
        if self.al is None:
            self.al = ActivityLog(self._p("activity.log"))
        logged, why = self.al.load(self.binding)
        if st.why == _REBOOTED:
            if logged is None:
                st.why = (f"the agent did not stop cleanly, the machine restarted since and "
                          f"its activity log {self.al.path} cannot be used ({why})")
            else:
                st.how, st.why = "crash", ""
                st.logged |= logged
        if logged is None or st.how not in ("clean", "live", "crash"):
            self.binding = new_binding()
            self.al.start(self.binding, everything=True)
        else:
            self.al.start(self.binding, logged)

    def _load(self, view: HashFile) -> SourceState:
        meta_path = self._p("state.json")
        self._seen_saved = False  # does seen.hashes hold what the returned state's seen is?
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
            self.binding = bytes.fromhex(str(meta.get("al", "")))
            st.logged = {int(e) for e in meta.get("recheck", [])}
            st.how, st.why = _how(meta, view)
            if meta.get("clean"):
                st.stopped = _identity(meta["clean"]["volume"])
            elif meta.get("opened"):
                st.started = _identity(meta["opened"])
            self._seen_saved = True
            return st
        except (OSError, ValueError, KeyError, TypeError, StateError) as exc:
            if isinstance(exc, StateError):
                what = str(exc)
            elif isinstance(exc, OSError):
                what = f"{exc.filename or meta_path}: {exc.strerror or exc}"
            else:
                what = f"{meta_path}: {exc!r}"
            log.warning("source state in %s is unusable (%s): rebuilding it from the target",
                        self.directory, what)
            try:
                os.replace(meta_path, meta_path + ".corrupt")
            except OSError:
                pass
            return SourceState(why=f"the saved state was unusable ({exc})")

    def set_view(self, values: array[int]) -> memoryview:
        """The view file now holds ``values``: its mapping (the state's ``view``). The
        activity log says everything until its next checkpoint."""
        assert self.view_file is not None
        with self.al.rewriting() if self.al is not None else contextlib.nullcontext():
            self.view_file.assign(values)
        return self.view_file.hashes

    def sync_view(self) -> None:
        """Make the view's stores durable (a checkpoint's thread, while the planner stores:
        on Linux an fdatasync of a MAP_SHARED file writes the mapped pages too, as msync
        would, without touching the map, which a ``set_view`` may be replacing)."""
        assert self.view_file is not None
        os.fdatasync(self.view_file.fd)

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
            with self.al.rewriting() if self.al is not None else contextlib.nullcontext():
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
            "seen_xxh3": xxhash.xxh3_64_hexdigest(seen), "boot": boot_id(),
            "al": self.binding.hex(), "recheck": sorted(st.logged)}
        if stopped is not None:
            self.view_file.flush()
            if self.al is not None:  # the volume and the view are synced, nothing writes
                self.al.checkpoint(keep_hot=False)
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
        if self.al is not None:
            self.al.close()

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
    return "", _REBOOTED


def _identity(raw: list[int]) -> Identity:
    dev, ino, size, mtime = (int(x) for x in raw)
    return dev, ino, size, mtime
