"""The steps of an operation (failover, switchover, failback) and the order they run in.

A service's steps come from its runbook in the order listed (``StepSpec``); each runs in one
phase of the state machine, by one owner:

  phase       owner                       steps
  preparing   the controller              precheck, controller hooks (before anything changes)
  draining    the controller              wait_replication (switchover only: the drain)
  fencing     the old primary's agent     fence (added: the epoch is bumped, the old primary
                                          stops writing), old_primary hooks
  promoting   the new primary's agent     promote, new_primary hooks, health checks
  rerouting   the controller              controller hooks, dns

The listed order must follow the phases (``problems()`` says where it does not), so
``operation_plan()`` (what ``drctl runbook plan`` prints) is exactly the order the steps run:
the controller records it in the operation, each owner runs its steps in that order and
reports each one's outcome (failover/records.py ``StepRun``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from failover.fsm import State


class StepKind(StrEnum):
    PRECHECK = "precheck"
    HOOK = "hook"
    WAIT_REPLICATION = "wait_replication"
    FENCE = "fence"  # not listed in a runbook: added before the old primary's steps
    PROMOTE = "promote"
    HEALTH_CHECK = "health_check"
    DNS = "dns"


class Owner(StrEnum):
    CONTROLLER = "controller"
    OLD_PRIMARY = "old_primary"
    NEW_PRIMARY = "new_primary"


CHECKS = ("replication_lag", "sites_reachable")


@dataclass(frozen=True)
class StepSpec:
    kind: StepKind
    name: str
    owner: Owner = Owner.CONTROLLER
    run: str | None = None  # hook: the shell command
    check: str | None = None  # precheck: one of CHECKS
    http: str | None = None  # health_check: exactly one of http / tcp / command
    tcp: str | None = None
    command: str | None = None
    timeout: float = 30.0
    retries: int = 0
    interval: float = 1.0

    def budget(self) -> float:
        """The longest this step may take (its own timeouts; 0: an instant or data-path
        step, bounded by the phase's allowance)."""
        if self.kind is StepKind.HEALTH_CHECK:
            return (self.retries + 1) * (self.timeout + 1) + self.retries * self.interval
        if self.kind in (StepKind.HOOK, StepKind.WAIT_REPLICATION):
            return self.timeout
        return 0.0


def owner_of(kind: StepKind) -> Owner:
    """Who runs a step that is not a hook (a hook's owner is its ``at:``)."""
    return {StepKind.FENCE: Owner.OLD_PRIMARY, StepKind.PROMOTE: Owner.NEW_PRIMARY,
            StepKind.HEALTH_CHECK: Owner.NEW_PRIMARY}.get(kind, Owner.CONTROLLER)


PHASES = (State.PREPARING, State.DRAINING, State.FENCING, State.PROMOTING, State.REROUTING)
_WHEN = {
    State.PREPARING: "before anything changes (with the prechecks)",
    State.DRAINING: "while a switchover drains",
    State.FENCING: "while the old primary is fenced, before promote",
    State.PROMOTING: "on the new primary as it takes over (promote, its hooks and health "
                     "checks)",
    State.REROUTING: "after the new primary's steps (with dns)",
}
ORDER = ("steps run in this order: prechecks and controller hooks; wait_replication; "
         "old_primary hooks; promote; new_primary hooks and health checks; controller hooks "
         "and dns")


def _fixed_phase(s: StepSpec) -> State | None:
    if s.kind is StepKind.HOOK:
        return {Owner.OLD_PRIMARY: State.FENCING, Owner.NEW_PRIMARY: State.PROMOTING}.get(
            s.owner)
    return {StepKind.PRECHECK: State.PREPARING, StepKind.WAIT_REPLICATION: State.DRAINING,
            StepKind.FENCE: State.FENCING, StepKind.PROMOTE: State.PROMOTING,
            StepKind.HEALTH_CHECK: State.PROMOTING, StepKind.DNS: State.REROUTING}[s.kind]


def phases(steps: Sequence[StepSpec]) -> tuple[list[State], list[tuple[int, str]]]:
    """Each listed step's phase, and every ordering problem as (index, message). A controller
    hook takes the phase of its place: with the prechecks (nothing but prechecks and
    controller hooks before it) or with dns (after promote, nothing of the new primary's
    after it)."""
    fixed = [_fixed_phase(s) for s in steps]
    out: list[State] = []
    problems: list[tuple[int, str]] = []
    for i, phase in enumerate(fixed):
        if phase is None:
            before = {p for p in fixed[:i] if p is not None}
            after = {p for p in fixed[i + 1:] if p is not None}
            if before <= {State.PREPARING}:
                phase = State.PREPARING
            elif State.PROMOTING in before and after <= {State.REROUTING}:
                phase = State.REROUTING
            else:
                problems.append((i, "a controller hook runs before anything changes (before "
                                    "wait_replication, the old primary's hooks and promote) or "
                                    "after the new primary's steps, not between them; "
                                    f"{ORDER}"))
                phase = max(before, key=PHASES.index)
        out.append(phase)
    top = 0
    for i, phase in enumerate(out):
        if PHASES.index(phase) < PHASES.index(out[top]):
            s, t = steps[i], steps[top]
            problems.append((i, f"this {s.kind} runs {_WHEN[phase]}, but it comes after "
                                f"{t.kind} {t.name!r}, which runs {_WHEN[out[top]]}; {ORDER}"))
        elif PHASES.index(phase) > PHASES.index(out[top]):
            top = i
    return out, problems


def problems(steps: Sequence[StepSpec], has_records: bool) -> list[tuple[int | None, str]]:
    """Everything that keeps ``steps`` from running as listed (index None: the list)."""
    out: list[tuple[int | None, str]] = list(phases(steps)[1])
    kinds = [s.kind for s in steps]
    for kind, why in ((StepKind.PROMOTE, "a service is promoted once"),
                      (StepKind.DNS, "one dns step rewrites every record of the service"),
                      (StepKind.WAIT_REPLICATION, "a switchover drains once")):
        for i in [i for i, k in enumerate(kinds) if k is kind][1:]:
            out.append((i, f"a second {kind} step: {why}"))
    if StepKind.PROMOTE not in kinds:
        out.append((None, "no promote step"))
    if has_records and StepKind.DNS not in kinds:
        out.append((None, "the service has dns records but no dns step (it says when they "
                          "are rewritten)"))
    if not has_records and StepKind.DNS in kinds:
        out.append((kinds.index(StepKind.DNS), "a dns step, but the service has no dns "
                                               "records to rewrite"))
    return out


FENCE_STEP = StepSpec(StepKind.FENCE, "fence", Owner.OLD_PRIMARY)


@dataclass(frozen=True)
class Planned:
    """One step of an operation: ``index`` is its place in the service's listed steps (None:
    added by drctl: the fence, or the drain of a switchover that lists no wait_replication)."""

    spec: StepSpec
    index: int | None
    phase: State


def operation_plan(steps: Sequence[StepSpec], switchover: bool,
                   drain_timeout: float = 120.0) -> list[Planned]:
    """The steps an operation runs, in order: the listed ones in their phases (a failover
    skips wait_replication), the fence before the old primary's steps and, for a switchover
    that lists none, a drain after the prechecks."""
    listed, _ = phases(steps)
    explicit_drain = any(s.kind is StepKind.WAIT_REPLICATION for s in steps)
    out: list[Planned] = []
    drained = fenced = False
    for i, (spec, phase) in enumerate(zip(steps, listed, strict=True)):
        rank = PHASES.index(phase)
        if spec.kind is StepKind.WAIT_REPLICATION and not switchover:
            continue
        if switchover and not explicit_drain and not drained and rank > 0:
            out.append(Planned(StepSpec(StepKind.WAIT_REPLICATION, "drain", timeout=drain_timeout),
                               None, State.DRAINING))
            drained = True
        if not fenced and rank >= PHASES.index(State.FENCING):
            out.append(Planned(FENCE_STEP, None, State.FENCING))
            fenced = True
        out.append(Planned(spec, i, phase))
    return out


def phase_budget(plan: Sequence[Planned], phase: State) -> float:
    """The sum of the steps' own timeouts in ``phase`` (the phase's timeout adds an allowance
    for what the steps do not bound: the data path, DNS verification)."""
    return sum(p.spec.budget() for p in plan if p.phase is phase)
