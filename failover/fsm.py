"""The failover state machine of one service, as an explicit table.

Every allowed move is one ``Transition(src, dst, reason, action)`` row in ``TRANSITIONS``; an
unknown (src, dst) pair raises InvalidTransition. ``decide()`` is pure: it reads an immutable
``ServiceView`` (one etcd snapshot plus the clock) and returns a ``Decision``; the controller
acts on it and logs ``decision.message``. A pending operator command is consumed by the state
change it makes or refused (``Decision.refused``, the reason in the message; a refusal may
come with a move the service makes by itself), never left pending, except:

* while the service waits for a dependency (``depends_on``) to finish its own operation:
  ``_dependency_guard`` holds the move that would start this service's operation
  (``Decision.waiting``), and stops it (a refusal, or ``blocked``) when the dependency failed;
* for one tick, when the service moves by itself out of a state that takes requests
  (``Decision.keeps_command``): the request is judged in the new state, not taken as the
  move's cause.

The diagram in docs/failover-fsm.dot is generated from the table (``python -m failover.fsm
--dot``) and CI checks it is current.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from enum import StrEnum

from failover.errors import InvalidTransition


class State(StrEnum):
    HEALTHY = "healthy"  # primary serving, replica receiving (protected)
    # primary serving, its replica is not receiving; also where a new service starts: its
    # replica holds nothing consistent until the primary first reports it protected
    UNPROTECTED = "unprotected"
    PRIMARY_SUSPECT = "primary_suspect"  # primary heartbeat missing, inside the grace period
    BLOCKED = "blocked"  # automatic failover not allowed now (RPO, damping): operator decides
    PREPARING = "preparing"  # the runbook's prechecks and controller hooks (nothing changed)
    DRAINING = "draining"  # planned switchover: write barrier up, waiting for lag to reach zero
    FENCING = "fencing"  # epoch bumped; waiting until the old primary cannot write any more
    PROMOTING = "promoting"  # the replica becomes primary (warm journal applied first)
    REROUTING = "rerouting"  # DNS rewritten, waiting for every authoritative server
    FAILED_OVER = "failed_over"  # serving from the former replica; old primary not back yet
    RESYNCING = "resyncing"  # old primary back as replica: only diverged blocks are resent
    FAILED = "failed"  # a step failed or timed out: reported, waiting for an operator


# States in which the service has a replica receiving its writes (the metric
# drctl_failover_service_protected is 1 in these, 0 in every other state).
PROTECTED_STATES = frozenset({State.HEALTHY, State.DRAINING})


class Action(StrEnum):
    NONE = "none"
    WAIT = "wait"
    BLOCK = "block"
    PREPARE = "prepare"  # run the prechecks and controller hooks, in the runbook's order
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
    Transition(S.HEALTHY, S.UNPROTECTED, "the replica is not protected", A.ALERT),
    Transition(S.UNPROTECTED, S.HEALTHY, "primary reports its replica protected, or runs no "
               "data path (cannot say)", A.NONE),
    Transition(S.UNPROTECTED, S.PRIMARY_SUSPECT, "primary heartbeat lost", A.WAIT),
    Transition(S.UNPROTECTED, S.FENCING, "manual failover", A.FENCE),
    Transition(S.PRIMARY_SUSPECT, S.HEALTHY, "primary heartbeat back", A.NONE),
    Transition(S.PRIMARY_SUSPECT, S.UNPROTECTED, "primary heartbeat back, its replica not "
               "protected", A.ALERT),
    Transition(S.PRIMARY_SUSPECT, S.FENCING, "grace expired, lag within the RPO budget",
               A.FENCE),
    Transition(S.PRIMARY_SUSPECT, S.BLOCKED, "grace expired, automatic failover not allowed",
               A.BLOCK),
    Transition(S.BLOCKED, S.HEALTHY, "primary heartbeat back", A.NONE),
    Transition(S.BLOCKED, S.UNPROTECTED, "primary heartbeat back, its replica not protected",
               A.ALERT),
    Transition(S.BLOCKED, S.FENCING, "manual failover, or lag back within the RPO budget",
               A.FENCE),
    Transition(S.HEALTHY, S.PREPARING, "manual failover or switchover: prechecks first",
               A.PREPARE),
    Transition(S.UNPROTECTED, S.PREPARING, "manual failover: prechecks first", A.PREPARE),
    Transition(S.PRIMARY_SUSPECT, S.PREPARING, "grace expired, lag within the RPO budget: "
               "prechecks first", A.PREPARE),
    Transition(S.BLOCKED, S.PREPARING, "manual failover, or lag back within the RPO budget: "
               "prechecks first", A.PREPARE),
    Transition(S.PREPARING, S.FENCING, "prechecks and controller hooks done", A.FENCE),
    Transition(S.PREPARING, S.DRAINING, "prechecks and controller hooks done (switchover)",
               A.DRAIN),
    Transition(S.PREPARING, S.FAILED, "a precheck or controller hook failed or timed out",
               A.ALERT),
    Transition(S.PREPARING, S.HEALTHY, "automatic failover cancelled: the primary came back "
               "before the fence", A.NONE),
    Transition(S.FAILED, S.PREPARING, "operator retry from the prechecks", A.PREPARE),
    Transition(S.DRAINING, S.FENCING, "write barrier up and lag 0, or manual failover",
               A.FENCE),
    Transition(S.DRAINING, S.HEALTHY, "drain timed out: switchover abandoned", A.ALERT),
    Transition(S.DRAINING, S.PRIMARY_SUSPECT, "primary heartbeat lost during the drain",
               A.WAIT),
    Transition(S.FENCING, S.PROMOTING, "old primary fenced", A.PROMOTE),
    Transition(S.PROMOTING, S.REROUTING, "replica promoted", A.REWRITE_DNS),
    Transition(S.REROUTING, S.FAILED_OVER, "the new address answered by every server, or no "
               "DNS records to change", A.FINISH),
    Transition(S.FENCING, S.FAILED, "fencing failed or timed out", A.ALERT),
    Transition(S.PROMOTING, S.FAILED, "promotion failed or timed out", A.ALERT),
    Transition(S.REROUTING, S.FAILED, "DNS update refused, not verified or timed out",
               A.ALERT),
    Transition(S.RESYNCING, S.FAILED, "resync timed out", A.ALERT),
    Transition(S.FAILED, S.FENCING, "operator retry from fencing", A.FENCE),
    Transition(S.FAILED, S.PROMOTING, "operator retry from promotion", A.PROMOTE),
    Transition(S.FAILED, S.REROUTING, "operator retry from DNS", A.REWRITE_DNS),
    Transition(S.FAILED, S.RESYNCING, "operator retry from resync", A.RESYNC),
    Transition(S.FAILED, S.HEALTHY, "operation abandoned by an operator", A.NONE),
    Transition(S.FAILED_OVER, S.RESYNCING, "former primary serving as replica: re-protect",
               A.RESYNC),
    Transition(S.RESYNCING, S.HEALTHY, "re-protected: the new primary reports its replica "
               "protected", A.NONE),
    Transition(S.RESYNCING, S.BLOCKED, "primary heartbeat lost mid-resync", A.BLOCK),
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
    RETRY = "retry"  # FAILED: run the failed step again
    CANCEL = "cancel"  # FAILED: abandon the operation, back to healthy with the roles as recorded


@dataclass(frozen=True)
class Policy:
    automatic: bool = True
    grace_seconds: float = 5.0
    rpo_seconds: float = 30.0
    allow_data_loss: bool = False  # fail over automatically even beyond the RPO budget
    damping_seconds: float = 600.0  # no second automatic failover this soon after one
    drain_timeout_seconds: float = 120.0
    prepare_timeout_seconds: float = 60.0  # each phase moves to FAILED past its timeout
    fence_timeout_seconds: float = 60.0
    promote_timeout_seconds: float = 120.0
    reroute_timeout_seconds: float = 120.0
    resync_timeout_seconds: float = 3600.0


# The states of an operation in progress, and the moves that start one
ACTIVE_STATES = frozenset({State.PREPARING, State.DRAINING, State.FENCING, State.PROMOTING,
                           State.REROUTING})
IDLE_STATES = frozenset({State.HEALTHY, State.UNPROTECTED, State.PRIMARY_SUSPECT, State.BLOCKED})
START_STATES = frozenset({State.PREPARING, State.DRAINING, State.FENCING})


@dataclass(frozen=True)
class Dependency:
    """A service this one depends on (``depends_on``), as the same snapshot shows it."""

    name: str
    state: State
    # its primary is the site this service would leave: it has not moved (yet)
    same_site: bool
    pending: bool = False  # a request is pending for it (its own, or one of ours it inherits)
    refused: str | None = None  # that request was refused in this tick: why
    failed: str | None = None  # FAILED: in which step and why


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
    has_dns: bool = True  # the service has DNS records for the rerouting step to rewrite
    failed_step: State | None = None
    policy: Policy = Policy()
    # The primary's report: its replica holds a consistency point at the current epoch and
    # is receiving (None: unknown, e.g. an agent that does not report it).
    protected: bool | None = None
    # the primary runs no data path (hooks only): it cannot report ``protected`` (None), its
    # replication is the runbook's hooks' business
    no_data_path: bool = False
    barrier: bool = False  # the primary's write barrier is up (no new write acknowledged)
    # False while the replica holds no consistency point (a new service before its first
    # protection, or mid-resync): then only a forced failover may promote it.
    replica_consistent: bool = True
    prepare: bool = False  # the runbook has prechecks or controller hooks before fencing
    switchover: bool = False  # the operation in progress is a switchover (or a failback)
    automatic: bool = False  # the operation in progress was started by decide(), not a request
    dependencies: tuple[Dependency, ...] = ()


@dataclass(frozen=True)
class Decision:
    state: State
    next_state: State
    action: Action
    message: str
    refused: bool = False  # the pending command was refused (consumed; any move is not its)
    waiting: str | None = None  # held for a dependency: the command (if any) stays pending
    # the service moves by itself out of an idle state, not as the pending command asked:
    # the command stays pending and is judged in the new state (decide; from other states
    # such a command is refused while the move goes on)
    keeps_command: bool = False

    @property
    def changes(self) -> bool:
        return self.next_state != self.state

    @property
    def consumes_command(self) -> bool:
        """A pending command is used up by a state change it made or by its refusal."""
        return (self.changes and not self.keeps_command) or self.refused


def seconds(value: float | None) -> str:
    """A duration for a message: "1.2s", or "unknown" (never "None")."""
    return "unknown" if value is None else f"{value:.1f}s"


def _move(v: ServiceView, dst: State, detail: str) -> Decision:
    t = transition(v.state, dst)
    return Decision(v.state, dst, t.action, f"{v.state} -> {dst}: {t.reason} ({detail})")


def human(message: str) -> str:
    """A decision's message for people (the page). A move's message is ``src -> dst: <the
    table's reason> (<what happened>)...``; where the reason names every way the row can be
    taken ("write barrier up and lag 0, or manual failover"), only what happened is kept.
    Any other message is returned as it is."""
    head, sep, rest = message.partition(": ")
    src, arrow, dst = head.partition(" -> ")
    try:
        t = _BY_PAIR.get((State(src), State(dst))) if sep and arrow else None
    except ValueError:
        t = None
    if t is None or " or " not in t.reason or not rest.startswith(t.reason + " ("):
        return message
    depth, tail = 0, rest[len(t.reason) + 1:]
    for i, c in enumerate(tail):  # the detail's closing parenthesis (it may hold others)
        depth += {"(": 1, ")": -1}.get(c, 0)
        if depth == 0:
            return f"{src} -> {dst}: {tail[1:i]}{tail[i + 1:]}"
    return message


def _stay(v: ServiceView, action: Action, detail: str) -> Decision:
    return Decision(v.state, v.state, action, f"{v.state}: {detail}")


def _refuse(v: ServiceView, action: Action, detail: str) -> Decision:
    return Decision(v.state, v.state, action, f"{v.state}: {detail}", refused=True)


def _begin(v: ServiceView, dst: State, detail: str) -> Decision:
    """Start an operation: through the prechecks first when the runbook has any."""
    if v.prepare and dst in (State.FENCING, State.DRAINING):
        return _move(v, State.PREPARING, detail)
    return _move(v, dst, detail)


def _auto_allowed(v: ServiceView) -> tuple[bool, str]:
    p = v.policy
    if not p.automatic:
        return False, "policy is manual"
    if v.last_failover_at is not None and v.now - v.last_failover_at < p.damping_seconds:
        return False, (f"last failover {v.now - v.last_failover_at:.0f}s ago, inside the "
                       f"{p.damping_seconds:.0f}s damping window")
    if not v.replica_alive:
        return False, "replica site is not alive"
    if not v.replica_consistent:
        return False, ("the replica holds no consistent copy (never protected since the "
                       "service was created, or mid-resync): only failover --force promotes it")
    lag = v.replica_lag_seconds
    if lag is None and not p.allow_data_loss:
        return False, "replica lag unknown"
    if lag is not None and lag > p.rpo_seconds and not p.allow_data_loss:
        return False, f"replica lag {lag:.1f}s beyond the {p.rpo_seconds:.0f}s RPO budget"
    return True, f"replica lag {seconds(lag)}"


_FAILOVERS = (Command.FAILOVER, Command.FORCE_FAILOVER)


def _not_consistent(v: ServiceView) -> Decision | None:
    """A manual failover that cannot end well, refused before the primary is fenced: the
    replica site is not alive (nothing could take over; not even --force), or (without
    --force) it holds no consistency point yet (a new service before its first protection,
    a resync) or its lag is beyond the RPO budget."""
    if v.command not in _FAILOVERS:
        return None
    if not v.replica_alive:
        return _refuse(v, Action.ALERT, "manual failover refused: the replica site is not "
                       "alive, nothing could take over (the primary keeps serving)")
    if v.command is Command.FAILOVER and not v.replica_consistent:
        return _refuse(v, Action.ALERT, "manual failover refused: the replica holds no "
                       "consistent copy yet (use --force to promote it anyway)")
    lag = v.replica_lag_seconds
    if v.command is Command.FAILOVER and lag is not None and lag > v.policy.rpo_seconds:
        return _refuse(v, Action.ALERT, f"manual failover refused: replica lag {seconds(lag)}"
                       f", RPO budget {v.policy.rpo_seconds:.0f}s (use --force to accept data "
                       "loss, or switchover to lose nothing)")
    return None


def _healthy(v: ServiceView) -> Decision:
    if (refused := _not_consistent(v)) is not None:
        return refused
    if v.command in _FAILOVERS:
        return _begin(v, State.FENCING, "on request")
    # A switchover the move below makes impossible is refused by it, and the message says so.
    switch = v.command is Command.SWITCHOVER
    if not v.primary_alive:
        return replace(_move(v, State.PRIMARY_SUSPECT, "waiting for the grace period" + (
            "; switchover refused: the primary is not alive" if switch else "")),
            refused=switch)
    why = _not_protected(v)
    if why is not None:
        return replace(_move(v, State.UNPROTECTED, why + (
            "; switchover refused: the replica is not receiving" if switch else "")),
            refused=switch)
    if switch:
        return _begin(v, State.DRAINING, "on request")
    return _stay(v, Action.NONE, "primary alive")


def _not_protected(v: ServiceView) -> str | None:
    """Why the primary's replica does not count as protected (None: it does, or nobody can
    say). None (unknown: an agent that does not say) is not False; but a replica that holds
    no consistent copy (never protected since the service was created, or mid-resync) is not
    protected, whatever the agent says."""
    if v.protected is None and not v.replica_consistent:
        return ("the primary has not reported it protected since the service was created "
                "(or since its resync began)")
    if v.protected is False:
        return (f"the primary reports its replica not receiving (lag last reported: "
                f"{seconds(v.replica_lag_seconds)})")
    return None


def _unprotected(v: ServiceView) -> Decision:
    # (also a new service's first state: automatic failover is not possible from here before
    # the first protection, _auto_allowed refuses a replica without a consistent copy)
    if (refused := _not_consistent(v)) is not None:
        return refused
    if v.command in _FAILOVERS:
        return _begin(v, State.FENCING, "on request")
    if not v.primary_alive:
        return _move(v, State.PRIMARY_SUSPECT, "waiting for the grace period")
    if v.protected is True:
        return _move(v, State.HEALTHY, "replica receiving")
    if v.protected is None and v.no_data_path and v.replica_consistent:
        return _move(v, State.HEALTHY, "the primary runs no data path: its replication is "
                                       "the runbook's hooks' business")
    if v.command is Command.SWITCHOVER:
        return _refuse(v, Action.NONE, "switchover refused: the replica is not receiving")
    return _stay(v, Action.NONE, "primary alive; " + (
        _not_protected(v) or "the primary does not report its replica protected"))


def _back(v: ServiceView, healthy: str) -> Decision:
    """The primary's heartbeat is back: healthy, or unprotected if its replica is not."""
    why = _not_protected(v)
    return _move(v, State.HEALTHY, healthy) if why is None else _move(v, State.UNPROTECTED, why)


