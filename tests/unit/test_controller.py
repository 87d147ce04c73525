"""The controller's ticks against the in-memory store: what it reads from heartbeats, what it
records, which commands it consumes or refuses (the decisions themselves: test_fsm.py)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from failover.config import ClusterConfig, Hooks, ServiceConfig, Site
from failover.controller import Controller
from failover.coordination.memory import MemoryStore
from failover.fsm import Command, Policy, State
from failover.metrics import ControllerMetrics
from failover.records import (
    Actor,
    CommandRecord,
    Heartbeat,
    Operation,
    ServiceHealth,
    ServiceRecord,
    command_key,
    heartbeat_key,
    refuse_request,
    service_record,
    state_key,
)
from failover.status import cluster_status, human_bytes, operation_line, resync_line

SITES = {s: Site(s, a) for s, a in (("east", "10.0.0.1"), ("west", "10.0.0.2"),
                                    ("north", "10.0.0.3"))}


def config(stepped: bool = False, **policy: Any) -> ClusterConfig:
    """``stepped``: its operations have a plan (a promote step), as a loaded cluster.yaml's
    do (the status shows an operation with its steps)."""
    from failover.steps import Owner, StepKind, StepSpec

    steps = (StepSpec(StepKind.PROMOTE, "promote", Owner.NEW_PRIMARY),) if stepped else ()
    svc = ServiceConfig("app", "east", "west", Policy(**policy), None, Hooks(), steps=steps)
    return ClusterConfig("t.yaml", "t", (), 2, SITES, {"app": svc})


class Cluster:
    def __init__(self, metrics: ControllerMetrics | None = None, stepped: bool = False,
                 **policy: Any) -> None:
        self.cfg = config(stepped, **policy)
        self.store = MemoryStore()
        self.controller = Controller(self.cfg, self.store, "c0", metrics)

    async def beat(self, site: str, role: str, epoch: int, **health: Any) -> None:
        hb = Heartbeat(site, time.time(), {"app": ServiceHealth(role, epoch, **health)})
        await self.store.put(heartbeat_key(self.cfg.prefix, site), hb.encode())

    async def silence(self, site: str) -> None:
        key = heartbeat_key(self.cfg.prefix, site)
        await self.store.delete_if(key, self.store.entries[key].mod_revision)

    async def command(self, command: Command, target: str | None = None,
                      by: Actor | None = None, at: float | None = None) -> None:
        rec = CommandRecord(command, target, "op1", time.time() if at is None else at, by)
        assert await self.store.create(command_key(self.cfg.prefix, "app"), rec.encode())

    def pending(self) -> bool:
        return command_key(self.cfg.prefix, "app") in self.store.entries

    def record(self) -> ServiceRecord:
        return service_record(self.store.entries[state_key(self.cfg.prefix, "app")].value,
                              "east", "west")

    async def put_record(self, rec: ServiceRecord) -> None:
        await self.store.put(state_key(self.cfg.prefix, "app"), rec.encode())

    async def tick(self) -> str:
        (result,) = await self.controller.tick()
        return result.message

    async def healthy(self, epoch: int = 1) -> None:
        await self.beat("east", "primary", epoch, lag_seconds=0.5, protected=True,
                        data_path="running")
        await self.beat("west", "replica", epoch, data_path="running")
        await self.tick()
        assert self.record().state is State.HEALTHY


async def test_protection_follows_the_primarys_report() -> None:
    c = Cluster()
    await c.healthy()
    await c.beat("east", "primary", 1, lag_seconds=3.0, protected=None)
    await c.tick()
    assert c.record().state is State.HEALTHY  # unknown is not unprotected
    await c.beat("east", "primary", 1, lag_seconds=3.0, protected=False)
    await c.tick()
    assert c.record().state is State.UNPROTECTED
    await c.command(Command.SWITCHOVER)
    message = await c.tick()
    assert "switchover refused: the replica is not receiving" in message
    assert not c.pending() and c.record().state is State.UNPROTECTED
    assert "switchover refused" in c.record().message
    await c.beat("east", "primary", 1, lag_seconds=0.2, protected=True)
    await c.tick()
    assert c.record().state is State.HEALTHY


async def test_a_report_at_an_older_epoch_says_nothing() -> None:
    c = Cluster()
    await c.put_record(ServiceRecord(State.HEALTHY, time.time(), "east", "west", epoch=3))
    await c.beat("east", "primary", 2, protected=False)
    await c.tick()
    assert c.record().state is State.HEALTHY


@pytest.mark.parametrize(("command", "target", "word"), [
    (Command.FAILOVER, "north", "failover"), (Command.FORCE_FAILOVER, "north", "failover"),
    (Command.SWITCHOVER, "north", "switchover"), (Command.SWITCHOVER, "east", "switchover")])
async def test_a_target_without_the_replica_is_refused(command: Command, target: str,
                                                       word: str) -> None:
    c = Cluster()
    await c.healthy()
    await c.command(command, target)
    message = await c.tick()
    rec = c.record()
    assert (rec.state, rec.epoch, rec.operation, c.pending()) == (State.HEALTHY, 1, None, False)
    assert f"{word} to {target} refused: {target}" in message
    assert "(replica: west)" in rec.message
    if target == "north":
        assert "north holds no replica of app (replica: west)" in rec.message


async def test_failover_resync_and_protection_end_to_end() -> None:
    c = Cluster()
    await c.healthy()
    await c.command(Command.FAILOVER, "west")
    await c.tick()
    rec = c.record()
    assert (rec.state, rec.epoch, rec.operation and rec.operation.kind) == (
        State.FENCING, 2, "failover")
    assert not c.pending()
    await c.beat("east", "fenced", 2)
    await c.tick()
    assert (c.record().state, c.record().primary) == (State.PROMOTING, "west")
    await c.beat("west", "primary", 2, protected=False)
    await c.tick()
    assert c.record().state is State.REROUTING  # no DNS configured: done at once
    await c.tick()
    assert c.record().state is State.FAILED_OVER
    # the old primary back as the replica: resync, not healthy yet
    await c.beat("east", "replica", 2, unreplicated_blocks=7, unreplicated_file="/x/app.unrep",
                 data_path="starting")
    await c.tick()
    rec = c.record()
    assert rec.state is State.RESYNCING and rec.replica_consistent is False
    assert (rec.unreplicated_blocks, rec.unreplicated_file) == (7, "/x/app.unrep")
    progress = {"mode": "hash", "bytes_total": 8 << 30, "bytes_left": 3 << 30,
                "eta_seconds": 125.0}
    await c.beat("west", "primary", 2, protected=False, resync=progress)
    await c.tick()
    assert c.record().state is State.RESYNCING and c.record().resync == progress
    # protected at the epoch, but the replica does not follow as "replica" yet
    await c.beat("east", "fenced", 2, unreplicated_blocks=7, unreplicated_file="/x/app.unrep")
    await c.beat("west", "primary", 2, protected=True)
    await c.tick()
    assert c.record().state is State.RESYNCING
    await c.beat("east", "replica", 2, unreplicated_blocks=7, unreplicated_file="/x/app.unrep")
    await c.tick()
    rec = c.record()
    assert (rec.state, rec.primary, rec.replica, rec.resync) == (State.HEALTHY, "west", "east",
                                                                 None)
    assert rec.replica_consistent and rec.operation is None


async def test_primary_lost_mid_resync_blocks_until_forced() -> None:
    c = Cluster()
    rec = ServiceRecord(State.RESYNCING, time.time(), "west", "east", epoch=2,
                        replica_consistent=False, last_lag_seconds=0.0)
    await c.put_record(rec)
    await c.beat("east", "replica", 2)
    await c.tick()
    assert c.record().state is State.BLOCKED
    await c.tick()
    assert c.record().state is State.BLOCKED  # lag 0 and automatic: still not promoted
    await c.command(Command.FAILOVER)
    assert "use --force" in await c.tick()
    assert not c.pending() and c.record().state is State.BLOCKED
    await c.command(Command.FORCE_FAILOVER)
    await c.tick()
    assert (c.record().state, c.record().epoch) == (State.FENCING, 3)


async def test_step_timeout_retry_and_cancel() -> None:
    c = Cluster(fence_timeout_seconds=30, stepped=True)
    await c.healthy()
    await c.command(Command.FAILOVER)
    await c.tick()
    rec = c.record()
    rec.since -= 31  # fencing for 31 s: east never reports fenced
    await c.put_record(rec)
    await c.tick()
    rec = c.record()
    assert rec.state is State.FAILED and rec.operation is not None
    assert rec.operation.failed_step == "fencing"
    assert "fencing timed out after 30s waiting for the old primary" in str(rec.operation.error)
    assert cluster_status(c.cfg, await c.store.snapshot(c.cfg.prefix),
                          time.time())["services"]["app"]["error"] == rec.operation.error
    await c.command(Command.RETRY, by=Actor("bob", "admin", "api"), at=2000.0)
    await c.tick()
    rec = c.record()
    assert rec.state is State.FENCING and rec.operation is not None
    assert (rec.operation.error, rec.operation.failed_step, rec.epoch) == (None, None, 2)
    assert rec.history[-1]["request"] == {"command": "retry", "at": 2000.0, "by": {
        "name": "bob", "role": "admin", "via": "api"}, "id": "op1"}
    rec.since -= 31
    await c.put_record(rec)
    await c.tick()
    assert c.record().state is State.FAILED
    await c.command(Command.CANCEL, by=Actor("carol@ops2", via="cli"), at=2100.0)
    await c.tick()
    rec = c.record()
    assert (rec.state, rec.operation, rec.primary, rec.replica) == (State.HEALTHY, None, "east",
                                                                    "west")
    assert not c.pending()
    # who asked for the operation (nobody: the command named no one), then who retried and
    # who cancelled it
    app = cluster_status(c.cfg, await c.store.snapshot(c.cfg.prefix),
                         time.time())["services"]["app"]
    assert [r["asked"] for r in app["operation"]["later_requests"]] == [
        "retry asked by bob (admin)", "cancel asked by carol@ops2 (drctl CLI)"]
    assert app["operations"][0]["request"] == "cancel asked by carol@ops2 (drctl CLI)"
    line = operation_line(app["operation"], lambda t: f"T{t:.0f}")
    assert line.startswith("last operation: failover to west, asked by an unknown user at T")
    assert line.endswith(": cancelled; retry asked by bob (admin) at T2000; cancel asked by "
                         "carol@ops2 (drctl CLI) at T2100")


async def test_a_resync_that_times_out_can_be_retried() -> None:
    c = Cluster(resync_timeout_seconds=60)
    await c.put_record(ServiceRecord(State.RESYNCING, time.time() - 61, "west", "east",
                                     epoch=2, replica_consistent=False))
    await c.beat("west", "primary", 2, protected=False)
    await c.beat("east", "replica", 2)
    await c.tick()
    rec = c.record()
    assert rec.state is State.FAILED and rec.operation is not None
    assert (rec.operation.kind, rec.operation.failed_step) == ("resync", "resyncing")
    await c.command(Command.RETRY)
    await c.tick()
    assert c.record().state is State.RESYNCING
    await c.beat("west", "primary", 2, protected=True)
    await c.tick()
    assert (c.record().state, c.record().operation) == (State.HEALTHY, None)


async def test_drain_waits_for_the_barrier_and_a_failover_request_wins() -> None:
    for failover in (False, True):
        c = Cluster()
        await c.healthy()
        await c.command(Command.SWITCHOVER)
        await c.tick()
        assert c.record().state is State.DRAINING
        await c.beat("east", "primary", 1, lag_seconds=0.0, protected=True)
        assert "write barrier not up yet" in await c.tick()
        assert c.record().state is State.DRAINING
        if not failover:  # the status says the drain once, as the primary reports it now
            await c.beat("east", "primary", 1, lag_seconds=0.0, protected=True, barrier=True)
            app = cluster_status(c.cfg, await c.store.snapshot(c.cfg.prefix),
                                 time.time())["services"]["app"]
            assert app["summary"] == "draining: replica lag 0.0s, write barrier up", app
            assert not any("draining" in line for line in app["progress"]), app
        if failover:
            await c.command(Command.FAILOVER)
        else:
            await c.beat("east", "primary", 1, lag_seconds=0.0, protected=True, barrier=True)
        await c.tick()
        rec = c.record()
        assert rec.state is State.FENCING and rec.operation is not None
        assert rec.operation.kind == ("failover" if failover else "switchover")


async def test_retry_or_cancel_when_nothing_failed_is_refused_and_consumed() -> None:
    c = Cluster()
    await c.healthy()
    await c.command(Command.CANCEL)
    assert "cancel refused: nothing failed" in await c.tick()
    assert not c.pending() and c.record().state is State.HEALTHY


async def test_status_shows_protection_resync_and_unreplicated_writes() -> None:
    c = Cluster()
    await c.healthy()
    await c.beat("east", "primary", 1, lag_seconds=None, protected=False,
                 resync={"mode": "exact", "bytes_total": 1 << 30, "bytes_left": 1 << 29,
                         "eta_seconds": None}, data_path="running")
    await c.beat("west", "replica", 1, data_path="restarting in 4s: connection refused",
                 unreplicated_blocks=3, unreplicated_file="/r/app.unrep")
    await c.tick()
    s = cluster_status(c.cfg, await c.store.snapshot(c.cfg.prefix), time.time())
    app = s["services"]["app"]
    assert (app["state"], app["protected"], app["unreplicated_blocks"]) == (
        State.UNPROTECTED, False, 3)
    assert app["sites"]["west"] == {"role": "replica", "epoch": 1,
                                    "data_path": "restarting in 4s: connection refused"}
    assert s["sites"]["east"]["services"]["app"]["role"] == "primary"
    lines = app["progress"]
    assert lines[0] == ("unprotected: west is not receiving (restarting in 4s: connection "
                        "refused)")
    assert lines[1] == "resync (exact): 512.0 MiB left of 1.0 GiB, ETA unknown"
    assert lines[2] == "unreplicated writes set aside: 3 blocks in /r/app.unrep (on west)"
    assert not any("None" in line for line in lines)
    await c.silence("west")
    s = cluster_status(c.cfg, await c.store.snapshot(c.cfg.prefix), time.time())
    assert s["services"]["app"]["progress"][0] == "unprotected: the replica site west is down"
    assert s["services"]["app"]["sites"]["west"] is None


def test_progress_formatting() -> None:
    assert human_bytes(None) == "unknown" and human_bytes(512) == "512 B"
    assert resync_line({"mode": "hash", "bytes_total": 10 << 20, "bytes_left": 4 << 20,
                        "eta_seconds": 3725}) == (
        "resync (hash): 4.0 MiB left of 10.0 MiB, ETA 1h02m")
    assert resync_line({"mode": "exact", "bytes_total": 10 << 20, "bytes_left": 0,
                        "eta_seconds": 0}) == (
        "resync (exact): all 10.0 MiB read and sent, waiting for the target's acknowledgement "
        "and the verify")


def test_a_running_step_names_the_site_that_runs_it() -> None:
    from failover.records import Operation, StepRun
    from failover.status import progress

    rec = service_record(None, "east", "west")
    rec.state = State.PROMOTING
    rec.operation = Operation("failover", "east", "west", 0.0, steps=[
        StepRun("fence", "fence", "controller", "fencing", status="done"),
        StepRun("stop web", "hook", "old_primary", "fencing", status="done"),
        StepRun("promote", "promote", "new_primary", "promoting", status="running")])
    assert progress(rec, None, None, True)[0] == "step 3/3: promote (on west)"
    rec.operation.steps[1].status = "running"
    assert progress(rec, None, None, True)[0] == "step 2/3: hook 'stop web' (on east)"
    rec.operation.steps[0].status = "running"
    assert progress(rec, None, None, True)[0] == "step 1/3: fence (controller)"


def test_old_and_new_heartbeats_and_records_decode() -> None:
    old = Heartbeat.decode(b'{"site": "east", "at": 1.0, "services": {"app": '
                           b'{"role": "primary", "epoch": 2, "lag_seconds": 0.5}}}')
    h = old.services["app"]
    assert (h.protected, h.barrier, h.resync, h.unreplicated_blocks, h.data_path) == (
        None, False, None, 0, "")
    newer = Heartbeat.decode(b'{"site": "east", "at": 1.0, "services": {"app": {"role": '
                             b'"primary", "epoch": 2, "protected": true, "later": 1}}}')
    assert newer.services["app"].protected is True
    rec = ServiceRecord.decode(b'{"state": "healthy", "since": 1.0, "primary": "east", '
                               b'"replica": "west", "some_future_field": 1}')
    assert (rec.resync, rec.unreplicated_blocks, rec.replica_consistent) == (None, 0, True)
    assert ServiceRecord.decode(rec.encode()) == rec


def test_records_from_before_requests_named_their_user_decode_as_unknown() -> None:
    from failover.records import Operation, asked_text

    old = CommandRecord.decode(b'{"command": "switchover", "target": null, "id": "x", '
                               b'"at": 1.0}')
    assert old.by is None and asked_text(old.by) == "asked by an unknown user"
    new = CommandRecord(Command.FAILOVER, "west", "y", 2.0, Actor("alice", "admin", "api"))
    assert CommandRecord.decode(new.encode()) == new
    garbled = CommandRecord.decode(b'{"command": "retry", "id": "z", "at": 1.0, "by": 7}')
    assert garbled.by is None
    requested = Operation.from_dict({"kind": "failover", "source": "east", "target": "west",
                                     "started_at": 1.0})
    assert (requested.asked_by, requested.asked) == (None, "asked by an unknown user")
    automatic = Operation.from_dict({"kind": "failover", "source": "east", "target": "west",
                                     "started_at": 1.0, "automatic": True})
    assert automatic.asked == "automatic"
    rec = ServiceRecord(State.FENCING, 1.0, "east", "west", operation=Operation(
        "failover", "east", "west", 1.0, asked_by=Actor("alice", "admin", "api"),
        asked_at=0.5))
    assert ServiceRecord.decode(rec.encode()) == rec
    # a name is printed as it is, without control characters (the page escapes it)
    assert Actor("<b>\x1b[31m", "admin", "api").describe() == "asked by <b>?[31m (admin)"
    # a user named as its role is not named twice
    assert Actor("admin", "admin", "api").describe() == "asked by admin"
    assert Actor("alice", "admin", "api").describe() == "asked by alice (admin)"


def test_requests_the_record_rules_out() -> None:
    rec = ServiceRecord(State.HEALTHY, 0.0, "east", "west")
    assert refuse_request(rec, "app", "failover", "west") is None
    assert refuse_request(rec, "app", "failover", None) is None
    assert refuse_request(rec, "app", "failover", "north") == (
        "failover to north refused: north holds no replica of app (replica: west)")
    assert "east is already the primary of app" in str(refuse_request(rec, "app", "failback",
                                                                        "east"))
    assert "nothing failed" in str(refuse_request(rec, "app", "retry", None))
    rec.state = State.UNPROTECTED
    assert refuse_request(rec, "app", "switchover", None) == (
        "switchover of app refused: the service is unprotected, not healthy")
    # a failback to where it already is says so, whatever the state
    assert "east is already the primary of app" in str(refuse_request(rec, "app", "failback",
                                                                        "east"))
    assert refuse_request(rec, "app", "failover", None) is None
    rec.state = State.FAILED
    assert refuse_request(rec, "app", "cancel", None) is None


async def test_protected_gauge_follows_the_state_every_tick() -> None:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    c = Cluster(ControllerMetrics(registry, list(SITES)))

    def gauge() -> float | None:
        return registry.get_sample_value("drctl_failover_service_protected", {"service": "app"})

    await c.healthy()
    assert gauge() == 1
    await c.beat("east", "primary", 1, protected=False)
    await c.tick()
    assert gauge() == 0
    await c.tick()  # no write this tick: still set
    assert gauge() == 0
    await c.beat("east", "primary", 1, protected=True)
    await c.tick()
    assert gauge() == 1


async def test_a_new_leader_waits_for_a_primary_it_has_not_heard_from() -> None:
    # start-up: the agents register while the controller takes the lead; the primary's
    # agent puts its heartbeat only after its first role change (which waits for this
    # leader's first record): no unprotected -> primary_suspect flap meanwhile (a new
    # service is unprotected until its primary first reports its replica protected)
    c = Cluster(grace_seconds=2.0)
    c.controller.leader_since = time.monotonic()  # as _lead() does
    await c.beat("west", "replica", 1, data_path="running")
    await c.tick()
    assert c.record().state is State.UNPROTECTED and c.record().primary_lost_since is None
    c.controller.leader_since = time.monotonic() - c.cfg.lease_ttl - 1.5  # not TTL + grace
    await c.tick()
    assert c.record().state is State.UNPROTECTED
    await c.beat("east", "primary", 1, lag_seconds=0.1, protected=True, data_path="running")
    await c.tick()
    assert c.record().state is State.HEALTHY
    assert [(h["from"], h["to"]) for h in c.record().history] == [("unprotected", "healthy")]
    await c.silence("east")  # heard from, then silent: judged at once, as always
    await c.tick()
    assert c.record().state is State.PRIMARY_SUSPECT


async def test_a_primary_gone_before_a_new_leader_took_over_gets_its_grace_once() -> None:
    c = Cluster(grace_seconds=2.0, allow_data_loss=True)
    # a service whose replica was protected before (a new one is not: see below)
    await c.put_record(ServiceRecord(State.HEALTHY, time.time(), "east", "west",
                                     replica_consistent=True))
    await c.beat("west", "replica", 1, data_path="running")
    # one lease TTL (its lease ran out) and the grace period after the leadership began
    c.controller.leader_since = time.monotonic() - c.cfg.lease_ttl - 2.0
    await c.tick()
    rec = c.record()
    assert rec.state is State.PRIMARY_SUSPECT
    assert rec.primary_lost_since is not None and time.time() - rec.primary_lost_since >= 2.0
    await c.tick()  # the grace has run out already: not a second one
    assert c.record().state is State.FENCING


async def test_a_new_service_is_not_failed_over_before_its_replica_was_ever_protected(
) -> None:
    """The initial sync has not completed (the primary never reported its replica protected):
    losing the primary blocks (an automatic failover would promote an empty replica) and a
    plain manual failover is refused; --force still promotes it."""
    c = Cluster(grace_seconds=0.0, allow_data_loss=True)
    c.controller.leader_since = time.monotonic() - 10 * c.cfg.lease_ttl
    await c.beat("east", "primary", 1, data_path="running", protected=False,
                 resync={"mode": "hash", "bytes_total": 1, "bytes_left": 1})
    await c.beat("west", "replica", 1, data_path="running")
    await c.tick()
    await c.command(Command.FAILOVER)
    await c.tick()
    assert c.record().state is not State.FENCING
    assert "no consistent copy" in c.record().message
    await c.silence("east")
    for _ in range(3):
        await c.tick()
    assert c.record().state is State.BLOCKED, c.record()
    await c.command(Command.FORCE_FAILOVER)
    await c.tick()
    assert c.record().state is State.FENCING


async def test_a_manual_failover_to_a_dead_replica_is_refused_before_fencing() -> None:
    """The replica site is down: fencing the live primary would leave nothing serving, so the
    request is refused (even --force) and the primary keeps its role and epoch."""
    c = Cluster()
    await c.put_record(ServiceRecord(State.HEALTHY, time.time(), "east", "west",
                                     replica_consistent=True))
    await c.beat("east", "primary", 1, data_path="running", protected=True, lag_seconds=0.0)
    for command in (Command.FAILOVER, Command.FORCE_FAILOVER):
        await c.command(command)
        await c.tick()
        rec = c.record()
        assert rec.state in (State.HEALTHY, State.UNPROTECTED) and rec.epoch == 1, rec
        assert "replica site is not alive" in rec.message, rec.message
        assert not c.pending()


async def test_a_new_service_starts_unprotected_and_is_healthy_once_protected() -> None:
    """Before the primary's first protected report a new service says so (state, message,
    progress), in the record, and in the status before any controller wrote one; its history
    starts unprotected -> healthy (never healthy -> unprotected)."""
    c = Cluster()
    s = cluster_status(c.cfg, await c.store.snapshot(c.cfg.prefix), time.time())
    app = s["services"]["app"]
    assert (app["state"], app["lag_seconds"], app["history"]) == ("unprotected", None, [])
    assert "has not reported its replica protected yet" in app["message"]
    c.controller.leader_since = time.monotonic() - 10 * c.cfg.lease_ttl
    await c.beat("east", "primary", 1, data_path="running", protected=False,
                 resync={"mode": "exact", "bytes_total": 4 << 20, "bytes_left": 3 << 20})
    await c.beat("west", "replica", 1, data_path="running")
    for _ in range(2):
        await c.tick()
        rec = c.record()
        assert (rec.state, rec.replica_consistent, rec.history) == (State.UNPROTECTED, False,
                                                                     [])
    s = cluster_status(c.cfg, await c.store.snapshot(c.cfg.prefix), time.time())
    app = s["services"]["app"]
    assert app["state"] == "unprotected"
    assert "not receiving" in app["message"], app["message"]
    # (while the replica never held a consistent copy, that is the reason given, not the
    # primary's "not receiving")
    assert app["progress"][0] == ("unprotected: east has not reported west protected yet (it "
                                  "holds no consistent copy: a new service's initial sync, or "
                                  "a resync)")
    # no report yet (the agent starting): unknown is not protected for a new service
    await c.beat("east", "primary", 1, data_path="running")
    await c.tick()
    s = cluster_status(c.cfg, await c.store.snapshot(c.cfg.prefix), time.time())
    app = s["services"]["app"]
    assert app["state"] == "unprotected"
    assert "since the service was created" in app["summary"], app["summary"]
    assert app["progress"][0].startswith("unprotected: east has not reported west protected")
    await c.beat("east", "primary", 1, data_path="running", protected=True, lag_seconds=0.1)
    await c.tick()
    s = cluster_status(c.cfg, await c.store.snapshot(c.cfg.prefix), time.time())
    app = s["services"]["app"]
    assert (app["state"], app["history"]) == ("healthy", ["unprotected->healthy"])
    assert app["operations"][0]["operation"] is None  # no operation made that change


async def test_a_new_hooks_only_service_is_healthy_at_its_primarys_first_heartbeat() -> None:
    # a primary without a data path cannot report protection (its hooks replicate)
    c = Cluster()
    c.controller.leader_since = time.monotonic()  # (the primary's first heartbeat is awaited)
    await c.beat("west", "replica", 1)
    await c.tick()
    assert c.record().state is State.UNPROTECTED
    await c.beat("east", "primary", 1)
    await c.tick()
    assert c.record().state is State.HEALTHY


async def test_a_new_service_whose_primary_is_lost_blocks_and_comes_back_unprotected() -> None:
    c = Cluster(grace_seconds=0.0, allow_data_loss=True)
    c.controller.leader_since = time.monotonic() - 10 * c.cfg.lease_ttl
    await c.beat("east", "primary", 1, data_path="running", protected=False)
    await c.beat("west", "replica", 1, data_path="running")
    await c.tick()
    await c.silence("east")
    for _ in range(3):
        await c.tick()
        assert c.record().state in (State.PRIMARY_SUSPECT, State.BLOCKED)
    assert c.record().state is State.BLOCKED and c.record().epoch == 1
    assert "no consistent copy" in c.record().message
    await c.beat("east", "primary", 1, data_path="running", protected=False)
    await c.tick()
    assert c.record().state is State.UNPROTECTED
    assert all(h["to"] != "healthy" for h in c.record().history)


async def test_state_changes_name_the_operation_they_belong_to() -> None:
    c = Cluster()
    await c.healthy()
    await c.command(Command.SWITCHOVER)
    await c.tick()
    await c.beat("east", "primary", 1, lag_seconds=0.0, protected=True, barrier=True)
    await c.tick()
    await c.beat("east", "fenced", 2)
    await c.tick()
    await c.beat("west", "primary", 2, protected=False)
    await c.tick()
    await c.tick()
    rec = c.record()
    assert rec.state is State.FAILED_OVER and rec.operation is None
    switchover = {"kind": "switchover", "target": "west", "automatic": False,
                  "asked_by": None,  # (a command from an older drctl: nobody named)
                  "request_id": "op1"}  # the request's id (the page follows it by this)
    steps = [(h["from"], h["to"], h.get("operation")) for h in rec.history]
    assert steps == [("unprotected", "healthy", None),
                     ("healthy", "draining", switchover), ("draining", "fencing", switchover),
                     ("fencing", "promoting", switchover),
                     ("promoting", "rerouting", switchover),
                     ("rerouting", "failed_over", switchover)]
    s = cluster_status(c.cfg, await c.store.snapshot(c.cfg.prefix), time.time())
    app = s["services"]["app"]
    assert app["operations"][0] == {
        "at": rec.history[-1]["at"], "from": "rerouting", "to": "failed_over",
        "operation": {**switchover, "asked": "asked by an unknown user",
                      "label": "switchover to west"}, "request": None, "request_id": None}
    assert rec.last_operation is not None and rec.last_operation.outcome == "done"


async def test_the_operation_and_its_state_changes_name_who_asked() -> None:
    """An API user's request: the operation, its state changes and the status name the user
    and role, and when it was asked."""
    c = Cluster(stepped=True)
    await c.healthy()
    alice = Actor("alice", "operator", "api")
    await c.command(Command.SWITCHOVER, by=alice, at=1000.0)
    s = cluster_status(c.cfg, await c.store.snapshot(c.cfg.prefix), time.time())
    assert (s["services"]["app"]["pending"], s["services"]["app"]["pending_asked"]) == (
        "switchover", "asked by alice (operator)")
    await c.tick()
    rec = c.record()
    assert rec.state is State.DRAINING and rec.operation is not None
    assert (rec.operation.asked_by, rec.operation.asked_at) == (alice, 1000.0)
    assert not rec.operation.automatic
    assert rec.history[-1]["operation"]["asked_by"] == {"name": "alice", "role": "operator",
                                                        "via": "api"}
    app = cluster_status(c.cfg, await c.store.snapshot(c.cfg.prefix),
                         time.time())["services"]["app"]
    op = app["operation"]
    assert (op["current"], op["asked"], op["asked_at"]) == (True, "asked by alice (operator)",
                                                            1000.0)
    assert op["asked_by"] == {"name": "alice", "role": "operator", "via": "api"}
    assert app["operations"][0]["operation"]["asked"] == "asked by alice (operator)"
    assert operation_line(op, lambda t: f"T{t:.0f}").startswith(
        "operation: switchover to west, asked by alice (operator) at T1000; from east, "
        "started T")
    assert operation_line(op).endswith(": in progress")
    from failover.cli_control import status_lines

    lines = status_lines(cluster_status(c.cfg, await c.store.snapshot(c.cfg.prefix),
                                        time.time()))
    assert any(line.startswith("  operation: switchover to west, asked by alice (operator) "
                               "at ") for line in lines), lines
    # a failover overtaking the drain, asked by another user from the CLI: that change says so
    await c.command(Command.FAILOVER, by=Actor("bob@ops1", via="cli"), at=1010.0)
    await c.tick()
    rec = c.record()
    assert rec.state is State.FENCING and rec.operation is not None
    assert rec.operation.asked_by == alice  # (who started it)
    app = cluster_status(c.cfg, await c.store.snapshot(c.cfg.prefix),
                         time.time())["services"]["app"]
    assert app["operations"][0]["request"] == "failover asked by bob@ops1 (drctl CLI)"
    assert app["operation"]["later_requests"][-1]["asked"] == \
        "failover asked by bob@ops1 (drctl CLI)"


async def test_an_automatic_failover_names_the_controller() -> None:
    c = Cluster(stepped=True, grace_seconds=0)
    await c.healthy()
    await c.silence("east")
    await c.tick()  # primary_suspect
    await c.tick()  # its grace is over: fencing
    rec = c.record()
    assert rec.state is State.FENCING and rec.operation is not None
    assert rec.operation.automatic
    assert rec.operation.asked_by == Actor("c0", via="controller")
    app = cluster_status(c.cfg, await c.store.snapshot(c.cfg.prefix),
                         time.time())["services"]["app"]
    assert app["operation"]["asked"] == "automatic (controller c0)"
    assert app["operations"][0]["operation"]["asked"] == "automatic (controller c0)"
    assert "failover to west, automatic (controller c0) at " in operation_line(app["operation"])


def test_a_switchover_home_is_called_a_failback() -> None:
    """A failback is carried out as a switchover to the runbook's primary: the status names
    it what it was."""
    from failover.status import label

    assert label("switchover", "east", home="east") == "failback to east"
    assert label("switchover", "west", home="east") == "switchover to west"
    assert label("failover", "east", home="east") == "failover to east"
    assert label("resync", "east", home="east") == "resync of east"
    op = {"label": "failback to east", "kind": "switchover", "target": "east", "current": False,
          "asked": "asked by admin", "asked_at": 5.0, "source": "west",
          "started_at": 6.0, "outcome": "done"}
    assert operation_line(op, lambda t: f"T{t:.0f}") == (
        "last operation: failback to east, asked by admin at T5; from west, started "
        "T6: done")


async def test_the_status_says_why_it_shows_no_lag() -> None:
    """status.shown_lag: a lag while there is one (marked when the primary is silent), else
    none with the reason, which drctl status prints: no replica from the promotion until the
    former primary is back (and after an operation that failed past the swap), no consistent
    copy while the replica is resynced."""
    from failover.cli_control import status_lines

    c = Cluster(stepped=True)

    async def app() -> tuple[dict[str, Any], str]:
        s = cluster_status(c.cfg, await c.store.snapshot(c.cfg.prefix), time.time())
        (line,) = [x for x in status_lines(s) if x.startswith("service app:")]
        return s["services"]["app"], line

    await c.healthy()
    a, line = await app()
    assert (a["lag_seconds"], a["lag_stale"], a["lag_none"]) == (0.5, False, None)
    assert " lag=0.5s " in line, line
    await c.silence("east")
    a, line = await app()
    assert (a["lag_seconds"], a["lag_stale"], a["lag_none"]) == (0.5, True, None)
    assert " lag=0.5s(last reported) " in line, line
    rec = c.record()
    rec.state, rec.primary, rec.replica = State.FAILED_OVER, "west", "east"
    await c.put_record(rec)
    a, line = await app()
    assert (a["lag_seconds"], a["lag_none"]) == (None, "no_replica")
    assert " lag=none(no replica) " in line, line
    # failed after the roles were swapped: still no replica
    rec.state = State.FAILED
    rec.operation = Operation("failover", "east", "west", time.time(), error="dns: refused")
    await c.put_record(rec)
    a, line = await app()
    assert (a["lag_seconds"], a["lag_none"]) == (None, "no_replica")
    assert " lag=none(no replica) " in line, line
    # failed before the swap (the record still names the old primary): its lag stands
    rec.primary, rec.replica = "east", "west"
    await c.put_record(rec)
    a, _ = await app()
    assert (a["lag_seconds"], a["lag_none"]) == (0.5, None)
    rec.state, rec.operation, rec.replica_consistent = State.RESYNCING, None, False
    await c.put_record(rec)
    a, line = await app()
    assert (a["lag_seconds"], a["lag_none"]) == (None, "no_copy")
    assert " lag=none(no consistent copy) " in line, line


async def test_a_request_the_service_moves_past_is_judged_in_the_new_state() -> None:
    """A switchover asked while the primary is suspect, in the tick its grace runs out: the
    automatic failover starts as what it is (automatic, a failover), and the switchover is
    not taken as its cause. It stays pending one tick and is refused in the new state, with
    the reason, instead of vanishing."""
    c = Cluster(stepped=True, grace_seconds=0)
    await c.healthy()
    await c.silence("east")
    await c.tick()
    assert c.record().state is State.PRIMARY_SUSPECT
    await c.command(Command.SWITCHOVER, by=Actor("alice", "operator", "api"))
    await c.tick()  # the grace is over: fencing, by itself
    rec = c.record()
    assert rec.state is State.FENCING and rec.operation is not None
    assert (rec.operation.kind, rec.operation.automatic) == ("failover", True)
    assert rec.operation.asked_by == Actor("c0", via="controller")
    assert c.pending()  # judged next tick, in the state it is in now
    # the page follows its request by id: this move names none (it is not the request's)
    app = cluster_status(c.cfg, await c.store.snapshot(c.cfg.prefix),
                         time.time())["services"]["app"]
    assert app["operations"][0]["operation"]["request_id"] is None, app["operations"][0]
    message = await c.tick()
    assert not c.pending()
    assert "switchover refused: an operation is in progress (fencing)" in message, message
    # a failover asked in that same tick is what happens: it is taken up, and names who asked
    c = Cluster(stepped=True, grace_seconds=0)
    await c.healthy()
    await c.silence("east")
    await c.tick()
    await c.command(Command.FAILOVER, by=Actor("bob", "operator", "api"))
    await c.tick()
    rec = c.record()
    assert rec.state is State.FENCING and rec.operation is not None
    assert (rec.operation.kind, rec.operation.automatic) == ("failover", False)
    assert rec.operation.asked_by == Actor("bob", "operator", "api")
    assert not c.pending()
    app = cluster_status(c.cfg, await c.store.snapshot(c.cfg.prefix),
                         time.time())["services"]["app"]
    assert app["operations"][0]["operation"]["request_id"] == "op1", app["operations"][0]


async def test_a_move_with_a_refusal_is_audited_as_two_records() -> None:
    """A request refused while an operation moves on: the move's audit record names no
    request (it is not the refused one's), the refusal has a record of its own naming it."""
    from failover.audit import AuditLog, read_etcd

    c = Cluster(stepped=True, grace_seconds=0)
    c.controller.audit = AuditLog(c.store, c.cfg.prefix)
    await c.healthy()
    await c.silence("east")
    await c.tick()
    await c.tick()  # the grace is over: fencing, by itself
    assert c.record().state is State.FENCING
    await c.command(Command.SWITCHOVER, by=Actor("alice", "operator", "api"))
    while c.pending():
        await c.tick()
    records = [s.record for s in (await read_etcd(c.store, c.cfg.prefix)).slots]
    refusals = [r for r in records if r is not None and r["action"] == "controller.refuse"]
    assert len(refusals) == 1, records
    assert (refusals[0]["params"]["command"], refusals[0]["params"]["operation"]) == (
        "switchover", "op1"), refusals[0]
    assert "switchover refused: an operation is in progress" in refusals[0]["outcome"]
    # made in the tick the service moved on: the move is a record of its own
    assert (refusals[0]["params"]["from"], refusals[0]["params"]["to"]) == (
        "fencing", "promoting"), refusals[0]
    moves = [r for r in records if r is not None and r["action"] != "controller.refuse"]
    assert moves and all(r["params"]["command"] is None for r in moves), moves
