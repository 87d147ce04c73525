"""The failover state machine of one service, as an explicit table.

Every allowed move is one ``Transition(src, dst, reason, action)`` row in ``TRANSITIONS``; an
unknown (src, dst) pair raises InvalidTransition. ``decide()`` is pure: it reads an immutable
``ServiceView`` (one etcd snapshot plus the clock) and returns a ``Decision``; the controller
acts on it and logs ``decision.message``. The diagram in docs/failover-fsm.dot is generated
from the table (``python -m failover.fsm --dot``) and CI checks it is current.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from enum import StrEnum

from failover.errors import InvalidTransition


class State(StrEnum):
    HEALTHY = "healthy"  # primary serving, replica replicating
    PRIMARY_SUSPECT = "primary_suspect"  # primary heartbeat missing, inside the grace period
    BLOCKED = "blocked"  # automatic failover not allowed now (RPO, damping): operator decides
    DRAINING = "draining"  # planned switchover: waiting for replication lag to reach zero
    FENCING = "fencing"  # epoch bumped; waiting until the old primary cannot write any more
    PROMOTING = "promoting"  # the replica becomes primary (warm journal applied first)
    REROUTING = "rerouting"  # DNS rewritten, waiting for every authoritative server
    FAILED_OVER = "failed_over"  # serving from the former replica; old primary not back yet
    RESYNCING = "resyncing"  # old primary back as replica: only diverged blocks are resent
    FAILED = "failed"  # a step failed (e.g. DNS refused): reported, waiting for an operator


class Action(StrEnum):
    NONE = "none"
    WAIT = "wait"
    BLOCK = "block"
    DRAIN = "drain"
    FENCE = "fence"  # bump the service epoch; the replica refuses older epochs from now on
    PROMOTE = "promote"
    REWRITE_DNS = "rewrite_dns"
    FINISH = "finish"
    RESYNC = "resync"
    ALERT = "alert"


@dataclass(frozen=True)
class Transition:
    src: State
    dst: State
    reason: str
    action: Action


S, A = State, Action
TRANSITIONS: tuple[Transition, ...] = (
    Transition(S.HEALTHY, S.PRIMARY_SUSPECT, "primary heartbeat lost", A.WAIT),
    Transition(S.HEALTHY, S.FENCING, "manual failover", A.FENCE),
    Transition(S.HEALTHY, S.DRAINING, "manual switchover", A.DRAIN),
    Transition(S.PRIMARY_SUSPECT, S.HEALTHY, "primary heartbeat back", A.NONE),
    Transition(S.PRIMARY_SUSPECT, S.FENCING, "grace expired, lag within the RPO budget",
               A.FENCE),
    Transition(S.PRIMARY_SUSPECT, S.BLOCKED, "grace expired, automatic failover not allowed",
               A.BLOCK),
    Transition(S.BLOCKED, S.HEALTHY, "primary heartbeat back", A.NONE),
    Transition(S.BLOCKED, S.FENCING, "manual failover, or lag back within the RPO budget",
               A.FENCE),
    Transition(S.DRAINING, S.FENCING, "replica caught up (lag 0)", A.FENCE),
    Transition(S.DRAINING, S.HEALTHY, "drain timed out: switchover abandoned", A.ALERT),
    Transition(S.FENCING, S.PROMOTING, "old primary fenced", A.PROMOTE),
    Transition(S.PROMOTING, S.REROUTING, "replica promoted", A.REWRITE_DNS),
    Transition(S.REROUTING, S.FAILED_OVER, "new address answered by every server", A.FINISH),
    Transition(S.FENCING, S.FAILED, "fencing failed", A.ALERT),
    Transition(S.PROMOTING, S.FAILED, "promotion failed", A.ALERT),
    Transition(S.REROUTING, S.FAILED, "DNS update refused or not verified", A.ALERT),
    Transition(S.FAILED, S.FENCING, "operator retry from fencing", A.FENCE),
    Transition(S.FAILED, S.PROMOTING, "operator retry from promotion", A.PROMOTE),
    Transition(S.FAILED, S.REROUTING, "operator retry from DNS", A.REWRITE_DNS),
    Transition(S.FAILED_OVER, S.RESYNCING, "old primary back: failback resync", A.RESYNC),
    Transition(S.RESYNCING, S.HEALTHY, "resync complete: roles swapped", A.NONE),
)
_BY_PAIR = {(t.src, t.dst): t for t in TRANSITIONS}
assert len(_BY_PAIR) == len(TRANSITIONS), "one row per (src, dst)"


def transition(src: State, dst: State) -> Transition:
    try:
        return _BY_PAIR[(src, dst)]
    except KeyError:
        raise InvalidTransition(f"no transition from {src} to {dst}") from None


class Command(StrEnum):
    NONE = "none"
    FAILOVER = "failover"
    FORCE_FAILOVER = "force_failover"
    SWITCHOVER = "switchover"
    RETRY = "retry"


@dataclass(frozen=True)
class Policy:
    automatic: bool = True
    grace_seconds: float = 5.0
    rpo_seconds: float = 30.0
    allow_data_loss: bool = False  # fail over automatically even beyond the RPO budget
    damping_seconds: float = 600.0  # no second automatic failover this soon after one
    drain_timeout_seconds: float = 120.0


@dataclass(frozen=True)
class ServiceView:
    """What the controller knows about one service at one instant (one etcd snapshot)."""

    state: State
    now: float
    primary_alive: bool
    primary_lost_since: float | None  # when its heartbeat key disappeared
    replica_alive: bool
    replica_lag_seconds: float | None  # None: unknown (replica not reporting)
    last_failover_at: float | None
    state_since: float
    command: Command = Command.NONE
    step_done: bool = False  # the current step's action has completed
    step_failed: bool = False
    failed_step: State | None = None
    policy: Policy = Policy()


@dataclass(frozen=True)
class Decision:
    state: State
    next_state: State
    action: Action
    message: str

    @property
    def changes(self) -> bool:
        return self.next_state != self.state


def _move(v: ServiceView, dst: State, detail: str) -> Decision:
    t = transition(v.state, dst)
    return Decision(v.state, dst, t.action, f"{v.state} -> {dst}: {t.reason} ({detail})")


def _stay(v: ServiceView, action: Action, detail: str) -> Decision:
    return Decision(v.state, v.state, action, f"{v.state}: {detail}")


def _auto_allowed(v: ServiceView) -> tuple[bool, str]:
    p = v.policy
    if not p.automatic:
        return False, "policy is manual"
    if v.last_failover_at is not None and v.now - v.last_failover_at < p.damping_seconds:
        return False, (f"last failover {v.now - v.last_failover_at:.0f}s ago, inside the "
                       f"{p.damping_seconds:.0f}s damping window")
    if not v.replica_alive:
        return False, "replica site is not alive"
    lag = v.replica_lag_seconds
    if lag is None and not p.allow_data_loss:
        return False, "replica lag unknown"
    if lag is not None and lag > p.rpo_seconds and not p.allow_data_loss:
        return False, f"replica lag {lag:.1f}s beyond the {p.rpo_seconds:.0f}s RPO budget"
    return True, f"replica lag {lag if lag is not None else 'unknown'}s"


def _healthy(v: ServiceView) -> Decision:
    if v.command in (Command.FAILOVER, Command.FORCE_FAILOVER):
        return _move(v, State.FENCING, "requested by an operator")
    if v.command is Command.SWITCHOVER:
        return _move(v, State.DRAINING, "requested by an operator")
    if not v.primary_alive:
        return _move(v, State.PRIMARY_SUSPECT, "waiting for the grace period")
    return _stay(v, Action.NONE, "primary alive")


def _suspect(v: ServiceView) -> Decision:
    if v.primary_alive:
        return _move(v, State.HEALTHY, "flap absorbed")
    lost = v.primary_lost_since if v.primary_lost_since is not None else v.state_since
    if v.now - lost < v.policy.grace_seconds:
        return _stay(v, Action.WAIT, f"primary silent {v.now - lost:.1f}s of "
                                     f"{v.policy.grace_seconds:.1f}s grace")
    ok, why = _auto_allowed(v)
    return _move(v, State.FENCING if ok else State.BLOCKED, why)


def _blocked(v: ServiceView) -> Decision:
    if v.primary_alive:
        return _move(v, State.HEALTHY, "primary back")
    if v.command is Command.FORCE_FAILOVER:
        return _move(v, State.FENCING, "forced by an operator: data loss accepted")
    if v.command is Command.FAILOVER:
        lag = v.replica_lag_seconds
        if lag is not None and lag <= v.policy.rpo_seconds:
            return _move(v, State.FENCING, "requested by an operator")
        return _stay(v, Action.BLOCK, "manual failover refused: lag beyond the RPO budget "
                                      "(use --force to accept data loss)")
    ok, why = _auto_allowed(v)
    if ok:
        return _move(v, State.FENCING, why)
    return _stay(v, Action.BLOCK, why)


def _draining(v: ServiceView) -> Decision:
    if v.replica_lag_seconds == 0:
        return _move(v, State.FENCING, "zero lag: no data loss")
    if v.now - v.state_since > v.policy.drain_timeout_seconds:
        return _move(v, State.HEALTHY, "replica did not catch up in time")
    return _stay(v, Action.DRAIN, f"replica lag {v.replica_lag_seconds}s")


_NEXT_STEP = {State.FENCING: State.PROMOTING, State.PROMOTING: State.REROUTING,
              State.REROUTING: State.FAILED_OVER}
_STEP_ACTION = {State.FENCING: Action.FENCE, State.PROMOTING: Action.PROMOTE,
                State.REROUTING: Action.REWRITE_DNS}


def _step(v: ServiceView) -> Decision:
    if v.step_failed:
        return _move(v, State.FAILED, "see the operation record")
    if v.step_done:
        return _move(v, _NEXT_STEP[v.state], "step done")
    # Not done yet: (re)issue the step's action; every step is idempotent, so a new leader
    # resuming the operation simply runs it again.
    return _stay(v, _STEP_ACTION[v.state], "step in progress")


def _failed(v: ServiceView) -> Decision:
    if v.command is Command.RETRY and v.failed_step is not None:
        return _move(v, v.failed_step, "retry requested by an operator")
    return _stay(v, Action.ALERT, f"waiting for an operator (failed in {v.failed_step})")


def _failed_over(v: ServiceView) -> Decision:
    # Never an automatic failback: the old primary coming back only starts the resync.
    if v.replica_alive:
        return _move(v, State.RESYNCING, "former primary reporting as replica")
    return _stay(v, Action.NONE, "serving from the former replica")


def _resyncing(v: ServiceView) -> Decision:
    if v.step_done:
        return _move(v, State.HEALTHY, "diverged blocks resent")
    return _stay(v, Action.RESYNC, "resync in progress")


_HANDLERS = {
    State.HEALTHY: _healthy, State.PRIMARY_SUSPECT: _suspect, State.BLOCKED: _blocked,
    State.DRAINING: _draining, State.FENCING: _step, State.PROMOTING: _step,
    State.REROUTING: _step, State.FAILED: _failed, State.FAILED_OVER: _failed_over,
    State.RESYNCING: _resyncing,
}


def decide(view: ServiceView) -> Decision:
    """The pure decision for one controller tick."""
    return _HANDLERS[view.state](view)


def to_dot() -> str:
    lines = ["digraph failover {", "  rankdir=LR;", '  node [shape=box, fontname="Helvetica"];',
             '  edge [fontname="Helvetica", fontsize=10];']
    lines += [f'  "{s}";' for s in State]
    for t in TRANSITIONS:
        lines.append(f'  "{t.src}" -> "{t.dst}" [label="{t.reason}\\n[{t.action}]"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--dot"]:
        sys.stdout.write(to_dot())
    else:
        sys.stderr.write("usage: python -m failover.fsm --dot\n")
        sys.exit(2)
