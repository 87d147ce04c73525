"""The runbook's steps as the program: the order they run in (and the orders rejected), the
operation plan the controller records, prechecks and controller hooks run by the controller
with their timeouts, agents' step reports, and ``depends_on`` between services (the
controller against the in-memory store; decisions tested on states, not on text)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import pytest

from failover.agent import SiteAgent
from failover.config import ClusterConfig, Hooks, ServiceConfig, Site, with_step_timeouts
from failover.controller import Controller
from failover.coordination.memory import MemoryStore
from failover.fsm import Command, Decision, Dependency, Policy, ServiceView, State, decide
from failover.records import (
    CommandRecord,
    Heartbeat,
    ServiceHealth,
    ServiceRecord,
    StepReport,
    audit_prefix,
    command_key,
    heartbeat_key,
    service_record,
    state_key,
)
from failover.steprun import Outcome
from failover.steps import Owner, StepKind, StepSpec, operation_plan, problems
from runbooks.loader import RunbookError, load
from tests.runbooks.helpers import TWO_SITES_DB

PROMOTE = StepSpec(StepKind.PROMOTE, "promote", Owner.NEW_PRIMARY)
DNS = StepSpec(StepKind.DNS, "dns")
LAG = StepSpec(StepKind.PRECHECK, "lag", check="replication_lag")
REACH = StepSpec(StepKind.PRECHECK, "reach", check="sites_reachable")


def hook(name: str, owner: Owner = Owner.CONTROLLER, run: str = "true",
         timeout: float = 30) -> StepSpec:
    return StepSpec(StepKind.HOOK, name, owner, run=run, timeout=timeout)


def health() -> StepSpec:
    return StepSpec(StepKind.HEALTH_CHECK, "up", Owner.NEW_PRIMARY, command="true")


# -- the order ------------------------------------------------------------------------------

def test_the_plan_adds_the_fence_and_a_switchovers_drain_where_they_run() -> None:
    steps = (LAG, hook("notify"), hook("stop", Owner.OLD_PRIMARY), PROMOTE,
             hook("start", Owner.NEW_PRIMARY), health(), hook("tell", Owner.CONTROLLER), DNS,
             hook("after"))
    failover = operation_plan(steps, switchover=False)
    assert [(p.spec.name, p.phase, p.index) for p in failover] == [
        ("lag", State.PREPARING, 0), ("notify", State.PREPARING, 1),
        ("fence", State.FENCING, None), ("stop", State.FENCING, 2),
        ("promote", State.PROMOTING, 3), ("start", State.PROMOTING, 4),
        ("up", State.PROMOTING, 5), ("tell", State.REROUTING, 6), ("dns", State.REROUTING, 7),
        ("after", State.REROUTING, 8)]
    switch = operation_plan(steps, switchover=True, drain_timeout=45)
    assert [p.spec.kind for p in switch][2:4] == [StepKind.WAIT_REPLICATION, StepKind.FENCE]
    assert switch[2].spec.timeout == 45 and switch[2].index is None
    explicit = (LAG, StepSpec(StepKind.WAIT_REPLICATION, "w", timeout=9), PROMOTE)
    assert [p.spec.name for p in operation_plan(explicit, False)] == ["lag", "fence", "promote"]
    assert [p.spec.name for p in operation_plan(explicit, True)] == ["lag", "w", "fence",
                                                                     "promote"]
    assert problems(steps, has_records=True) == []


@pytest.mark.parametrize(("steps", "index", "words"), [
    ((DNS, PROMOTE), 1, "runs on the new primary as it takes over"),
    ((PROMOTE, hook("stop", Owner.OLD_PRIMARY)), 1, "while the old primary is fenced"),
    ((PROMOTE, LAG), 1, "before anything changes"),
    ((hook("stop", Owner.OLD_PRIMARY), hook("x"), PROMOTE), 1, "not between them"),
    ((PROMOTE, hook("x"), hook("start", Owner.NEW_PRIMARY)), 1, "not between them"),
    ((PROMOTE, DNS, hook("start", Owner.NEW_PRIMARY)), 2, "after dns"),
    ((PROMOTE, PROMOTE), 1, "a second promote"),
    ((hook("x"),), None, "no promote step"),
])
def test_orders_that_cannot_run_as_listed_are_rejected(steps: tuple[StepSpec, ...],
                                                       index: int | None, words: str) -> None:
    got = problems(steps, has_records=False)
    assert any(i == index and (words in m or words.replace("after dns", "with dns") in m)
               for i, m in got), got


def test_dns_records_and_the_dns_step_go_together() -> None:
    assert problems((PROMOTE,), has_records=True) == [
        (None, "the service has dns records but no dns step (it says when they are "
               "rewritten)")]
    assert problems((PROMOTE, DNS), has_records=False)[0][0] == 1


RUNBOOK = TWO_SITES_DB + """\
    failover: {drain_timeout: 40}
    steps:
      - {type: promote}
      - {type: health_check, tcp: "10.0.0.2:5432"}
      - {type: hook, at: old_primary, run: "systemctl stop db"}
