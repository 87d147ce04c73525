"""The failover decision table, tested on actions and states (never on message text)."""

from __future__ import annotations

import dataclasses
import os

import pytest

from failover.errors import InvalidTransition
from failover.fsm import (
    TRANSITIONS,
    Action,
    Command,
    Policy,
    ServiceView,
    State,
    decide,
    to_dot,
    transition,
)

BASE = ServiceView(state=State.HEALTHY, now=1000.0, primary_alive=True, primary_lost_since=None,
                   replica_alive=True, replica_lag_seconds=1.0, last_failover_at=None,
                   state_since=900.0, policy=Policy(grace_seconds=5, rpo_seconds=30,
                                                    damping_seconds=600))


def view(**kw: object) -> ServiceView:
    return dataclasses.replace(BASE, **kw)  # type: ignore[arg-type]


def test_heartbeat_lost_waits_for_the_grace_period() -> None:
    d = decide(view(primary_alive=False, primary_lost_since=999.0))
    assert (d.next_state, d.action) == (State.PRIMARY_SUSPECT, Action.WAIT)
    d = decide(view(state=State.PRIMARY_SUSPECT, primary_alive=False, primary_lost_since=998.0))
    assert (d.next_state, d.action) == (State.PRIMARY_SUSPECT, Action.WAIT)


def test_flap_inside_grace_goes_back_to_healthy() -> None:
    d = decide(view(state=State.PRIMARY_SUSPECT, primary_alive=True))
    assert d.next_state is State.HEALTHY


def test_grace_expired_with_lag_in_budget_fences_first() -> None:
    d = decide(view(state=State.PRIMARY_SUSPECT, primary_alive=False, primary_lost_since=990.0))
    assert (d.next_state, d.action) == (State.FENCING, Action.FENCE)


@pytest.mark.parametrize("kw", [
    {"replica_lag_seconds": 45.0},  # beyond the RPO budget
    {"replica_lag_seconds": None},  # unknown
    {"last_failover_at": 700.0},  # inside the damping window
    {"replica_alive": False},
    {"policy": Policy(automatic=False)},
])
def test_automatic_failover_is_blocked(kw: dict[str, object]) -> None:
    d = decide(view(state=State.PRIMARY_SUSPECT, primary_alive=False, primary_lost_since=990.0,
                    **kw))
    assert (d.next_state, d.action) == (State.BLOCKED, Action.BLOCK)


def test_policy_can_accept_data_loss() -> None:
    d = decide(view(state=State.PRIMARY_SUSPECT, primary_alive=False, primary_lost_since=990.0,
                    replica_lag_seconds=300.0, policy=Policy(allow_data_loss=True)))
    assert d.next_state is State.FENCING


def test_blocked_needs_force_beyond_rpo() -> None:
    blocked = view(state=State.BLOCKED, primary_alive=False, replica_lag_seconds=120.0,
                   policy=Policy(automatic=False))
    assert decide(dataclasses.replace(blocked, command=Command.FAILOVER)).next_state \
        is State.BLOCKED
    assert decide(dataclasses.replace(blocked, command=Command.FORCE_FAILOVER)).next_state \
        is State.FENCING
    assert decide(dataclasses.replace(blocked, primary_alive=True)).next_state is State.HEALTHY


def test_failover_steps_in_order_and_resume() -> None:
    for state, action, nxt in [(State.FENCING, Action.FENCE, State.PROMOTING),
                               (State.PROMOTING, Action.PROMOTE, State.REROUTING),
                               (State.REROUTING, Action.REWRITE_DNS, State.FAILED_OVER)]:
        pending = decide(view(state=state, primary_alive=False))
        assert (pending.next_state, pending.action) == (state, action)  # a new leader re-runs
        assert decide(view(state=state, primary_alive=False, step_done=True)).next_state is nxt
    failed = decide(view(state=State.REROUTING, step_failed=True))
    assert (failed.next_state, failed.action) == (State.FAILED, Action.ALERT)
    retry = decide(view(state=State.FAILED, command=Command.RETRY, failed_step=State.REROUTING))
    assert (retry.next_state, retry.action) == (State.REROUTING, Action.REWRITE_DNS)


def test_switchover_drains_to_zero_lag() -> None:
    d = decide(view(command=Command.SWITCHOVER))
    assert (d.next_state, d.action) == (State.DRAINING, Action.DRAIN)
    assert decide(view(state=State.DRAINING, replica_lag_seconds=0.4)).action is Action.DRAIN
    assert decide(view(state=State.DRAINING, replica_lag_seconds=0.0)).next_state \
        is State.FENCING
    timed_out = decide(view(state=State.DRAINING, replica_lag_seconds=3.0, state_since=0.0))
    assert timed_out.next_state is State.HEALTHY


def test_never_automatic_failback() -> None:
    d = decide(view(state=State.FAILED_OVER, replica_alive=True))
    assert (d.next_state, d.action) == (State.RESYNCING, Action.RESYNC)
    assert decide(view(state=State.RESYNCING, step_done=True)).next_state is State.HEALTHY


def test_unknown_pair_raises() -> None:
    with pytest.raises(InvalidTransition):
        transition(State.HEALTHY, State.FAILED_OVER)
    assert len({(t.src, t.dst) for t in TRANSITIONS}) == len(TRANSITIONS)


def test_committed_diagram_matches_the_table() -> None:
    path = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "failover-fsm.dot")
    with open(path) as fh:
        assert fh.read() == to_dot(), "run: python -m failover.fsm --dot > docs/failover-fsm.dot"
