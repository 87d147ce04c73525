"""`drctl failover|switchover|failback|retry|cancel` against a real etcd: requests the stored
record rules out are refused before anything is written."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator

import pytest

from failover.coordination.etcd import EtcdStore
from failover.fsm import State
from failover.records import Operation, ServiceRecord, command_key, state_key
from tests.procs import DRCTL, run
from tests.services import EtcdServer

PREFIX = "/drctl/req/"


@pytest.fixture
def cluster(workdir: str) -> Iterator[tuple[str, EtcdServer]]:
    etcd = EtcdServer().start()
    path = os.path.join(workdir, "c.yaml")
    with open(path, "w") as fh:
        json.dump({"cluster": "req", "etcd": etcd.etcd_config(),
                   "sites": {s: {"address": f"10.0.0.{i}"}
                             for i, s in enumerate(("east", "west", "north"), 1)},
                   "services": {"app": {"primary": "east", "replica": "west"}}}, fh)
    try:
        yield path, etcd
    finally:
        etcd.stop()


def _store(etcd: EtcdServer) -> EtcdStore:
    return EtcdStore([etcd.endpoint], credentials=etcd.credentials())


def put_record(etcd: EtcdServer, rec: ServiceRecord) -> None:
    async def put() -> None:
        store = _store(etcd)
        try:
            await store.put(state_key(PREFIX, "app"), rec.encode())
        finally:
            await store.close()

    asyncio.run(put())


def pending(etcd: EtcdServer) -> bytes | None:
    async def get() -> bytes | None:
        store = _store(etcd)
        try:
            return (await store.snapshot(PREFIX)).value(command_key(PREFIX, "app"))
        finally:
            await store.close()

    return asyncio.run(get())


def drctl(*args: str) -> tuple[int, str]:
    p = run([*DRCTL, *args])
    return p.returncode, (p.stdout + p.stderr).strip()


def test_refused_at_once_and_nothing_written(cluster: tuple[str, EtcdServer]) -> None:
    cfg, etcd = cluster
    code, out = drctl("failover", "app", "--config", cfg, "--to", "north")
    assert code == 65, out
    assert "failover to north refused: north holds no replica of app (replica: west)" in out
    assert len(out.splitlines()) == 1, out
    code, out = drctl("failback", "app", "--config", cfg)  # east is still the primary
    assert code == 65 and "east is already the primary of app" in out, out
    for request in ("retry", "cancel"):
        code, out = drctl(request, "app", "--config", cfg)
        # (a new service: unprotected until its primary first reports its replica protected)
        assert code == 65 and "nothing failed (the service is unprotected)" in out, out
    put_record(etcd, ServiceRecord(State.UNPROTECTED, 1.0, "east", "west"))
    code, out = drctl("switchover", "app", "--config", cfg)
    assert code == 65 and "the service is unprotected, not healthy" in out, out
    assert pending(etcd) is None


def test_retry_and_cancel_are_written_for_a_failed_service(
        cluster: tuple[str, EtcdServer]) -> None:
    cfg, etcd = cluster
    put_record(etcd, ServiceRecord(State.FAILED, 1.0, "east", "west", epoch=2,
                                   operation=Operation("failover", "east", "west", 1.0,
                                                       failed_step="fencing", error="late")))
    code, out = drctl("retry", "app", "--config", cfg)
    assert code == 0 and "retry of app requested" in out, out
    raw = pending(etcd)
    assert raw is not None and json.loads(raw)["command"] == "retry"
    # who asked: the CLI's actor of the audit log (user@host)
    from failover.cli_common import cli_actor

    assert json.loads(raw)["by"] == {"name": cli_actor(), "role": "", "via": "cli"}
    code, out = drctl("cancel", "app", "--config", cfg)
    assert code == 1 and "another request is still pending" in out, out
    code, out = drctl("status", "--config", cfg)
    assert code == 0 and "failed in fencing: late (retry or cancel)" in out, out
    assert f"  queued: retry, asked by {cli_actor()} (drctl CLI)" in out, out