def _suspect(v: ServiceView) -> Decision:
    if v.primary_alive:
        return _back(v, "flap absorbed")
    lost = v.primary_lost_since if v.primary_lost_since is not None else v.state_since
    if v.now - lost < v.policy.grace_seconds:
        return _stay(v, Action.WAIT, f"primary silent {v.now - lost:.1f}s of "
                                     f"{v.policy.grace_seconds:.1f}s grace")
    ok, why = _auto_allowed(v)
    return _begin(v, State.FENCING, why) if ok else _move(v, State.BLOCKED, why)


def _blocked(v: ServiceView) -> Decision:
    if v.primary_alive:
        return _back(v, "primary back")
    if v.command in _FAILOVERS and not v.replica_alive:  # (as _not_consistent: not even forced)
        return _refuse(v, Action.BLOCK, "manual failover refused: the replica site is not "
                       "alive, nothing could take over")
    if v.command is Command.FORCE_FAILOVER:
        return _begin(v, State.FENCING, "forced on request: data loss accepted")
    if v.command is Command.FAILOVER:
        lag = v.replica_lag_seconds
        if not v.replica_consistent:
            return _refuse(v, Action.BLOCK, "manual failover refused: the replica holds no "
                           "consistent copy (never protected since the service was created, "
                           "or mid-resync; use --force to promote it anyway)")
        if lag is not None and lag <= v.policy.rpo_seconds:
            return _begin(v, State.FENCING, "on request")
        return _refuse(v, Action.BLOCK, f"manual failover refused: replica lag {seconds(lag)}"
                       f", RPO budget {v.policy.rpo_seconds:.0f}s (use --force to accept data "
                       "loss)")
    ok, why = _auto_allowed(v)
    if ok:
        return _begin(v, State.FENCING, why)
    return _stay(v, Action.BLOCK, why)