"""


def test_the_loader_names_the_file_line_and_step(tmp_path: Any) -> None:
    path = os.path.join(str(tmp_path), "runbook.yaml")
    with open(path, "w") as fh:
        fh.write(RUNBOOK)
    with pytest.raises(RunbookError) as info:
        load(path)
    (error,) = info.value.errors
    assert error.startswith(f"{path}:14: services.db.steps[2]: this hook runs while the old "
                            "primary is fenced, before promote, but it comes after "), error
    with open(path, "w") as fh:
        fh.write(RUNBOOK.replace("      - {type: hook, at: old_primary", "      #"))
    rb = load(path)
    assert rb.services["db"].drain_timeout == 40
    with open(path, "w") as fh:
        fh.write(RUNBOOK.replace("      - {type: hook, at: old_primary, run: \"systemctl stop "
                                 "db\"}", "      - {type: wait_replication, timeout: 9}"))
    with pytest.raises(RunbookError) as info:
        load(path)
    assert any("services.db.failover.drain_timeout: the drain's timeout is given twice" in e
               for e in info.value.errors), info.value.errors


def test_phase_timeouts_follow_the_steps_timeouts() -> None:
    steps = (LAG, hook("slow", timeout=300), hook("stop", Owner.OLD_PRIMARY, timeout=90),
             PROMOTE, StepSpec(StepKind.HEALTH_CHECK, "up", Owner.NEW_PRIMARY, tcp="x:1",
                               timeout=5, retries=12, interval=5), DNS)
    p = with_step_timeouts(Policy(), steps)
    assert p.prepare_timeout_seconds == 330 and p.fence_timeout_seconds == 150
    assert p.promote_timeout_seconds == 120 + 13 * 6 + 12 * 5


# -- decisions --------------------------------------------------------------------------------

BASE = ServiceView(state=State.HEALTHY, now=1000.0, primary_alive=True, primary_lost_since=None,
                   replica_alive=True, replica_lag_seconds=1.0, last_failover_at=None,
                   state_since=990.0, policy=Policy(grace_seconds=5, rpo_seconds=30,
                                                    damping_seconds=600))


def view(**kw: Any) -> ServiceView:
    return dataclasses.replace(BASE, **kw)


def test_prechecks_come_first_and_a_failure_stops_the_operation() -> None:
    assert decide(view(command=Command.FAILOVER, prepare=True)).next_state is State.PREPARING
    assert decide(view(command=Command.SWITCHOVER, prepare=True)).next_state is State.PREPARING
    suspect = view(state=State.PRIMARY_SUSPECT, primary_alive=False, primary_lost_since=990.0,
                   prepare=True)
    assert decide(suspect).next_state is State.PREPARING
    prep = view(state=State.PREPARING)
    assert decide(prep).next_state is State.PREPARING
    assert decide(dataclasses.replace(prep, step_done=True)).next_state is State.FENCING
    assert decide(dataclasses.replace(prep, step_done=True, switchover=True)
                  ).next_state is State.DRAINING
    assert decide(dataclasses.replace(prep, step_failed=True)).next_state is State.FAILED
    late = dataclasses.replace(prep, state_since=0.0)
    assert decide(late).next_state is State.FAILED  # past the phase's timeout


def dep(state: State, same_site: bool = True, **kw: Any) -> Dependency:
    return Dependency("db", state, same_site, **kw)


def test_a_dependent_waits_for_its_dependency_to_finish() -> None:
    asked = view(command=Command.FAILOVER)
    for d in (dep(State.HEALTHY, pending=True), dep(State.FENCING),
              dep(State.PROMOTING, same_site=False), dep(State.PRIMARY_SUSPECT)):
        got = decide(dataclasses.replace(asked, dependencies=(d,)))
        assert (got.next_state, got.refused, got.consumes_command) == (State.HEALTHY, False,
                                                                       False), d
        assert got.waiting
    for d in (dep(State.FAILED_OVER, same_site=False), dep(State.HEALTHY, same_site=False),
              dep(State.RESYNCING, same_site=False)):
        assert decide(dataclasses.replace(asked, dependencies=(d,))).next_state is \
            State.FENCING, d


def test_a_dependency_that_failed_or_stays_behind_stops_the_dependent() -> None:
    for d in (dep(State.FAILED, same_site=False, failed="promoting: hook failed"),
              dep(State.HEALTHY), dep(State.HEALTHY, pending=True, refused="no replica")):
        got: Decision = decide(view(command=Command.FAILOVER, dependencies=(d,)))
        assert (got.next_state, got.refused) == (State.HEALTHY, True), d
    auto = view(state=State.PRIMARY_SUSPECT, primary_alive=False, primary_lost_since=990.0,
                dependencies=(dep(State.BLOCKED),))
    assert decide(auto).next_state is State.BLOCKED
    blocked = dataclasses.replace(auto, state=State.BLOCKED)
    assert decide(blocked).next_state is State.BLOCKED
    moving = dataclasses.replace(blocked, dependencies=(dep(State.FENCING),))
    assert decide(moving).waiting and decide(moving).next_state is State.BLOCKED


# -- the controller -------------------------------------------------------------------------

SITES = {s: Site(s, a) for s, a in (("east", "10.0.0.1"), ("west", "10.0.0.2"))}


def service(name: str, steps: tuple[StepSpec, ...] = (PROMOTE,),
            depends_on: tuple[str, ...] = ()) -> ServiceConfig:
    return ServiceConfig(name, "east", "west", with_step_timeouts(Policy(), steps), (), Hooks(),
                         steps=steps, depends_on=depends_on)


class Deployment:
    def __init__(self, *services: ServiceConfig) -> None:
        self.cfg = ClusterConfig("t.yaml", "t", (), 2, SITES, {s.name: s for s in services})
        self.store = MemoryStore()
        self.controller = Controller(self.cfg, self.store, "c0")

    async def beat(self, site: str, **roles: tuple[str, int] | ServiceHealth) -> None:
        services = {n: r if isinstance(r, ServiceHealth) else
                    ServiceHealth(r[0], r[1], lag_seconds=0.1, protected=True,
                                  data_path="running" if r[0] in ("primary", "replica") else "")
                    for n, r in roles.items()}
        await self.store.put(heartbeat_key(self.cfg.prefix, site),
                             Heartbeat(site, time.time(), services).encode())

    async def silence(self, site: str) -> None:
        key = heartbeat_key(self.cfg.prefix, site)
        await self.store.delete_if(key, self.store.entries[key].mod_revision)

    async def command(self, svc: str, command: Command) -> None:
        rec = CommandRecord(command, None, "op1", time.time())
        assert await self.store.create(command_key(self.cfg.prefix, svc), rec.encode())

    def pending(self, svc: str) -> bool:
        return command_key(self.cfg.prefix, svc) in self.store.entries

    def record(self, svc: str) -> ServiceRecord:
        return service_record(self.store.entries[state_key(self.cfg.prefix, svc)].value,
                              "east", "west")

    async def tick(self) -> None:
        await self.controller.tick()

    async def healthy(self) -> None:
        names = list(self.cfg.services)
        await self.beat("east", **{n: ("primary", 1) for n in names})
        await self.beat("west", **{n: ("replica", 1) for n in names})
        await self.tick()


async def test_a_failed_precheck_fails_the_operation_before_anything_changes() -> None:
    d = Deployment(service("app", (LAG, hook("note", run="echo noted"), PROMOTE)))
    await d.healthy()
    await d.beat("east", app=ServiceHealth("primary", 1, lag_seconds=99.0, protected=True,
                                           data_path="running"))
    await d.tick()
    await d.command("app", Command.SWITCHOVER)  # (a failover this far behind is refused)
    await d.tick()
    rec = d.record("app")
    assert rec.state is State.PREPARING and rec.epoch == 1 and rec.operation is not None
    assert [r.status for r in rec.operation.steps] == ["failed", "pending", "pending",
                                                      "pending", "pending"]
    await d.tick()
    rec = d.record("app")
    assert (rec.state, rec.epoch, rec.operation and rec.operation.failed_step) == (
        State.FAILED, 1, "preparing")
    assert "lag 99.0s beyond the 30s RPO budget" in str(rec.operation and rec.operation.error)
    assert rec.operation is not None
    lag = rec.operation.steps[0]
    assert (lag.kind, lag.name, lag.status, lag.phase) == ("precheck", "lag", "failed",
                                                          "preparing")
    await d.command("app", Command.CANCEL)
    await d.tick()
    rec = d.record("app")
    assert (rec.state, rec.operation, rec.primary) == (State.HEALTHY, None, "east")
    assert rec.last_operation is not None and rec.last_operation.outcome == "cancelled"


async def test_an_automatic_failover_stops_if_the_primary_comes_back_before_the_fence(
        ) -> None:
    svc = service("app", (LAG, hook("note"), PROMOTE))
    d = Deployment(dataclasses.replace(svc, policy=dataclasses.replace(svc.policy,
                                                                       grace_seconds=0)))
    await d.healthy()
    await d.silence("east")
    await d.tick()  # primary_suspect
    await d.tick()  # its grace is over: the prechecks (a bare tick runs them inline)
    rec = d.record("app")
    assert rec.state is State.PREPARING and rec.operation is not None
    assert rec.operation.automatic
    await d.beat("east", app=("primary", 1))  # back before anything was fenced
    await d.tick()
    rec = d.record("app")
    assert (rec.state, rec.epoch, rec.primary, rec.operation) == (State.HEALTHY, 1, "east",
                                                                  None)
    last = rec.last_operation
    assert last is not None and last.outcome == "cancelled"
    assert [(r.name, r.status) for r in last.steps] == [
        ("lag", "done"), ("note", "done"), ("fence", "skipped"), ("promote", "skipped")]


async def test_a_failover_asked_for_goes_on_while_the_primary_is_alive() -> None:
    d = Deployment(service("app", (LAG, hook("note"), PROMOTE)))
    await d.healthy()
    await d.command("app", Command.FAILOVER)
    await d.tick()
    rec = d.record("app")
    assert rec.state is State.PREPARING and rec.operation is not None
    assert not rec.operation.automatic
    await d.tick()
    assert (d.record("app").state, d.record("app").epoch) == (State.FENCING, 2)


async def test_the_fence_of_a_site_gone_says_it_is_assumed() -> None:
    d = Deployment(service("app", (hook("stop", Owner.OLD_PRIMARY), PROMOTE)))
    await d.healthy()
    await d.command("app", Command.FAILOVER)
    await d.tick()
    assert d.record("app").state is State.FENCING
    await d.silence("east")
    await d.tick()
    rec = d.record("app")
    assert rec.state is State.PROMOTING and rec.operation is not None
    fence, stop = rec.operation.steps[:2]
    assert (fence.status, stop.status) == ("skipped", "skipped")
    assert fence.output.startswith("assumed: ") and "did not run here" in stop.output


def old_record(state: State, **operation: Any) -> bytes:
    """A service record as drctl wrote it before operations had steps."""
    operation = {"kind": "failover", "source": "east", "target": "west", "started_at": 1.0,
                 "dns_done": False, "failed_step": None, "error": None, **operation}
    rec: dict[str, Any] = {
        "state": state.value, "since": time.time(), "primary": "west", "replica": "east",
        "epoch": 2, "last_failover_at": None, "primary_lost_since": None,
        "last_lag_seconds": 0.1, "message": "", "history": [], "operation": operation}
    return json.dumps(rec).encode()


def test_an_operation_recorded_without_steps_gets_the_services_plan() -> None:
    from failover.operation import with_plan

    svc = service("app", (hook("stop", Owner.OLD_PRIMARY), PROMOTE, DNS))
    rec = ServiceRecord.decode(old_record(State.REROUTING))
    assert rec.operation is not None and rec.operation.steps == []
    with_plan(rec, svc)
    assert [(r.name, r.phase, r.status) for r in rec.operation.steps] == [
        ("fence", "fencing", "done"), ("stop", "fencing", "done"),
        ("promote", "promoting", "done"), ("dns", "rerouting", "pending")]
    rec = ServiceRecord.decode(old_record(State.PROMOTING))
    with_plan(rec, svc)
    assert rec.operation is not None
    assert [r.status for r in rec.operation.steps] == ["done", "done", "running", "pending"]
    rec = ServiceRecord.decode(old_record(State.REROUTING, dns_done=True))
    with_plan(rec, svc)
    assert rec.operation is not None and rec.operation.steps[-1].status == "done"
    rec = ServiceRecord.decode(old_record(State.FAILED, failed_step="promoting"))
    with_plan(rec, svc)
    assert rec.operation is not None
    assert [r.status for r in rec.operation.steps] == ["done", "done", "pending", "pending"]


async def test_an_operation_recorded_without_steps_still_rewrites_dns(
        monkeypatch: pytest.MonkeyPatch) -> None:
    rewritten: list[str] = []

    async def rewrite(records: Any, address: str) -> str:
        rewritten.append(address)
        return f"app A -> {address}"

    monkeypatch.setattr("failover.operation.rewrite_dns", rewrite)
    d = Deployment(service("app", (PROMOTE, DNS)))
    await d.store.put(state_key(d.cfg.prefix, "app"), old_record(State.REROUTING))
    await d.beat("west", app=("primary", 2))
    await d.tick()
    await d.tick()
    rec = d.record("app")
    assert (rec.state, rewritten) == (State.FAILED_OVER, ["10.0.0.2"])
    assert rec.last_operation is not None and rec.last_operation.dns_done
    assert [(r.name, r.status) for r in rec.last_operation.steps] == [
        ("fence", "done"), ("promote", "done"), ("dns", "done")]


class _DataPath(SiteAgent):
    """An agent whose data path's fence and promote are recorded (hooks run as usual)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.ran: list[str] = []

    async def run_step(self, svc: ServiceConfig, rec: ServiceRecord, spec: StepSpec,
                       env: dict[str, str]) -> Outcome:
        self.ran.append(spec.name)
        if spec.kind in (StepKind.FENCE, StepKind.PROMOTE):
            return Outcome("done", "data path")
        return await super().run_step(svc, rec, spec, env)


