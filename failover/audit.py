"""The audit log: who did what to which service, with what outcome, hash-chained.

Every operation appends one record (CLI requests, API requests including refused ones,
controller decisions, agent role changes, certificates issued)::

  {"seq": 7, "time": "2025-05-01T12:00:00.123Z", "actor": "alice", "action": "api.failover",
   "target": "app", "params": {...}, "outcome": "202 queued (operation 1a2b3c4d5e6f)",
   "prev_hash": "<hash of record 6>", "hash": "<sha256 of this record without its hash>"}

Records live in etcd under ``/drctl/<cluster>/audit/<seq, 12 digits>``; ``audit/head`` holds
the last record's seq and hash. An append is one transaction (``create_and_swap``): create the
next record's key, only if absent, and move the head, only if nobody moved it since we read
it; on a conflict the appender reads the head again and retries. So the chain has one order
and no gaps, whoever appends.

Each appender also mirrors the chain into a local JSON-lines file: every record up to its own
(the ones others appended meanwhile are read from etcd), so the file is a copy of the chain's
beginning that `drctl audit verify --file` checks alone or against etcd. The path: a flag
(``--audit-file``), ``$DRCTL_AUDIT_FILE``, or ``$XDG_STATE_HOME/drctl/audit/<cluster>-<first 12
hex of record 1's hash>.jsonl`` (so a new chain, a new etcd, never lands in an old file);
``none`` turns the mirror off. Processes on one host share the file (an flock per write).

Secrets never reach a record: a parameter whose key names a token, password, secret, TSIG key,
private key, credential, cookie or authorization header is replaced by ``[redacted]``.

``verify()`` recomputes every hash, checks every prev_hash, that the seqs run from 1 without a
gap and each record sits where its seq says, and (etcd) that the head points at the last
record; the first record edited, removed or reordered is named in ``AuditChainBroken`` (exit
code 1). A plain SHA-256 chain proves order and completeness against anyone who cannot rewrite
every later record too; the file mirrors (compared with ``--file``) are the independent copy.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from failover.coordination.base import CoordinationStore
from failover.errors import FailoverError
from failover.records import audit_head_key, audit_key, audit_prefix

log = logging.getLogger(__name__)

GENESIS = "0" * 64  # the prev_hash of record 1
REDACTED = "[redacted]"
FIELDS = ("seq", "time", "actor", "action", "target", "params", "outcome", "prev_hash", "hash")
AUTO = "auto"  # the mirror file's default path
_SECRET = re.compile(r"token|passw|secret|tsig|private|credential|cookie|authori[sz]ation"
                     r"|(^|_)key$", re.IGNORECASE)
_MAX_TEXT = 2000
_MAX_PARAMS = 8192  # bytes of JSON; beyond it the parameters are cut (and say so)
_ATTEMPTS = 100


class AuditChainBroken(FailoverError):
    """The chain does not verify: a record was edited, removed or reordered."""

    code = "audit_chain_broken"
    http_status = 500
    exit_code = 1

    def __init__(self, seq: int, message: str) -> None:
        super().__init__(f"record {seq}: {message}")
        self.seq = seq


class AuditNotRecordedError(FailoverError):
    """An operation was done, but its record did not reach the audit log in etcd."""

    code = "audit_not_recorded"
    http_status = 503
    exit_code = 69


# -- records -------------------------------------------------------------------------------

def redact(value: Any) -> Any:
    """``value`` as JSON-safe data, every secret-named key's value replaced."""
    if isinstance(value, Mapping):
        return {str(k): REDACTED if _SECRET.search(str(k)) else redact(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [redact(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    text = str(value)
    return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + "..."


def _canonical(rec: Mapping[str, Any]) -> bytes:
    body = {k: v for k, v in rec.items() if k != "hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def record_hash(rec: Mapping[str, Any]) -> str:
    """SHA-256 of the record's canonical JSON (sorted keys, no spaces) without ``hash``."""
    return hashlib.sha256(_canonical(rec)).hexdigest()


def make_record(seq: int, prev_hash: str, actor: str, action: str, target: str,
                params: Mapping[str, Any] | None, outcome: str, at: float) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "seq": seq,
        "time": datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "actor": redact(actor), "action": redact(action), "target": redact(target),
        "params": _bounded(redact(dict(params or {}))), "outcome": redact(outcome),
        "prev_hash": prev_hash}
    rec["hash"] = record_hash(rec)
    return rec


def _bounded(params: dict[str, Any]) -> dict[str, Any]:
    text = json.dumps(params, sort_keys=True, ensure_ascii=False)
    if len(text) <= _MAX_PARAMS:
        return params
    return {"truncated": text[:_MAX_PARAMS], "size": len(text)}


def encode(rec: Mapping[str, Any]) -> bytes:
    return json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def describe(rec: Mapping[str, Any]) -> str:
    """One line for `drctl audit show`."""
    params = json.dumps(rec.get("params") or {}, sort_keys=True, separators=(",", ":"))
    return (f"{rec.get('seq')!s:>6} {rec.get('time')} {rec.get('actor')} {rec.get('action')} "
            f"{rec.get('target') or '-'}: {rec.get('outcome')}"
            + (f" {params}" if params != "{}" else ""))


# -- verification --------------------------------------------------------------------------

@dataclass(frozen=True)
class Slot:
    """A stored record and where it is: ``seq`` is the seq its place implies (the key's for
    etcd, the line's for a file); ``record`` is None when it does not parse."""

    seq: int
    where: str
    record: dict[str, Any] | None


@dataclass(frozen=True)
class Chain:
    slots: list[Slot]
    head: tuple[int, str] | None = None  # etcd's audit/head (None: absent or a file)


def verify(chain: Chain, source: str, with_head: bool = False) -> tuple[int, str]:
    """Check every record of ``chain`` (``source`` names it in messages); return the number of
    records and the last hash. Raises AuditChainBroken naming the first bad record."""
    present = {s.record["seq"]: s.where for s in chain.slots
               if s.record is not None and isinstance(s.record.get("seq"), int)}
    prev, expected = GENESIS, 1
    for slot in chain.slots:
        if slot.seq != expected:  # etcd: a key missing in the sequence
            raise AuditChainBroken(expected, f"removed (no {source} record between "
                                             f"{expected - 1} and {slot.seq})")
        _check_slot(slot, present, prev, source)
        assert slot.record is not None
        prev, expected = slot.record["hash"], expected + 1
    last = expected - 1
    if with_head:
        _check_head(chain.head, last, prev, source)
    return last, prev


def _check_slot(slot: Slot, present: dict[int, str], prev: str, source: str) -> None:
    rec = slot.record
    if rec is None or sorted(rec) != sorted(FIELDS):
        raise AuditChainBroken(slot.seq, f"{slot.where} is not an audit record (edited)")
    if rec["seq"] != slot.seq:
        elsewhere = present.get(slot.seq)
        why = (f"reordered (record {slot.seq} is at {elsewhere})" if elsewhere
               else "removed or replaced")
        raise AuditChainBroken(slot.seq, f"{slot.where} holds record {rec['seq']} instead: "
                                         f"{why}")
    try:
        edited = record_hash(rec) != rec["hash"]
    except ValueError:  # not JSON any more (NaN...)
        edited = True
    if edited:
        raise AuditChainBroken(slot.seq, f"edited: its hash does not match its contents "
                                         f"({slot.where})")
    if rec["prev_hash"] != prev:
        if slot.seq == 1:
            raise AuditChainBroken(1, f"edited: its prev_hash is not the start of a chain "
                                      f"({slot.where})")
        raise AuditChainBroken(slot.seq - 1, f"edited or replaced: record {slot.seq}'s "
                                             f"prev_hash does not match it ({source})")


def _check_head(head: tuple[int, str] | None, last: int, last_hash: str, source: str) -> None:
    if head is None:
        if last:
            raise AuditChainBroken(last, f"the {source} head is missing")
        return
    seq, hsh = head
    if seq > last:
        raise AuditChainBroken(last + 1, f"removed (the {source} head says the log ends at "
                                         f"record {seq}, the last one there is {last})")
    if seq < last:
        raise AuditChainBroken(seq + 1, f"not covered by the {source} head (it ends at "
                                        f"record {seq}): written outside drctl")
    if hsh != last_hash:
        raise AuditChainBroken(last, f"edited: the {source} head holds another hash")


def compare(etcd: Chain, file: Chain, path: str) -> None:
    """Both verified on their own: every record in both must be the same one, and the file
    (a mirror of the chain's beginning) may not go on past etcd's end."""
    ours = {s.seq: s.record for s in etcd.slots}
    for slot in file.slots:
        theirs = ours.get(slot.seq)
        assert slot.record is not None
        if theirs is None:
            raise AuditChainBroken(slot.seq, f"in {path} but not in etcd (removed from etcd)")
        if theirs["hash"] != slot.record["hash"]:
            raise AuditChainBroken(slot.seq, f"differs between etcd and {path} (edited and "
                                             "re-hashed in one of them)")


async def read_etcd(store: CoordinationStore, prefix: str) -> Chain:
    base, head_key = audit_prefix(prefix), audit_head_key(prefix)
    snap = await store.snapshot(base)
    slots, head = [], None
    for key in sorted(snap.entries):
        raw = snap.entries[key].value
        if key == head_key:
            head = _head(raw)
            continue
        suffix = key[len(base):]
        if not suffix.isdigit():
            raise AuditChainBroken(0, f"unexpected key {key} in the audit log")
        slots.append(Slot(int(suffix), key, _parse(raw)))
    return Chain(slots, head)


def read_file(path: str) -> Chain:
    with open(path, "rb") as fh:
        lines = [ln for ln in fh.read().split(b"\n") if ln.strip()]
    return Chain([Slot(i, f"{path}:{i}", _parse(ln)) for i, ln in enumerate(lines, 1)])


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        rec = json.loads(raw)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def _head(raw: bytes) -> tuple[int, str]:
    h = _parse(raw) or {}
    if not isinstance(h.get("seq"), int) or not isinstance(h.get("hash"), str):
        raise AuditChainBroken(0, "the audit head is not readable (edited)")
    return h["seq"], h["hash"]


# -- the local mirror ----------------------------------------------------------------------

def mirror_file(flag: str | None) -> str | None:
    """The mirror's path from a flag or $DRCTL_AUDIT_FILE (AUTO: the default path, which
    depends on the chain; None: no mirror)."""
    value = flag or os.environ.get("DRCTL_AUDIT_FILE") or AUTO
    return None if value.lower() in ("none", "off", "") else value


def default_mirror(cluster: str, genesis_hash: str) -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "drctl", "audit", f"{cluster}-{genesis_hash[:12]}.jsonl")


def _last_in_file(fd: int) -> tuple[int, str]:
    """(seq, hash) of the file's last record, (0, GENESIS) for an empty file."""
    size = os.fstat(fd).st_size
    chunk = 1 << 16
    while True:
        start = max(0, size - chunk)
        data = os.pread(fd, size - start, start).rstrip(b"\n")
        line = data.rsplit(b"\n", 1)[-1] if data else b""
        if b"\n" in data or start == 0:
            break
        chunk *= 4
    if not line.strip():
        return 0, GENESIS
    rec = _parse(line)
    if rec is None or not isinstance(rec.get("seq"), int):
        raise AuditChainBroken(0, "the mirror's last line is not an audit record")
    return rec["seq"], str(rec.get("hash"))


def _write_mirror(path: str, records: list[dict[str, Any]]) -> None:
    """Append the records the file does not have yet (under an flock: processes share it)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        seq, last_hash = _last_in_file(fd)
        todo = [r for r in records if r["seq"] > seq]
        if not todo:
            return
        if todo[0]["seq"] != seq + 1 or todo[0]["prev_hash"] != last_hash:
            raise AuditChainBroken(todo[0]["seq"], f"does not continue {path} (its last record "
                                                   f"is {seq}): mirror not written")
        os.write(fd, b"".join(encode(r) + b"\n" for r in todo))
        os.fsync(fd)
    finally:
        os.close(fd)


def append_file(path: str, actor: str, action: str, target: str,
                params: Mapping[str, Any] | None = None, outcome: str = "ok") -> dict[str, Any]:
    """Append one record to a chain kept only in a file (an offline CA's issuance log, where
    no etcd is reachable): the same records and hashes as the etcd chain, so `drctl audit
    verify --file` checks it. One flock per append; the file is 0600."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        seq, last_hash = _last_in_file(fd)
        rec = make_record(seq + 1, last_hash, actor, action, target, params, outcome,
                          time.time())
        os.write(fd, encode(rec) + b"\n")
        os.fsync(fd)
        return rec
    finally:
        os.close(fd)


# -- appending -----------------------------------------------------------------------------

class AuditLog:
    """Appends records to the chain in etcd (and to the local mirror). One per process; the
    head is cached, so an append is usually one transaction."""

    def __init__(self, store: CoordinationStore, prefix: str, file: str | None = AUTO) -> None:
        self.store = store
        self.prefix = prefix
        self.cluster = prefix.rstrip("/").rsplit("/", 1)[-1]
        self.file = file
        self._head: tuple[int, str, int] | None = None  # seq, hash, head's mod_revision
        self._lock = asyncio.Lock()
        self._genesis: str | None = None
        self._mirror_failed = False

    async def append(self, actor: str, action: str, target: str,
                     params: Mapping[str, Any] | None = None, outcome: str = "ok",
                     at: float | None = None) -> dict[str, Any]:
        """Append one record (secrets redacted); returns it. Raises StoreUnavailableError
        when etcd cannot be reached, AuditChainBroken when the head does not match the log."""
        async with self._lock:
            rec = await self._append(actor, action, target, params, outcome,
                                     time.time() if at is None else at)
        await self._mirror(rec)
        return rec

    async def try_append(self, actor: str, action: str, target: str,
                         params: Mapping[str, Any] | None = None,
                         outcome: str = "ok") -> dict[str, Any] | None:
        """``append`` for daemons and request handlers: a failure is logged, never raised
        (the log must not take a controller or an agent down with it)."""
        try:
            return await self.append(actor, action, target, params, outcome)
        except (FailoverError, OSError, TimeoutError) as exc:
            log.error("audit: not recorded (%s %s %s: %s): %s", actor, action, target,
                      outcome, exc)
        except Exception:
            log.exception("audit: not recorded (%s %s %s: %s)", actor, action, target, outcome)
        return None

    async def _append(self, actor: str, action: str, target: str,
                      params: Mapping[str, Any] | None, outcome: str,
                      at: float) -> dict[str, Any]:
        head_key = audit_head_key(self.prefix)
        for _ in range(_ATTEMPTS):
            if self._head is None:
                self._head = await self._read_head()
            seq, prev, rev = self._head
            rec = make_record(seq + 1, prev, actor, action, target, params, outcome, at)
            written = await self.store.create_and_swap(
                audit_key(self.prefix, seq + 1), encode(rec), head_key,
                json.dumps({"seq": seq + 1, "hash": rec["hash"]}).encode(), rev)
            if written:
                self._head = (seq + 1, rec["hash"], written)
                return rec
            stale, self._head = self._head, await self._read_head()
            if self._head == stale:  # nobody moved the head, yet the next key exists
                raise AuditChainBroken(seq + 1, "exists beyond the audit head (written "
                                                "outside drctl): not appending")
        raise FailoverError(f"audit: no append after {_ATTEMPTS} conflicts")

    async def _read_head(self) -> tuple[int, str, int]:
        key = audit_head_key(self.prefix)
        entry = (await self.store.snapshot(key)).entries.get(key)
        if entry is None:
            return 0, GENESIS, 0
        seq, hsh = _head(entry.value)
        return seq, hsh, entry.mod_revision

    async def mirror_path(self, first: dict[str, Any] | None = None) -> str | None:
        """The mirror file of this chain (AUTO: named after record 1's hash)."""
        if self.file != AUTO:
            return self.file
        if self._genesis is None:
            if first is None:
                raw = (await self.store.snapshot(audit_key(self.prefix, 1))).value(
                    audit_key(self.prefix, 1))
                first = _parse(raw) if raw is not None else None
            if first is None:
                return None
            self._genesis = str(first["hash"])
        return default_mirror(self.cluster, self._genesis)

    async def _mirror(self, rec: dict[str, Any]) -> None:
        if self.file is None or self._mirror_failed:
            return
        path = None
        try:
            path = await self.mirror_path(rec if rec["seq"] == 1 else None)
            if path is None:
                raise AuditChainBroken(1, "missing in etcd: no default mirror path")
            have = await asyncio.to_thread(_last_seq, path)
            missing = await self._fetch(have + 1, rec["seq"] - 1)
            await asyncio.to_thread(_write_mirror, path, [*missing, rec])
        except AuditChainBroken as exc:  # said once: the file keeps what it has
            self._mirror_failed = True
            log.error("audit: mirror %s: %s", path, exc)
        except (OSError, FailoverError) as exc:
            log.error("audit: mirror %s: %s", path, exc)
        except Exception:  # the record is in etcd: the mirror's trouble is only logged
            log.exception("audit: mirror %s", path)

    async def _fetch(self, first: int, last: int) -> list[dict[str, Any]]:
        """Records ``first..last`` from etcd (the ones others appended since the file's end)."""
        if last < first:
            return []
        if last - first < 64:
            keys = [audit_key(self.prefix, s) for s in range(first, last + 1)]
            snaps = await asyncio.gather(*(self.store.snapshot(k) for k in keys))
            raws = [snap.value(k) for snap, k in zip(snaps, keys, strict=True)]
        else:
            snap = await self.store.snapshot(audit_prefix(self.prefix))
            raws = [snap.value(audit_key(self.prefix, s)) for s in range(first, last + 1)]
        out = []
        for seq, raw in enumerate(raws, first):
            rec = _parse(raw) if raw is not None else None
            if rec is None:
                raise AuditChainBroken(seq, "missing or unreadable in etcd: mirror not written")
            out.append(rec)
        return out


def _last_seq(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return 0
    try:
        return _last_in_file(fd)[0]
    finally:
        os.close(fd)