def _draining(v: ServiceView) -> Decision:
    if v.command in _FAILOVERS:
        return _move(v, State.FENCING, "failover requested during the drain: carried out")
    if not v.primary_alive:
        return _move(v, State.PRIMARY_SUSPECT, "switchover abandoned: the failover path "
                                               "decides")
    lag = v.replica_lag_seconds
    if v.barrier and lag == 0:
        return _move(v, State.FENCING, "zero lag behind the write barrier: no data loss")
    if v.now - v.state_since > v.policy.drain_timeout_seconds:
        return _move(v, State.HEALTHY, f"replica did not catch up in "
                                       f"{v.policy.drain_timeout_seconds:.0f}s (lag "
                                       f"{seconds(lag)}, barrier {'up' if v.barrier else 'down'})")
    return _stay(v, Action.DRAIN, f"replica lag {seconds(lag)}, write barrier "
                                  f"{'up' if v.barrier else 'not up yet'}")


def _preparing(v: ServiceView) -> Decision:
    # Nothing is fenced yet: a primary back before the fence keeps serving (before `preparing`
    # existed an automatic failover fenced at once; the prechecks must not widen that window).
    if v.automatic and v.primary_alive:
        return _move(v, State.HEALTHY, "its heartbeat is back")
    if v.step_failed:
        return _move(v, State.FAILED, "see the operation record")
    if v.step_done:
        return _move(v, State.DRAINING if v.switchover else State.FENCING, "step done")
    return _timed_out(v) or _stay(v, Action.PREPARE, "prechecks in progress")