async def test_an_operation_recorded_without_steps_still_promotes_the_data_path() -> None:
    svc = service("app", (PROMOTE, hook("start", Owner.NEW_PRIMARY)))
    d = Deployment(svc)
    await d.store.put(state_key(d.cfg.prefix, "app"), old_record(State.PROMOTING))
    agent = _DataPath(d.cfg, "west", d.store)
    snap = await d.store.snapshot_without(d.cfg.prefix, audit_prefix(d.cfg.prefix))
    await agent.follow(svc, agent.record(snap, svc))
    assert agent.ran == ["promote", "start"]
    assert (agent.roles["app"].role, agent.roles["app"].epoch) == ("primary", 2)
    assert [(r.index, r.status) for r in agent.reports["app"].values()] == [(1, "done"),
                                                                           (2, "done")]


async def test_a_site_without_a_data_path_says_what_its_fence_and_promote_did() -> None:
    from failover.operation import new_operation

    bare = service("app", (PROMOTE,))
    hooked = service("app", (hook("stop", Owner.OLD_PRIMARY), PROMOTE,
                             hook("start", Owner.NEW_PRIMARY)))
    for svc, status in ((bare, "skipped"), (hooked, "done")):
        d = Deployment(svc)
        for site, state, owner, want in (("east", State.FENCING, Owner.OLD_PRIMARY, "fenced"),
                                         ("west", State.PROMOTING, Owner.NEW_PRIMARY,
                                          "primary")):
            agent = SiteAgent(d.cfg, site, d.store)
            rec = ServiceRecord(state, 0.0, "west" if want == "primary" else "east",
                                "east" if want == "primary" else "west", epoch=2)
            rec.operation = new_operation(svc, "failover", "east", "west", 0.0)
            assert await agent.run_operation(svc, rec, owner, want)  # over: the role follows
            reports = agent.reports["app"]
            first = reports[min(reports)]
            assert (first.name, first.status) == ("fence" if owner is Owner.OLD_PRIMARY
                                                  else "promote", status), first
            assert all(r.status == "done" for i, r in reports.items() if i != min(reports))
            if status == "skipped":
                assert "no data path and no hooks at this site" in first.output


