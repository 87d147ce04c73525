"""An operation's steps in the service record: written when it starts (the plan,
failover/steps.py), filled in as they run, kept as ``last_operation`` once it is over.

The controller runs its own steps here (``ControllerSteps``: prechecks, controller hooks,
dns), in the phase and order the plan gives them, each in a task of the leader's task group
(a lost lease cancels them; the next leader runs a step recorded as running again, from the
start: a hook may run twice, so hooks must be idempotent). The agents' steps come back in
their heartbeats (``take_reports``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from failover.config import DnsConfig, ServiceConfig
from failover.dns.rfc2136 import DnsUpdater
from failover.errors import FailoverError
from failover.fsm import Decision, State
from failover.records import (
    Heartbeat,
    Operation,
    ServiceRecord,
    StepReport,
    StepRun,
)
from failover.steprun import Outcome, run_step, tail
from failover.steps import PHASES, Owner, StepKind, StepSpec

log = logging.getLogger(__name__)
_OVER = ("done", "skipped")


def new_operation(svc: ServiceConfig, kind: str, source: str, target: str, now: float,
                  forced: bool = False) -> Operation:
    """An operation and its plan (the steps ``drctl runbook plan`` prints, in that order)."""
    steps = [StepRun(p.spec.name, p.spec.kind, p.spec.owner, p.phase, p.index)
             for p in svc.plan(kind == "switchover")]
    return Operation(kind, source, target, now, steps=steps, forced=forced,
                     fenced=False)


def with_plan(rec: ServiceRecord, svc: ServiceConfig) -> ServiceRecord:
    """``rec``, its operation given the service's plan when it was recorded by a drctl from
    before operations had steps (it decodes with none, and no steps would count as all done:
    the service would move on without promoting the data path or rewriting DNS). The phases
    before the one it is in were over (the record moves past a phase only then); its DNS step
    is done if the older controller recorded it (``dns_done``); the rest runs as in a new
    operation. The controller writes the plan into the record at its next write."""
    op = rec.operation
    if op is None or op.steps or op.kind not in ("failover", "switchover"):
        return rec
    at = State(op.failed_step) if rec.state is State.FAILED and op.failed_step else rec.state
    if at not in PHASES:
        return rec
    op.steps = new_operation(svc, op.kind, op.source, op.target, op.started_at).steps
    for run in op.steps:
        if PHASES.index(State(run.phase)) < PHASES.index(at):
            run.status, run.output = "done", "its phase was over before the operation's " \
                                              "steps were recorded (an older drctl)"
        elif run.kind == StepKind.DNS and op.dns_done:
            run.status, run.output = "done", "rewritten before the operation's steps were " \
                                              "recorded (an older drctl)"
    if rec.state is at:
        begin_phase(op, at, rec.since)
    return rec


def phase_done(op: Operation | None, phase: State) -> bool:
    """Every step of ``phase`` is over (done or skipped)."""
    return op is not None and all(r.status in _OVER for r in op.steps if r.phase == phase)


def settle(op: Operation | None, phase: State, status: str, output: str) -> None:
    """Steps of ``phase`` not over yet are ``status`` (the phase ended without them: the
    agent reported its role only once they were done, or the old primary is gone)."""
    for run in op.steps if op is not None else ():
        if run.phase == phase and run.status not in _OVER:
            run.status, run.output = status, run.output or output


def begin_phase(op: Operation | None, phase: State, now: float) -> None:
    """The phase starts: the steps its agents run (and the drain) are running from now
    (the controller's own steps are marked as each one starts)."""
    mine = (State.PREPARING, State.REROUTING)
    if op is None:
        return
    for run in op.steps:
        if run.phase == phase and run.status == "pending" and not (
                run.owner == Owner.CONTROLLER and phase in mine):
            run.status, run.started_at, run.attempt = "running", now, op.attempt


def retry(op: Operation) -> None:
    """An operator's retry: the steps that failed or did not finish run again."""
    op.error = op.failed_step = None
    op.attempt += 1
    for run in op.steps:
        if run.status not in _OVER:
            run.status, run.error = "pending", None


def finish(rec: ServiceRecord, outcome: str) -> None:
    """The operation is over: kept as ``last_operation`` (its steps' outcomes stay readable
    in the record), none in progress."""
    if rec.operation is not None:
        rec.operation.outcome = outcome
        for run in rec.operation.steps:
            if run.status in ("pending", "running"):
                run.status = "skipped" if run.status == "pending" else "failed"
        rec.last_operation = rec.operation
    rec.operation = None


def cancel(rec: ServiceRecord, why: str) -> None:
    """The operation is called off before anything changed (``why``): its steps not run are
    skipped, one running was killed (failed); kept as the last operation, ``cancelled``."""
    for run in rec.operation.steps if rec.operation is not None else ():
        if run.status == "running":
            run.status, run.error = "failed", f"killed: {why}"
        elif run.status == "pending":
            run.status, run.output = "skipped", why
    finish(rec, "cancelled")


def take_reports(op: Operation, epoch: int, hb: Heartbeat | None, service: str,
                 owner: Owner) -> None:
    """Copy the outcomes an agent reports for its steps of this run into the operation; a
    failed step stops the operation (``error``: the FSM's failed path)."""
    health = hb.services.get(service) if hb is not None else None
    for raw in health.steps if health is not None else []:
        rep = StepReport.from_dict(raw)
        if rep.epoch != epoch or rep.attempt != op.attempt or not 0 <= rep.index < len(op.steps):
            continue
        run = op.steps[rep.index]
        if run.owner != owner or run.status in _OVER:
            continue
        run.attempt, run.seconds = rep.attempt, rep.seconds
        if rep.status == "waiting":  # the data path is not up yet: again at the next tick
            run.status, run.output = "running", rep.error or ""
            continue
        run.status, run.output, run.error = rep.status, rep.output, rep.error
        if rep.status == "failed" and op.error is None:
            site = op.source if owner is Owner.OLD_PRIMARY else op.target
            op.error = f"step {rep.index + 1} ({run.title}) on {site} failed: " \
                       f"{rep.error}"


def fenced(op: Operation, alive: bool) -> None:
    """Fencing is over: the old primary reported itself fenced (its steps reported done),
    or it is gone: its steps did not run as steps (nothing reported them), its fence is
    assumed (its lease expired; an agent stops writing when it loses its lease, and runs its
    fence hooks if it still can: nobody here knows)."""
    if alive:
        settle(op, State.FENCING, "done", f"{op.source} reported itself fenced")
        return
    settle(op, State.FENCING, "skipped", f"assumed: {op.source}'s lease expired (an agent "
           "that loses its lease stops writing); its hooks did not run here")


def drained(d: Decision, rec: ServiceRecord, asked_failover: bool, now: float) -> None:
    """The drain is over: fenced behind the barrier, overtaken by a failover request, or
    abandoned (timed out, the primary lost: the switchover is over, kept as the last
    operation)."""
    op = rec.operation
    assert op is not None
    drains = [r for r in op.steps if r.phase == State.DRAINING]
    for run in drains:
        run.seconds = round(now - (run.started_at or now), 3)
    if d.next_state is State.FENCING:
        if asked_failover:
            op.kind = "failover"
        for run in drains:
            run.status = "skipped" if asked_failover else "done"
            run.output = ("a failover was requested during the drain" if asked_failover else
                          "replica lag 0 behind the write barrier: no data loss")
        return
    for run in drains:
        run.status, run.error = "failed", d.message
    finish(rec, "abandoned")


def record_failure(d: Decision, rec: ServiceRecord) -> None:
    """The failed step (for a retry) and why (a timeout's reason is the decision itself)."""
    if rec.operation is None:  # a resync has no operation of its own until it fails
        rec.operation = Operation("resync", rec.primary, rec.replica, rec.since)
    rec.operation.failed_step = d.state.value
    if rec.operation.error is None:
        rec.operation.error = d.message


@dataclass
class StepContext:
    """What the controller's steps of one service need, from the tick's snapshot."""

    rec: ServiceRecord
    svc: ServiceConfig
    address: str  # the new primary's address (the dns step)
    alive: dict[str, bool]  # sites with a heartbeat
    env: dict[str, str] = field(default_factory=dict)
    secrets: list[str] = field(default_factory=list)


def precheck(spec: StepSpec, ctx: StepContext) -> Outcome:
    op, rec, policy = ctx.rec.operation, ctx.rec, ctx.svc.policy
    assert op is not None
    if spec.check == "sites_reachable":
        needed = [op.target] + ([op.source] if op.kind == "switchover" else [])
        down = [s for s in needed if not ctx.alive.get(s)]
        if down:
            return Outcome("failed", error=f"no heartbeat from {', '.join(down)}: its agent is "
                                           "not running or cannot reach etcd")
        return Outcome("done", f"{', '.join(needed)} alive (heartbeat in etcd)")
    lag, budget = rec.last_lag_seconds, policy.rpo_seconds
    said = "unknown" if lag is None else f"{lag:.1f}s"
    if op.forced or policy.allow_data_loss:
        why = "failover --force" if op.forced else "allow_data_loss"
        return Outcome("done", f"replication lag {said}, RPO budget {budget:g}s: data loss "
                               f"accepted ({why})")
    if lag is None:
        return Outcome("failed", error="replication lag unknown (the primary has not reported "
                                       "it; failover --force accepts the risk)")
    if lag > budget:
        return Outcome("failed", error=f"replication lag {said} beyond the {budget:g}s RPO "
                                       "budget (failover --force accepts the loss)")
    return Outcome("done", f"replication lag {said} within the {budget:g}s RPO budget")


async def rewrite_dns(records: tuple[DnsConfig, ...], address: str) -> str:
    """Every record of the service pointed at ``address``: one signed UPDATE per update
    server, then every authoritative server polled until it answers it."""
    lines = []
    for d in records:
        rrset = d.for_address(address)
        updater = DnsUpdater(d.tsig())
        await updater.replace(rrset, d.update)
        await updater.verify(rrset, d.servers, d.verify_timeout)
        lines.append(f"{rrset.name}.{rrset.zone} {rrset.rtype} -> {address}: updated on "
                     f"{', '.join(map(str, d.update))}, verified on "
                     f"{', '.join(map(str, d.servers))}")
    return "\n".join(lines)


async def _dns_step(ctx: StepContext) -> Outcome:
    t0 = time.monotonic()
    try:
        out = await rewrite_dns(ctx.svc.dns, ctx.address)
    except FailoverError as exc:  # refused, not verified in time
        return Outcome("failed", error=tail(str(exc), ctx.secrets, 500),
                       seconds=round(time.monotonic() - t0, 3))
    return Outcome("done", out, seconds=round(time.monotonic() - t0, 3))


async def _run(spec: StepSpec, ctx: StepContext) -> Outcome:
    """One controller step; never raises (a task of the leader's group must not)."""
    try:
        if spec.kind is StepKind.PRECHECK:
            return precheck(spec, ctx)
        if spec.kind is StepKind.DNS:
            return await _dns_step(ctx)
        return await run_step(spec, {**ctx.env, "DRCTL_STEP": spec.name}, ctx.secrets)
    except Exception as exc:  # a surprise: the step failed, the controller goes on
        log.exception("%s: step %s", ctx.svc.name, spec.name)
        return Outcome("failed", error=tail(f"{type(exc).__name__}: {exc}", ctx.secrets, 300))


class ControllerSteps:
    """The leader's steps of every operation in progress: one at a time per operation, in
    the plan's order. With ``group`` unset (a bare ``Controller.tick()``, as in tests), a
    step runs to its end inside the tick."""

    def __init__(self) -> None:
        self.group: asyncio.TaskGroup | None = None
        self.wake: Callable[[], None] | None = None  # a task ended: tick again now
        self._tasks: dict[tuple[str, float, int, int], asyncio.Task[Outcome]] = {}

    def cancel(self, service: str | None = None) -> None:
        """Cancel the steps running (of ``service``, or all): their hooks are killed."""
        for key in [k for k in self._tasks if service in (None, k[0])]:
            self._tasks.pop(key).cancel()

    async def advance(self, ctx: StepContext, now: float) -> None:
        """Record the outcome of the phase's step that ended, then start the next one."""
        rec, svc = ctx.rec, ctx.svc
        op = rec.operation
        if op is None or op.error or rec.state not in (State.PREPARING, State.REROUTING):
            self.cancel(svc.name)  # a step of an operation no longer running it (timed out)
            return
        for index, run in enumerate(op.steps):
            if run.phase != rec.state or run.owner != Owner.CONTROLLER or run.status in _OVER:
                continue
            key = (svc.name, op.started_at, op.attempt, index)
            task = self._tasks.get(key)
            if task is not None and not task.done():
                return
            if task is None:
                spec = svc.steps[run.spec] if run.spec is not None else None
                if spec is None or (spec.kind, spec.name) != (run.kind, run.name):
                    got = Outcome("failed", error=f"step {index + 1} {run.name!r} is not in "
                                                  "this controller's runbook")
                else:
                    run.status, run.started_at, run.attempt = "running", now, op.attempt
                    log.info("%s: step %d %s %s", svc.name, index + 1, spec.kind, spec.name)
                    coro = _run(spec, ctx)
                    if self.group is not None:
                        self._start(key, coro)
                        return
                    got = await coro
            else:
                del self._tasks[key]
                got = task.result()
            _record(run, got, op, index)
            if got.status != "done":
                return

    def _start(self, key: tuple[str, float, int, int],
               coro: Coroutine[Any, Any, Outcome]) -> None:
        assert self.group is not None
        task = self.group.create_task(coro)
        self._tasks[key] = task
        if self.wake is not None:
            wake = self.wake
            task.add_done_callback(lambda _t: wake())


def _record(run: StepRun, got: Outcome, op: Operation, index: int) -> None:
    run.status, run.output, run.error, run.seconds = got.status, got.output, got.error, \
        got.seconds
    if run.kind == StepKind.DNS and got.status == "done":
        op.dns_done = True
    if got.status != "done" and op.error is None:
        op.error = f"step {index + 1} ({run.title}) failed: {got.error}"