_NEXT_STEP = {State.FENCING: State.PROMOTING, State.PROMOTING: State.REROUTING,
              State.REROUTING: State.FAILED_OVER}
_STEP_ACTION = {State.FENCING: Action.FENCE, State.PROMOTING: Action.PROMOTE,
                State.REROUTING: Action.REWRITE_DNS}
_WAITING_FOR = {
    State.PREPARING: "the runbook's prechecks and controller hooks",
    State.FENCING: "the old primary to report itself fenced at the new epoch (or its "
                   "heartbeat to expire with the witness agreeing)",
    State.PROMOTING: "the new primary to report itself primary at the new epoch",
    State.REROUTING: "every authoritative DNS server to answer the new address",
    State.RESYNCING: "the new primary to report its replica protected and the former primary "
                     "to report itself replica at the current epoch",
}


def step_timeout(state: State, policy: Policy) -> float | None:
    """How long a step may take before the service moves to FAILED (None: no limit)."""
    return {State.PREPARING: policy.prepare_timeout_seconds,
            State.FENCING: policy.fence_timeout_seconds,
            State.PROMOTING: policy.promote_timeout_seconds,
            State.REROUTING: policy.reroute_timeout_seconds,
            State.RESYNCING: policy.resync_timeout_seconds}.get(state)