async def test_a_controller_hook_past_its_timeout_is_killed_and_its_output_kept() -> None:
    slow = hook("slow", run="echo started; echo secret-$DRCTL_SERVICE; sleep 30", timeout=0.5)
    d = Deployment(service("app", (REACH, slow, PROMOTE)))
    await d.healthy()
    await d.command("app", Command.FAILOVER)
    t0 = time.monotonic()
    await d.tick()  # a bare tick runs the controller's steps inline
    assert time.monotonic() - t0 < 10
    rec = d.record("app")
    assert rec.operation is not None
    reach, run = rec.operation.steps[:2]
    assert (reach.status, reach.output) == ("done", "west alive (heartbeat in etcd)")
    assert (run.status, run.error) == ("failed", "timed out after 0.5s: killed")
    assert run.output == "started\nsecret-app"
    await d.tick()
    assert d.record("app").state is State.FAILED


async def test_agent_reports_fill_the_record_and_a_failed_hook_fails_the_step() -> None:
    steps = (PROMOTE, hook("start", Owner.NEW_PRIMARY))
    d = Deployment(service("app", steps))
    await d.healthy()
    await d.command("app", Command.FAILOVER)
    await d.tick()
    await d.beat("east", app=("fenced", 2))
    await d.tick()
    assert d.record("app").state is State.PROMOTING
    fail = StepReport(2, "start", 2, 0, "failed", 0.2, "no such unit", "exit status 5")
    done = StepReport(1, "promote", 2, 0, "done", 0.1, "ok")
    await d.beat("west", app=ServiceHealth("replica", 1, steps=[dataclasses.asdict(done),
                                                                 dataclasses.asdict(fail)]))
    await d.tick()
    rec = d.record("app")
    assert rec.state is State.FAILED and rec.operation is not None
    assert [(r.name, r.status) for r in rec.operation.steps] == [
        ("fence", "done"), ("promote", "done"), ("start", "failed")]
    assert rec.operation.steps[2].output == "no such unit"
    assert "step 3 (hook 'start') on west failed: exit status 5" in str(rec.operation.error)
    await d.tick()  # waiting for an operator: the failed step stays recorded as it was
    assert (d.record("app").operation or rec.operation).failed_step == "promoting"
    await d.command("app", Command.RETRY)
    await d.tick()
    rec = d.record("app")
    assert rec.state is State.PROMOTING and rec.operation is not None
    assert (rec.operation.attempt, rec.operation.steps[2].status) == (1, "running")


