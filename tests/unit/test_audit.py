"""The audit log on the in-memory store: the chain, its mirror, what verify names."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from failover.audit import (
    GENESIS,
    REDACTED,
    AuditChainBroken,
    AuditLog,
    compare,
    read_etcd,
    read_file,
    record_hash,
    redact,
    verify,
)
from failover.coordination.memory import MemoryStore
from failover.records import audit_head_key, audit_key

PREFIX = "/drctl/u/"


async def _log(store: MemoryStore, n: int, path: str | None) -> AuditLog:
    log = AuditLog(store, PREFIX, path)
    for i in range(n):
        await log.append("alice", "cli.failover", "app", {"to": "west", "i": i}, "queued")
    return log


def test_secrets_are_redacted_by_key_name() -> None:
    got = redact({"token": "t", "Authorization": "Bearer x", "tsig": {"secret": "s"},
                  "password_file": "/p", "api_key": "k", "key": "k", "nested": [
                      {"client_secret": "c", "keep": 1}], "to": "west"})
    assert got == {"token": REDACTED, "Authorization": REDACTED, "tsig": REDACTED,
                   "password_file": REDACTED, "api_key": REDACTED, "key": REDACTED,
                   "nested": [{"client_secret": REDACTED, "keep": 1}], "to": "west"}


async def test_appends_form_one_chain_and_the_mirror_copies_it(workdir: str) -> None:
    store, path = MemoryStore(), os.path.join(workdir, "audit.jsonl")
    await _log(store, 5, path)
    chain = await read_etcd(store, PREFIX)
    assert [s.seq for s in chain.slots] == [1, 2, 3, 4, 5]
    first = chain.slots[0].record
    assert first is not None and first["prev_hash"] == GENESIS
    assert first["hash"] == record_hash(first)
    assert set(first) == {"seq", "time", "actor", "action", "target", "params", "outcome",
                          "prev_hash", "hash"}
    count, head = verify(chain, "etcd", with_head=True)
    assert (count, chain.head) == (5, (5, head))
    mirror = read_file(path)
    assert verify(mirror, path) == (5, head)
    compare(chain, mirror, path)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"


async def test_concurrent_appenders_never_fork_the_chain(workdir: str) -> None:
    store = MemoryStore()
    logs = [AuditLog(store, PREFIX, os.path.join(workdir, "shared.jsonl")) for _ in range(4)]
    await asyncio.gather(*(lg.append(f"p{i}", "x", "t", {"n": n}) for i, lg in enumerate(logs)
                           for n in range(10)))
    chain = await read_etcd(store, PREFIX)
    assert verify(chain, "etcd", with_head=True)[0] == 40
    # every appender mirrored into one file: records others appended are fetched from etcd
    mirror = read_file(os.path.join(workdir, "shared.jsonl"))
    assert verify(mirror, "file")[0] == 40
    compare(chain, mirror, "file")


async def test_a_process_with_an_empty_mirror_copies_the_chain_so_far(workdir: str) -> None:
    store = MemoryStore()
    await _log(store, 3, os.path.join(workdir, "a.jsonl"))
    late = AuditLog(store, PREFIX, os.path.join(workdir, "b.jsonl"))
    await late.append("bob", "api.switchover", "app")
    assert verify(read_file(os.path.join(workdir, "b.jsonl")), "b")[0] == 4


async def test_default_mirror_is_named_after_the_chain(workdir: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", workdir)
    store = MemoryStore()
    log = AuditLog(store, PREFIX)
    rec = await log.append("c", "x", "t")
    path = os.path.join(workdir, "drctl", "audit", f"u-{rec['hash'][:12]}.jsonl")
    assert os.path.exists(path)
    other = MemoryStore()  # another etcd: another chain, another file
    rec2 = await AuditLog(other, PREFIX).append("c", "x", "t")
    assert rec2["hash"] != rec["hash"]
    assert len(os.listdir(os.path.join(workdir, "drctl", "audit"))) == 2


async def _tampered(op: str) -> str:
    """Tamper with record 3 of 5 in the store; the message verify gives."""
    store = MemoryStore()
    await _log(store, 5, None)
    k3, k4 = audit_key(PREFIX, 3), audit_key(PREFIX, 4)
    r3, r4 = store.entries[k3].value, store.entries[k4].value
    if op == "edit":
        rec = json.loads(r3)
        rec["outcome"] = "nothing happened"
        await store.put(k3, json.dumps(rec).encode())
    elif op == "edit-rehash":
        rec = json.loads(r3)
        rec["actor"] = "mallory"
        rec["hash"] = record_hash(rec)
        await store.put(k3, json.dumps(rec).encode())
    elif op == "delete":
        await store.delete_if(k3, store.entries[k3].mod_revision)
    elif op == "swap":
        await store.put(k3, r4)
        await store.put(k4, r3)
    elif op == "truncate":
        k5 = audit_key(PREFIX, 5)
        await store.delete_if(k5, store.entries[k5].mod_revision)
    with pytest.raises(AuditChainBroken) as err:
        verify(await read_etcd(store, PREFIX), "etcd", with_head=True)
    return str(err.value)


@pytest.mark.parametrize(("op", "seq", "words"), [
    ("edit", 3, "edited: its hash does not match"),
    ("edit-rehash", 3, "edited or replaced: record 4's prev_hash"),
    ("delete", 3, "removed"),
    ("swap", 3, "holds record 4 instead: reordered"),
    ("truncate", 5, "removed (the etcd head says the log ends at record 5"),
])
async def test_verify_names_the_record_tampered_with_in_etcd(op: str, seq: int,
                                                             words: str) -> None:
    message = await _tampered(op)
    assert message.startswith(f"record {seq}: ") and words in message, message


def _rewrite(path: str, op: str) -> None:
    with open(path) as fh:
        lines = fh.read().splitlines()
    if op == "edit":
        rec = json.loads(lines[1])
        rec["params"]["to"] = "north"
        lines[1] = json.dumps(rec)
    elif op == "delete":
        del lines[1]
    elif op == "swap":
        lines[1], lines[2] = lines[2], lines[1]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


@pytest.mark.parametrize(("op", "words"), [("edit", "edited"), ("delete", "removed"),
                                           ("swap", "reordered")])
async def test_verify_names_the_record_tampered_with_in_the_file(workdir: str, op: str,
                                                                 words: str) -> None:
    path = os.path.join(workdir, "audit.jsonl")
    await _log(MemoryStore(), 4, path)
    _rewrite(path, op)
    with pytest.raises(AuditChainBroken, match=rf"^record 2: .*{words}"):
        verify(read_file(path), path)


async def test_the_file_catches_a_rewrite_of_the_whole_etcd_chain(workdir: str) -> None:
    """Someone who can write etcd rewrites record 2 and re-hashes every later one: etcd alone
    verifies, the mirror does not match it."""
    store, path = MemoryStore(), os.path.join(workdir, "audit.jsonl")
    await _log(store, 4, path)
    prev = json.loads(store.entries[audit_key(PREFIX, 1)].value)["hash"]
    for seq in range(2, 5):
        rec = json.loads(store.entries[audit_key(PREFIX, seq)].value)
        if seq == 2:
            rec["actor"] = "mallory"
        rec["prev_hash"] = prev
        rec["hash"] = prev = record_hash(rec)
        await store.put(audit_key(PREFIX, seq), json.dumps(rec).encode())
    await store.put(audit_head_key(PREFIX), json.dumps({"seq": 4, "hash": prev}).encode())
    chain = await read_etcd(store, PREFIX)
    verify(chain, "etcd", with_head=True)
    with pytest.raises(AuditChainBroken, match=r"^record 2: differs between etcd and"):
        compare(chain, read_file(path), path)


async def test_a_record_written_past_the_head_stops_appends() -> None:
    store = MemoryStore()
    log = await _log(store, 2, None)
    await store.put(audit_key(PREFIX, 3), b"{}")  # not through drctl: the head did not move
    fresh = AuditLog(store, PREFIX, None)
    with pytest.raises(AuditChainBroken, match=r"^record 3: exists beyond the audit head"):
        await fresh.append("x", "y", "z")
    assert await log.try_append("x", "y", "z") is None  # daemons log it and go on