def _timed_out(v: ServiceView) -> Decision | None:
    limit = step_timeout(v.state, v.policy)
    if limit is None or v.now - v.state_since <= limit:
        return None
    return _move(v, State.FAILED, f"{v.state} timed out after {limit:.0f}s waiting for "
                                  f"{_WAITING_FOR[v.state]}")


def _step(v: ServiceView) -> Decision:
    if v.step_failed:
        return _move(v, State.FAILED, "see the operation record")
    if v.step_done:
        detail = "step done"
        if v.state is State.REROUTING:
            detail = ("the new address answered by every server" if v.has_dns
                      else "no DNS records to change")
        return _move(v, _NEXT_STEP[v.state], detail)
    # Not done yet: (re)issue the step's action; a new leader resuming the operation runs
    # the step again (the runbook's hooks may run twice: they must be idempotent).
    return _timed_out(v) or _stay(v, _STEP_ACTION[v.state], "step in progress")


def _failed(v: ServiceView) -> Decision:
    if v.command is Command.CANCEL:
        return _move(v, State.HEALTHY, f"{v.failed_step or 'operation'} abandoned; the roles "
                                       "stay as recorded")
    if v.command is Command.RETRY:
        if v.failed_step is not None:
            return _move(v, v.failed_step, "retry on request")
        return _refuse(v, Action.ALERT, "retry refused: the failed step is unknown (cancel "
                                        "instead)")
    return _stay(v, Action.ALERT, f"waiting for an operator (failed in {v.failed_step}): "
                                  "retry or cancel")