async def test_a_request_moves_the_dependencies_first_and_waits_for_them() -> None:
    d = Deployment(service("db"), service("app", depends_on=("db",)))
    await d.healthy()
    await d.command("app", Command.FAILOVER)
    await d.tick()
    db, app = d.record("db"), d.record("app")
    assert (db.state, db.operation and db.operation.requested_for) == (State.FENCING, "app")
    assert app.state is State.HEALTHY and d.pending("app")  # held: the request stays
    assert app.waiting_for and "db" in app.waiting_for
    await d.beat("east", db=("fenced", 2), app=("primary", 1))
    await d.tick()
    await d.beat("west", db=("primary", 2), app=("replica", 1))
    await d.tick()
    assert d.record("db").state is State.REROUTING and d.record("app").state is State.HEALTHY
    await d.tick()  # db: failed over (no dns); app starts in the same tick
    assert d.record("db").state is State.FAILED_OVER
    app = d.record("app")
    assert (app.state, app.epoch, app.waiting_for, d.pending("app")) == (State.FENCING, 2, None,
                                                                         False)


async def test_a_dependency_that_fails_stops_its_dependent_with_the_reason() -> None:
    d = Deployment(service("db", (PROMOTE, hook("start", Owner.NEW_PRIMARY))),
                   service("app", depends_on=("db",)))
    await d.healthy()
    await d.command("app", Command.SWITCHOVER)
    await d.tick()
    assert d.record("db").state is State.DRAINING and d.pending("app")
    await d.beat("east", db=ServiceHealth("primary", 1, lag_seconds=0.0, protected=True,
                                          barrier=True, data_path="running"),
                 app=("primary", 1))
    await d.tick()
    await d.beat("east", db=("fenced", 2), app=("primary", 1))
    await d.tick()
    fail = StepReport(2, "start", 2, 0, "failed", 0.1, "", "exit status 1")
    await d.beat("west", db=ServiceHealth("replica", 1, steps=[dataclasses.asdict(fail)]),
                 app=("replica", 1))
    await d.tick()
    assert d.record("db").state is State.FAILED
    await d.tick()
    app = d.record("app")
    assert app.state is State.HEALTHY and not d.pending("app")
    assert "switchover refused: its dependency db failed (promoting:" in app.message


