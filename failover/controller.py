"""The controller (`drctl controller`): leader election, then one tick per interval.

Each tick: read one snapshot -> build a ServiceView per service -> ``decide()`` (pure) -> act
-> write the service record with compare-and-set -> log one line (``CycleResult.message``).
Every step's progress is recorded in etcd, so a leader killed mid-failover is replaced by one
that reads the record and carries on (a step it finds running runs again from its start: the
runbook's hooks must be idempotent). Leader-only work runs in a lease-scoped task group:
losing the lease cancels it.

Services are decided dependencies first (``depends_on``), each view carrying what the same
snapshot says of its dependencies; a request on a service is inherited by the dependencies
that share its site and would be left behind (``_inherit``), so they move first. The
operation's own steps (prechecks, controller hooks, dns) run in failover/operation.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import urllib.request
from dataclasses import dataclass, field, replace

from drctl.epochtoken import Signer
from failover.audit import AuditLog
from failover.config import ClusterConfig, ServiceConfig
from failover.coordination.base import CoordinationStore, Entry, Snapshot
from failover.coordination.feed import ChangeFeed
from failover.errors import LeaseLostError, StoreUnavailableError
from failover.fsm import (
    IDLE_STATES,
    START_STATES,
    Action,
    Command,
    Decision,
    Dependency,
    ServiceView,
    State,
    decide,
)
from failover.heartbeat_view import observe_heartbeats
from failover.history import history_step, later_request, note_request
from failover.lease import Election
from failover.metrics import ControllerMetrics
from failover.operation import (
    ControllerSteps,
    StepContext,
    begin_phase,
    cancel,
    drained,
    fenced,
    finish,
    new_operation,
    phase_done,
    record_failure,
    retry,
    settle,
    take_reports,
    with_plan,
)
from failover.records import (
    Actor,
    CommandRecord,
    Heartbeat,
    Operation,
    ServiceHealth,
    ServiceRecord,
    audit_prefix,
    command_key,
    heartbeat_key,
    leader_key,
    refuse_target,
    service_record,
    state_key,
)
from failover.steps import Owner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CycleResult:
    service: str
    state: State
    action: Action
    message: str
    notable: bool = True  # worth a log line: an action, a state change or a refusal


@dataclass
class _Seen:
    """One service as the tick's snapshot shows it, and the request it acts on: its own
    (``entry``: the command key, deleted once consumed) or one inherited from a dependent
    (``inherited_from``)."""

    rec: ServiceRecord
    rev: int
    entry: Entry | None
    cmd: CommandRecord | None
    view: ServiceView
    inherited_from: str | None = None
    refused: str | None = None  # its request was refused in this tick: why
    extra: dict[str, object] = field(default_factory=dict)


_FAILOVERS = (Command.FAILOVER, Command.FORCE_FAILOVER)
_REQUESTS = (*_FAILOVERS, Command.SWITCHOVER)


class Controller:
    def __init__(self, config: ClusterConfig, store: CoordinationStore,
                 node: str | None = None, metrics: ControllerMetrics | None = None) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.node = node or f"{os.uname().nodename}-{os.getpid()}"
        self.actor = Actor(self.node, via="controller")  # who starts automatic operations
        self.interval = max(0.1, config.lease_ttl / 4)
        self.audit: AuditLog | None = None  # set by `drctl controller`: one record a decision
        # set by `drctl controller --tls-dir`: the epoch tokens in the records are signed
        self.signer: Signer | None = None
        self.leader_since: float | None = None  # monotonic: when _lead() began (_silent_since)
        self._heard: set[str] = set()  # sites heard from (a heartbeat) since then
        self.steps = ControllerSteps()
        self._alive: dict[str, bool] = {}  # sites with a heartbeat in this tick's snapshot
        self.order = _dependencies_first(config)
        self.dependents = {n: [d for d in self.order if n in config.services[d].depends_on]
                           for n in config.services}
        self.prepares = {n: any(p.phase is State.PREPARING for p in svc.plan(False))
                         for n, svc in config.services.items()}

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        election = Election(self.store, leader_key(self.config.prefix), self.node,
                            self.config.lease_ttl)
        while not stop.is_set():
            try:
                leadership = await election.campaign()
            except StoreUnavailableError as exc:
                log.warning("controller %s: cannot campaign: %s", self.node, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
                continue
            if self.metrics is not None:
                self.metrics.leader.set(1)
            try:
                async with asyncio.TaskGroup() as tg:
                    keep = tg.create_task(leadership.keeper.run())
                    try:
                        async with leadership.scope() as scope:
                            scope.spawn(self._lead(stop))
                    finally:
                        keep.cancel()
            except* (LeaseLostError, StoreUnavailableError) as group:
                log.warning("controller %s: stepping down: %s", self.node, group.exceptions[0])
            if self.metrics is not None:
                self.metrics.leader.set(0)
            if stop.is_set():
                await leadership.keeper.revoke()

    async def _lead(self, stop: asyncio.Event) -> None:
        self.leader_since, self._heard = time.monotonic(), set()
        feed = ChangeFeed(self.store, self.config.prefix)
        follow = asyncio.create_task(feed.run())
        try:
            async with asyncio.TaskGroup() as steps:  # the operations' controller steps
                self.steps.group, self.steps.wake = steps, feed.changed.set
                try:
                    said: dict[str, tuple[str, str]] = {}  # per service: the last line
                    while not stop.is_set():
                        for result in await self.tick():
                            line = (str(result.state), result.message)
                            # one line per change: not one per tick while a resync or a step
                            # runs ("resync in progress")
                            if result.notable and said.get(result.service) != line:
                                log.info("%s: %s", result.service, result.message)
                            said[result.service] = line
                        await feed.wait(self.interval)
                finally:
                    self.steps.cancel()
                    self.steps.group = self.steps.wake = None
        finally:
            follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follow

    # -- one tick --------------------------------------------------------------------------

    async def tick(self) -> list[CycleResult]:
        snap = await self.store.snapshot_without(self.config.prefix,
                                                 audit_prefix(self.config.prefix))
        now = time.time()
        self._alive = {s: self._heartbeat(snap, s) is not None for s in self.config.sites}
        seen = {n: await self._observe(snap, self.config.services[n], now) for n in self.order}
        self._inherit(seen)
        results = []
        for name in self.order:  # dependencies first: their outcome in this tick is known
            s = seen[name]
            s.view = replace(s.view, dependencies=self._dependencies(name, seen))
            results.append(await self._service(snap, self.config.services[name], s, now))
        if self.metrics is not None:
            for site in self.config.sites:
                hb = self._heartbeat(snap, site)
                self.metrics.heartbeat(site, hb.at if hb else None)
        return results

    def _silent_since(self, site: str, svc: ServiceConfig, now: float) -> float | None:
        """Since when ``site``, a primary without a heartbeat, counts as silent; None while
        it is too soon to say. A new leader that has not heard from it yet waits one lease
        TTL (an agent starting up puts its key only after its first role change, which
        waits for this leader's first record; a primary lost just before has its lease
        run out) plus the grace period, and then counts it silent since that TTL's end: a
        primary that is really gone is not given its grace twice."""
        if self.leader_since is None or site in self._heard:
            return now
        waited = time.monotonic() - self.leader_since
        if waited < self.config.lease_ttl + svc.policy.grace_seconds:
            return None
        return now - (waited - self.config.lease_ttl)

    def _unjudged(self, d: Decision, rec: ServiceRecord, requested: bool) -> Decision:
        """``d``, unless it judges a silence too soon: a move to primary_suspect, or (a new
        leader resuming a stored primary_suspect or blocked record) an automatic failover
        (``requested``: the move is a request's) before this leader has waited one lease TTL
        for the primary's heartbeat."""
        resumed = (d.state in (State.PRIMARY_SUSPECT, State.BLOCKED)
                   and d.next_state is State.FENCING and not d.refused
                   and not requested and rec.primary not in self._heard
                   and self.leader_since is not None
                   and time.monotonic() - self.leader_since < self.config.lease_ttl)
        if resumed:
            return Decision(d.state, d.state, Action.WAIT, f"{d.state}: a new leader waits "
                            f"one lease TTL for {rec.primary}'s heartbeat before failing over")
        if (rec.primary_lost_since is not None or d.next_state is not State.PRIMARY_SUSPECT
                or d.state is State.PRIMARY_SUSPECT):
            return d
        return Decision(d.state, d.state, Action.NONE, f"{d.state}: waiting for {rec.primary}'s "
                        "first heartbeat (a new leader)")

    def _record(self, snap: Snapshot, svc: ServiceConfig) -> tuple[ServiceRecord, int]:
        key = state_key(self.config.prefix, svc.name)
        entry = snap.entries.get(key)
        rec = service_record(entry.value if entry else None, svc.primary, svc.replica,
                             time.time())
        return with_plan(rec, svc), entry.mod_revision if entry else 0

    def _heartbeat(self, snap: Snapshot, site: str) -> Heartbeat | None:
        raw = snap.value(heartbeat_key(self.config.prefix, site))
        return Heartbeat.decode(raw) if raw is not None else None

    def _health(self, snap: Snapshot, site: str, service: str) -> ServiceHealth | None:
        hb = self._heartbeat(snap, site)
        return hb.services.get(service) if hb is not None else None

    async def _observe(self, snap: Snapshot, svc: ServiceConfig, now: float) -> _Seen:
        rec, rev = self._record(snap, svc)
        cmd_entry = snap.entries.get(command_key(self.config.prefix, svc.name))
        cmd = CommandRecord.decode(cmd_entry.value) if cmd_entry else None
        primary_hb = self._heartbeat(snap, rec.primary)
        replica_hb = self._heartbeat(snap, rec.replica)
        if primary_hb is not None:
            self._heard.add(rec.primary)
            rec.primary_lost_since = None
        elif rec.primary_lost_since is None:
            rec.primary_lost_since = self._silent_since(rec.primary, svc, now)
        protected, barrier, no_data_path = observe_heartbeats(rec, svc.name, primary_hb, replica_hb)
        op = rec.operation
        if op is not None and rec.state in (State.FENCING, State.PROMOTING):
            owner, site = ((Owner.OLD_PRIMARY, op.source) if rec.state is State.FENCING
                           else (Owner.NEW_PRIMARY, op.target))
            take_reports(op, rec.epoch, self._heartbeat(snap, site), svc.name, owner)
        await self.steps.advance(self._context(svc, rec), now)
        view = ServiceView(
            state=rec.state, now=now, primary_alive=primary_hb is not None,
            primary_lost_since=rec.primary_lost_since, replica_alive=replica_hb is not None,
            replica_lag_seconds=rec.last_lag_seconds, last_failover_at=rec.last_failover_at,
            state_since=rec.since, command=cmd.command if cmd else Command.NONE,
            step_done=await self._step_done(rec, snap, svc),
            step_failed=bool(op and op.error and rec.state is not State.FAILED),
            has_dns=bool(svc.dns),
            failed_step=State(op.failed_step) if op and op.failed_step else None,
            policy=svc.policy, protected=protected, barrier=barrier, no_data_path=no_data_path,
            replica_consistent=rec.replica_consistent, prepare=self.prepares[svc.name],
            switchover=op is not None and op.kind == "switchover",
            automatic=op is not None and op.automatic)
        return _Seen(rec, rev, cmd_entry, cmd, view)

    def _context(self, svc: ServiceConfig, rec: ServiceRecord) -> StepContext:
        op = rec.operation
        env = {"DRCTL_SERVICE": svc.name, "DRCTL_EPOCH": str(rec.epoch),
               "DRCTL_CONTROLLER": self.node}
        if op is not None:
            env.update(DRCTL_OPERATION=op.kind, DRCTL_OLD_PRIMARY=op.source,
                       DRCTL_NEW_PRIMARY=op.target, DRCTL_SITE=op.target,
                       DRCTL_SITE_ADDRESS=self.config.sites[op.target].address)
        return StepContext(rec, svc, self.config.sites[rec.primary].address,
                           dict(self._alive), env, self.config.secrets())

    def _inherit(self, seen: dict[str, _Seen]) -> None:
        """A service with no request of its own takes up a dependent's failover or
        switchover when that dependent would start it now and both leave the same site for
        the same one: the dependency moves first (the dependent waits for it)."""
        for name in reversed(self.order):  # dependents first: inheritance runs down chains
            s = seen[name]
            if s.cmd is not None or s.rec.state not in IDLE_STATES:
                continue
            for dependent in self.dependents[name]:
                d = seen[dependent]
                if d.cmd is None or d.cmd.command not in _REQUESTS \
                        or d.rec.primary != s.rec.primary \
                        or (d.cmd.target or d.rec.replica) != s.rec.replica:
                    continue
                trial = decide(replace(d.view, command=d.cmd.command))
                if trial.refused or trial.keeps_command or trial.next_state not in START_STATES:
                    continue  # (keeps_command: the dependent moves by itself, not as asked)
                s.cmd = CommandRecord(d.cmd.command, s.rec.replica, d.cmd.id, d.cmd.at,
                                      d.cmd.by)
                s.inherited_from = d.inherited_from or dependent
                s.view = replace(s.view, command=d.cmd.command)
                break

    def _dependencies(self, name: str, seen: dict[str, _Seen]) -> tuple[Dependency, ...]:
        me = seen[name]
        out = []
        for dep in self.config.services[name].depends_on:
            d = seen[dep]
            op = d.rec.operation
            failed = (f"{op.failed_step}: {op.error}" if d.rec.state is State.FAILED and op
                      is not None and op.kind in ("failover", "switchover") else None)
            out.append(Dependency(dep, d.rec.state, d.rec.primary == me.rec.primary,
                                  pending=d.cmd is not None, refused=d.refused, failed=failed))
        return tuple(out)

    def _decision(self, svc: ServiceConfig, s: _Seen) -> tuple[Decision, CommandRecord | None]:
        """The decision on the service, and the request it acts on (None: refused)."""
        cmd, view = s.cmd, s.view
        refusal = None
        if cmd is not None and cmd.command in _REQUESTS:
            refusal = refuse_target(s.rec, svc.name, "switchover" if cmd.command is
                                    Command.SWITCHOVER else "failover", cmd.target)
        if refusal is None:
            decision = decide(view)
        else:  # consumed, nothing else changes: the state's own work goes on without it
            decision = decide(replace(view, command=Command.NONE))
            decision = replace(decision, refused=True, message=f"{decision.message}; {refusal}")
        if decision.keeps_command or decision.refused:
            cmd = None  # refused, or a move that is the service's own: the request drives nothing
        decision = self._unjudged(decision, s.rec, requested=cmd is not None)
        if s.inherited_from is not None:
            decision = replace(decision, message=f"{decision.message} (requested for "
                               f"{s.inherited_from}, which depends on {svc.name})")
        return decision, cmd

    async def _service(self, snap: Snapshot, svc: ServiceConfig, s: _Seen,
                       now: float) -> CycleResult:
        rec, rev, cmd_entry = s.rec, s.rev, s.entry
        decision, cmd = self._decision(svc, s)
        if s.inherited_from is not None or decision.keeps_command:
            cmd_entry = None  # the dependent's request, or one the move was not made for:
            # it stays pending (and is not named as the move's cause)
        if decision.refused and s.cmd is not None:
            s.refused = decision.message
        rec.waiting_for = decision.waiting
        before = rec.operation  # (a move that ends the operation takes it off the record)
        later = later_request(decision, cmd)
        await self._act(decision, rec, svc, cmd, now, s.inherited_from)
        if decision.changes and self.metrics is not None:
            self.metrics.transitions.labels(svc.name, decision.next_state.value).inc()
        if decision.changes:
            step = history_step(decision, rec.operation or before, later, now)
            rec.history = [*rec.history, step][-20:]
            rec.state, rec.since = decision.next_state, now
            if rec.state in (State.PREPARING, State.REROUTING):  # its first step, now
                await self.steps.advance(self._context(svc, rec), now)
        notable = decision.action is not Action.NONE or decision.changes or decision.refused
        if rev and not decision.changes and not decision.refused and _same(
                rec, snap, state_key(self.config.prefix, svc.name)):
            # nothing worth a write (a write would wake every watcher, us included)
            if self.metrics is not None:
                self.metrics.service(svc.name, rec.state, rec.epoch, rec.last_lag_seconds)
            return CycleResult(svc.name, rec.state, decision.action, decision.message, notable)
        rec.message = decision.message
        written = await self.store.compare_and_set(state_key(self.config.prefix, svc.name),
                                                   rec.encode(), rev)
        if written and cmd_entry is not None and decision.consumes_command:
            await self.store.delete_if(cmd_entry.key, cmd_entry.mod_revision)
        if not written:
            return CycleResult(svc.name, rec.state, Action.NONE,
                               "record changed under us: deciding again next tick", False)
        await self._audit(decision, rec, svc.name, cmd_entry)
        if self.metrics is not None:
            self.metrics.service(svc.name, rec.state, rec.epoch, rec.last_lag_seconds)
        return CycleResult(svc.name, rec.state, decision.action, decision.message, notable)

    async def _audit(self, d: Decision, rec: ServiceRecord, service: str,
                     cmd_entry: Entry | None) -> None:
        """One audit record per decision that moves the service or refuses a command; a
        move made with a refusal is two (the move names no request: it is not the
        refused one's)."""
        if self.audit is None or not (d.changes or d.refused):
            return
        asked = CommandRecord.decode(cmd_entry.value) if cmd_entry is not None else None

        async def append(kind: str, cmd: CommandRecord | None) -> None:
            assert self.audit is not None
            await self.audit.try_append(
                f"controller:{self.node}", kind, service,
                {"from": d.state.value, "to": d.next_state.value, "epoch": rec.epoch,
                 "primary": rec.primary, "replica": rec.replica,
                 "command": cmd.command.value if cmd else None,
                 "command_target": cmd.target if cmd else None,
                 "operation": cmd.id if cmd else None}, d.message)

        if d.changes:
            await append("controller.transition" if d.action is Action.NONE
                         else f"controller.{d.action}", None if d.refused else asked)
        if d.refused:
            await append("controller.refuse", asked)

    async def _step_done(self, rec: ServiceRecord, snap: Snapshot, svc: ServiceConfig) -> bool:
        op = rec.operation
        if rec.state in (State.PREPARING, State.REROUTING):
            return phase_done(op, rec.state)
        if rec.state is State.FENCING and op is not None:
            old = self._heartbeat(snap, op.source)
            if old is None:
                # Its lease expired: the agent fenced itself before that. The witness (the old
                # primary site's health endpoint, if configured) must agree: a service still
                # answering there was not stopped, and promoting now would make two primaries.
                return not await self._witness_says_serving(op.source)
            health = old.services.get(svc.name)
            return health is not None and health.role == "fenced" and health.epoch >= rec.epoch
        if rec.state is State.PROMOTING and op is not None:
            health = self._health(snap, op.target, svc.name)
            return health is not None and health.role == "primary" and health.epoch >= rec.epoch
        if rec.state is State.RESYNCING:
            # done when the new primary says its replica is protected at this epoch and the
            # former primary follows as the replica at this epoch
            serving = self._health(snap, rec.primary, svc.name)
            back = self._health(snap, rec.replica, svc.name)
            # (an agent that runs no data path, hooks only, reports protected None: there is
            # nothing it could resync, the replica following is all there is to wait for)
            return (serving is not None and serving.role == "primary"
                    and serving.protected is not False and serving.epoch >= rec.epoch
                    and back is not None and back.role == "replica" and back.epoch >= rec.epoch)
        return False

    async def _witness_says_serving(self, site: str) -> bool:
        url = self.config.sites[site].health_url
        if not url:
            return False

        def probe() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=1.0) as r:
                    return 200 <= int(r.status) < 300
            except OSError:
                return False

        serving = await asyncio.to_thread(probe)
        if serving:
            log.warning("witness: %s still answers at %s: not promoting until it stops", site,
                        url)
        return serving

    async def _act(self, d: Decision, rec: ServiceRecord, svc: ServiceConfig,
                   cmd: CommandRecord | None, now: float, inherited: str | None = None) -> None:
        if d.changes:
            self._leave(d, rec, svc, cmd, now, inherited)
            self._enter(d, rec, svc, now)
            begin_phase(rec.operation, d.next_state, now)
        self._grant(rec, svc)

    def _leave(self, d: Decision, rec: ServiceRecord, svc: ServiceConfig,
               cmd: CommandRecord | None, now: float, inherited: str | None) -> None:
        """What leaving ``d.state`` does to the operation: one starts (from an idle state),
        is retried or cancelled (from failed; an automatic one from preparing, its primary
        back), or its drain ends."""
        if d.state is State.PREPARING and d.next_state is State.HEALTHY:
            self.steps.cancel(svc.name)  # a controller hook still running is killed
            cancel(rec, "the primary came back before the fence")
        elif d.state is State.FAILED:
            note_request(rec.operation, later_request(d, cmd))
            if d.next_state is State.HEALTHY:
                finish(rec, "cancelled")  # abandoned, the roles stay as recorded
            elif rec.operation is not None:
                retry(rec.operation)  # an operator retry: run the failed steps again
        elif d.state in IDLE_STATES and d.next_state in START_STATES:
            rec.operation = self._start(d, rec, svc, cmd, now, inherited)
        elif d.state is State.DRAINING and rec.operation is not None:
            note_request(rec.operation, later_request(d, cmd))
            drained(d, rec, cmd is not None and cmd.command in _FAILOVERS, now)

    def _enter(self, d: Decision, rec: ServiceRecord, svc: ServiceConfig, now: float) -> None:
        op = rec.operation
        if d.next_state is State.FENCING and d.state is not State.FAILED:
            rec.epoch += 1  # from now on the replica refuses the old primary's deltas
            if op is None:  # a drain an older controller started
                op = rec.operation = new_operation(svc, "switchover", rec.primary,
                                                   rec.replica, now)
            op.fenced = True
        elif d.next_state is State.PROMOTING and op is not None:
            fenced(op, bool(self._alive.get(op.source)))
            rec.primary, rec.replica = op.target, op.source
        elif d.next_state is State.REROUTING and op is not None:
            settle(op, State.PROMOTING, "done", f"{op.target} reported itself primary")
        elif d.next_state is State.FAILED_OVER:
            rec.last_failover_at = now
            finish(rec, "done")
        elif d.next_state is State.FAILED:
            record_failure(d, rec)
            if rec.operation is not None and rec.operation.kind == "resync" \
                    and rec.operation.asked_by is None:  # the resync's, made just now
                rec.operation.asked_by = self.actor
                rec.operation.asked_at = now
        elif d.next_state is State.RESYNCING:
            rec.replica_consistent = False  # the former primary is overwritten block by block
        elif d.state is State.RESYNCING and d.next_state is State.HEALTHY:
            rec.operation = None  # a retried resync's record

    def _start(self, d: Decision, rec: ServiceRecord, svc: ServiceConfig,
               cmd: CommandRecord | None, now: float, inherited: str | None) -> Operation:
        """The operation a move out of an idle state starts, with its plan."""
        target = (cmd.target if cmd and cmd.target else None) or rec.replica
        switch = d.next_state is State.DRAINING or (
            cmd is not None and cmd.command is Command.SWITCHOVER)
        op = new_operation(svc, "switchover" if switch else "failover", rec.primary, target,
                           now, forced=cmd is not None and cmd.command is Command.FORCE_FAILOVER)
        op.requested_for = inherited
        op.automatic = cmd is None  # the grace expired: nobody asked for it
        # who asked (None: a drctl from before commands said so), or this controller
        op.asked_by, op.asked_at = (self.actor, now) if cmd is None else (cmd.by, cmd.at)
        op.request_id = cmd.id if cmd is not None else None
        return op

    def _grant(self, rec: ServiceRecord, svc: ServiceConfig) -> None:
        """Sign the epoch's grant to the site that is primary at it (the failover's target
        from the moment the epoch is bumped), again whenever the stored token is missing,
        for other fields or from another key (a rotation)."""
        if self.signer is None or not svc.volumes:
            return
        op = rec.operation
        # (an operation still preparing or draining has not bumped the epoch: the primary
        # keeps its grant, its capture agent presents it at every handshake)
        site = (op.target if op is not None and op.kind in ("failover", "switchover")
                and op.fenced and rec.primary == op.source else rec.primary)
        if not self.signer.current(rec.epoch_token, svc.name, svc.volumes, site, rec.epoch):
            rec.epoch_token = self.signer.sign(svc.name, svc.volumes, site, rec.epoch)


def _dependencies_first(config: ClusterConfig) -> list[str]:
    """The services in an order where each comes after what it depends on (the runbook
    loader rejects cycles; a cluster.yaml has no dependencies)."""
    out: list[str] = []

    def visit(name: str) -> None:
        if name not in out:
            for dep in config.services[name].depends_on:
                visit(dep)
            out.append(name)

    for name in config.services:
        visit(name)
    return out


def _same(rec: ServiceRecord, snap: Snapshot, key: str) -> bool:
    """Does the stored record already say everything ``rec`` says (ignoring the message)?"""
    raw = snap.value(key)
    if raw is None:
        return False
    stored = ServiceRecord.decode(raw)
    stored.message = rec.message
    return stored == rec