def _failed_over(v: ServiceView) -> Decision:
    # Never an automatic failback: the old primary coming back only starts the resync.
    if v.replica_alive:
        return _move(v, State.RESYNCING, "the former primary's site is back (its heartbeat)")
    return _stay(v, Action.NONE, "serving from the former replica")


def _resyncing(v: ServiceView) -> Decision:
    if v.step_done:
        return _move(v, State.HEALTHY, "resync verified")
    if not v.primary_alive:
        return _move(v, State.BLOCKED, "the replica is mid-resync, not consistent: only "
                                       "failover --force promotes it")
    return _timed_out(v) or _stay(v, Action.RESYNC, "resync in progress")


_HANDLERS = {
    State.HEALTHY: _healthy, State.UNPROTECTED: _unprotected,
    State.PRIMARY_SUSPECT: _suspect, State.BLOCKED: _blocked,
    State.PREPARING: _preparing, State.DRAINING: _draining, State.FENCING: _step,
    State.PROMOTING: _step,
    State.REROUTING: _step, State.FAILED: _failed, State.FAILED_OVER: _failed_over,
    State.RESYNCING: _resyncing,
}


def _why_refused(v: ServiceView) -> str:
    if v.command in (Command.RETRY, Command.CANCEL):
        return f"nothing failed (state {v.state})"
    return {
        State.PRIMARY_SUSPECT: "the primary is silent and its grace period is running "
                               "(then it fails over, or blocks: then failover --force)",
        State.BLOCKED: "the primary is not alive (use failover)",
        State.FAILED: "retry or cancel the failed operation first",
        State.FAILED_OVER: "the former primary is not back as a replica yet",
        State.RESYNCING: "the replica is mid-resync",
    }.get(v.state, f"an operation is in progress ({v.state})")