def test_the_grant_stays_with_the_primary_until_the_epoch_is_bumped(deployment: Any) -> None:
    """An operation that prepares or drains has not bumped the epoch: the primary's capture
    agent still presents the record's token at each handshake, so it must stay the
    primary's."""
    from drctl.epochtoken import Signer, Verifier
    from failover.operation import new_operation

    svc = dataclasses.replace(service("app", (LAG, PROMOTE)), volumes=("data",))
    d = Deployment(svc)
    d.controller.signer = Signer.load(os.path.join(deployment.dir, "epoch.key"))
    verify = Verifier.load(os.path.join(deployment.dir, "epoch.pub")).verify
    rec = ServiceRecord(State.PREPARING, 0.0, "east", "west")
    rec.operation = new_operation(svc, "switchover", "east", "west", 0.0)
    d.controller._grant(rec, svc)
    assert (verify(rec.epoch_token).site, verify(rec.epoch_token).epoch) == ("east", 1)
    rec.epoch, rec.operation.fenced = 2, True
    d.controller._grant(rec, svc)
    assert (verify(rec.epoch_token).site, verify(rec.epoch_token).epoch) == ("west", 2)


def test_a_steps_output_is_bounded_and_secrets_are_masked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from failover.steprun import env_secrets, tail

    monkeypatch.setenv("DB_PASSWORD", "hunter22secret")
    assert "hunter22secret" in env_secrets()
    got = tail("x" * 5000 + " pw=hunter22secret tsig=c2VjcmV0 end",
               [*env_secrets(), "c2VjcmV0"])
    assert got.startswith("...") and got.endswith("pw=*** tsig=*** end") and len(got) == 1003