def _dependency_guard(v: ServiceView, d: Decision) -> Decision | None:
    """A move that would start this service's operation waits until every dependency has
    finished its own (promoted, checked, DNS rewritten) or does not move with it; a
    dependency that failed, or that stays behind, stops it: the request is refused, an
    automatic failover is blocked. None: nothing to hold."""
    if d.state not in IDLE_STATES or d.next_state not in START_STATES or d.refused:
        return None
    for dep in v.dependencies:
        stop = None
        if dep.failed is not None:
            stop = f"its dependency {dep.name} failed ({dep.failed})"
        elif dep.state in ACTIVE_STATES or (dep.same_site and (
                dep.pending or dep.state is State.PRIMARY_SUSPECT) and dep.refused is None):
            why = f"waiting for its dependency {dep.name} ({dep.state}) to finish first"
            return Decision(d.state, d.state, Action.WAIT, f"{d.state}: {why}", waiting=why)
        elif dep.same_site:
            stop = f"its dependency {dep.name} does not move: " + (
                dep.refused or f"it is {dep.state} at the site this service would leave")
        if stop is None:
            continue
        if v.command is not Command.NONE:
            return _refuse(v, Action.ALERT, f"{v.command} refused: {stop}")
        if d.state is State.PRIMARY_SUSPECT:
            return _move(v, State.BLOCKED, stop)
        return _stay(v, Action.BLOCK, stop)
    return None


def decide(view: ServiceView) -> Decision:
    """The pure decision for one controller tick. A pending command the state has no use for
    is refused (and so consumed) with the reason in the message; the state's own action
    stands. A move the command did not make (``_moved_by``) keeps it for the next tick when
    it was asked in a state that takes requests (``keeps_command``), else refuses it."""
    d = _HANDLERS[view.state](view)
    held = _dependency_guard(view, d)
    if held is not None:
        return held
    if view.command is Command.NONE or d.refused:
        return d
    if d.changes and _moved_by(view, d):
        return d
    if d.changes and view.state in IDLE_STATES:  # asked where requests are taken:
        return replace(d, keeps_command=True)  # judged in the state it moves to
    why = _why_refused(view)  # (asked where it could not be carried out: refused, even if
    if d.changes and d.next_state in IDLE_STATES:  # the state it moves to would take it)
        why += f"; the service is {d.next_state} now: ask again if it still applies"
    return replace(d, refused=True, message=f"{d.message}; {view.command} refused: {why}")


def _moved_by(v: ServiceView, d: Decision) -> bool:
    """Whether the pending command made the move ``d``: it differs from the move without it,
    or it is the failover the command asked for (a grace that ran out in the same tick). A
    move the service makes by itself (a switchover asked as the grace runs out: the automatic
    failover) is not the command's: that one is judged in the new state."""
    if _HANDLERS[v.state](replace(v, command=Command.NONE)) != d:  # (a move that says
        return True  # it refuses the command, too: healthy -> unprotected)
    return v.state in IDLE_STATES and v.command in _FAILOVERS \
        and d.next_state in START_STATES


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
