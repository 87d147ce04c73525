"""The failover decision table, tested on actions and states (never on message text)."""

from __future__ import annotations

import dataclasses
import os

import pytest

from failover.errors import InvalidTransition
from failover.fsm import (
    PROTECTED_STATES,
    TRANSITIONS,
    Action,
    Command,
    Policy,
    ServiceView,
    State,
    decide,
    human,
    seconds,
    step_timeout,
    to_dot,
    transition,
)

BASE = ServiceView(state=State.HEALTHY, now=1000.0, primary_alive=True, primary_lost_since=None,
                   replica_alive=True, replica_lag_seconds=1.0, last_failover_at=None,
                   state_since=990.0, policy=Policy(grace_seconds=5, rpo_seconds=30,
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


def test_blocked_refuses_a_failover_to_a_replica_site_that_is_down() -> None:
    """Blocked because the replica is not alive: a manual failover (forced or not) would
    fence the primary and then wait for a promotion nobody can make."""
    blocked = view(state=State.BLOCKED, primary_alive=False, replica_alive=False,
                   replica_lag_seconds=1.0)
    for command in (Command.FAILOVER, Command.FORCE_FAILOVER):
        d = decide(dataclasses.replace(blocked, command=command))
        assert (d.next_state, d.refused) == (State.BLOCKED, True), d
        assert "the replica site is not alive" in d.message
    assert decide(dataclasses.replace(blocked, command=Command.FAILOVER, replica_alive=True)
                  ).next_state is State.FENCING


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


def test_switchover_drains_to_zero_lag_behind_the_barrier() -> None:
    d = decide(view(command=Command.SWITCHOVER))
    assert (d.next_state, d.action) == (State.DRAINING, Action.DRAIN)
    assert decide(view(state=State.DRAINING, replica_lag_seconds=0.4)).action is Action.DRAIN
    assert decide(view(state=State.DRAINING, replica_lag_seconds=0.4, barrier=True)).action \
        is Action.DRAIN
    # lag 0 without the barrier up: writes may still be acknowledged, not done yet
    no_barrier = decide(view(state=State.DRAINING, replica_lag_seconds=0.0))
    assert (no_barrier.next_state, no_barrier.action) == (State.DRAINING, Action.DRAIN)
    d = decide(view(state=State.DRAINING, replica_lag_seconds=0.0, barrier=True))
    assert (d.next_state, d.action) == (State.FENCING, Action.FENCE)
    timed_out = decide(view(state=State.DRAINING, replica_lag_seconds=3.0, state_since=0.0))
    assert (timed_out.next_state, timed_out.action) == (State.HEALTHY, Action.ALERT)


def test_never_automatic_failback() -> None:
    d = decide(view(state=State.FAILED_OVER, replica_alive=True))
    assert (d.next_state, d.action) == (State.RESYNCING, Action.RESYNC)
    assert decide(view(state=State.FAILED_OVER, replica_alive=False)).next_state \
        is State.FAILED_OVER
    assert decide(view(state=State.RESYNCING, step_done=True)).next_state is State.HEALTHY
    pending = decide(view(state=State.RESYNCING))
    assert (pending.next_state, pending.action) == (State.RESYNCING, Action.RESYNC)


def test_unknown_pair_raises() -> None:
    with pytest.raises(InvalidTransition):
        transition(State.HEALTHY, State.FAILED_OVER)
    assert len({(t.src, t.dst) for t in TRANSITIONS}) == len(TRANSITIONS)


def test_committed_diagram_matches_the_table() -> None:
    path = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "failover-fsm.dot")
    with open(path) as fh:
        assert fh.read() == to_dot(), "run: python -m failover.fsm --dot > docs/failover-fsm.dot"


# -- protection lifecycle ---------------------------------------------------------------------


def test_unprotected_primary_leaves_healthy_and_comes_back() -> None:
    d = decide(view(protected=False))
    assert (d.next_state, d.action) == (State.UNPROTECTED, Action.ALERT)
    back = decide(view(state=State.UNPROTECTED, protected=True))
    assert (back.next_state, back.action) == (State.HEALTHY, Action.NONE)
    still = decide(view(state=State.UNPROTECTED, protected=False))
    assert (still.next_state, still.action, still.refused) == (State.UNPROTECTED, Action.NONE,
                                                               False)
    # the lag is the last one the primary reported: its replica receives nothing now
    assert still.message.startswith("unprotected: primary alive; the primary reports its "
                                    "replica not receiving (lag last reported: ")


@pytest.mark.parametrize("state", [State.HEALTHY, State.UNPROTECTED])
def test_unknown_protection_changes_nothing(state: State) -> None:
    # an agent that does not report `protected` (None) neither flips nor heals the state
    d = decide(view(state=state, protected=None))
    assert (d.next_state, d.action) == (state, Action.NONE)


def test_a_new_service_is_unprotected_until_its_replica_was_first_protected() -> None:
    d = decide(view(protected=None, replica_consistent=False))
    assert (d.next_state, d.action) == (State.UNPROTECTED, Action.ALERT)
    assert "not reported it protected since the service was created" in d.message
    # a new service's first state (records.service_record): it stays there until protected
    new = view(state=State.UNPROTECTED, protected=None, replica_consistent=False)
    for v in (new, dataclasses.replace(new, protected=False),
              dataclasses.replace(new, no_data_path=True)):  # (not consistent: not healthy)
        d = decide(v)
        assert (d.next_state, d.refused) == (State.UNPROTECTED, False), v
        assert "since the service was created" in d.message or "not receiving" in d.message
    d = decide(view(state=State.UNPROTECTED, protected=True, replica_consistent=False))
    assert d.next_state is State.HEALTHY


def test_a_primary_without_a_data_path_cannot_report_protection_and_is_healthy() -> None:
    # (its replication is the runbook's hooks' business: the controller marks its replica
    # consistent at its first heartbeat; protected stays None)
    d = decide(view(state=State.UNPROTECTED, protected=None, no_data_path=True))
    assert (d.next_state, d.action) == (State.HEALTHY, Action.NONE)
    assert decide(view(protected=None, no_data_path=True)).next_state is State.HEALTHY


def test_a_new_service_never_fails_over_automatically() -> None:
    """From its first state to the end of the grace period: blocked, never fencing (the
    replica was never protected), even when the policy accepts data loss."""
    policy = Policy(grace_seconds=5, allow_data_loss=True)
    v = view(state=State.UNPROTECTED, protected=None, replica_consistent=False,
             primary_alive=False, primary_lost_since=999.0, replica_lag_seconds=0.0,
             policy=policy)
    d = decide(v)
    assert d.next_state is State.PRIMARY_SUSPECT
    d = decide(dataclasses.replace(v, state=State.PRIMARY_SUSPECT, primary_lost_since=990.0))
    assert (d.next_state, d.action) == (State.BLOCKED, Action.BLOCK)
    d = decide(dataclasses.replace(v, state=State.BLOCKED, primary_lost_since=900.0))
    assert (d.next_state, d.action) == (State.BLOCKED, Action.BLOCK)
    # the primary back: unprotected again, not healthy
    for state in (State.PRIMARY_SUSPECT, State.BLOCKED):
        d = decide(dataclasses.replace(v, state=state, primary_alive=True))
        assert (d.next_state, d.action) == (State.UNPROTECTED, Action.ALERT)


@pytest.mark.parametrize("state", [State.PRIMARY_SUSPECT, State.BLOCKED])
def test_a_primary_back_with_its_replica_not_protected_is_unprotected(state: State) -> None:
    assert decide(view(state=state, protected=False)).next_state is State.UNPROTECTED
    assert decide(view(state=state, protected=True)).next_state is State.HEALTHY
    assert decide(view(state=state, protected=None)).next_state is State.HEALTHY


def test_the_human_message_keeps_what_happened_not_the_tables_alternatives() -> None:
    d = decide(view(state=State.DRAINING, barrier=True, replica_lag_seconds=0.0))
    assert d.message.startswith("draining -> fencing: write barrier up and lag 0, or manual")
    assert human(d.message) == ("draining -> fencing: zero lag behind the write barrier: no "
                                "data loss")
    d = decide(view(command=Command.SWITCHOVER, prepare=True))
    assert human(d.message) == "healthy -> preparing: on request"
    for message in (decide(view(protected=False)).message, decide(view()).message,
                    "not a decision"):
        assert human(message) == message  # a reason without alternatives says what happened


def test_a_dead_primary_is_suspect_before_it_is_unprotected() -> None:
    d = decide(view(primary_alive=False, primary_lost_since=999.0, protected=False))
    assert d.next_state is State.PRIMARY_SUSPECT
    d = decide(view(state=State.UNPROTECTED, primary_alive=False, primary_lost_since=999.0))
    assert (d.next_state, d.action) == (State.PRIMARY_SUSPECT, Action.WAIT)


@pytest.mark.parametrize("cmd", [Command.FAILOVER, Command.FORCE_FAILOVER])
def test_manual_failover_from_unprotected_fences(cmd: Command) -> None:
    d = decide(view(state=State.UNPROTECTED, protected=False, command=cmd))
    assert (d.next_state, d.action) == (State.FENCING, Action.FENCE)
    assert d.consumes_command


def test_switchover_is_refused_while_unprotected() -> None:
    d = decide(view(state=State.UNPROTECTED, protected=False, command=Command.SWITCHOVER))
    assert (d.next_state, d.refused, d.consumes_command) == (State.UNPROTECTED, True, True)
    assert "switchover refused: the replica is not receiving" in d.message
    # asked on the tick healthy turns unprotected: consumed by that move, and said so
    d = decide(view(protected=False, command=Command.SWITCHOVER))
    assert d.next_state is State.UNPROTECTED and d.consumes_command
    assert "switchover refused" in d.message


def test_a_move_the_command_did_not_make_is_not_its_own() -> None:
    """An idle service moving by itself keeps a pending request for the next tick (it would
    be taken as the operation's cause); a service in an operation refuses it while the move
    goes on; a failover asked as the grace runs out is the move it asked for."""
    suspect = {"state": State.PRIMARY_SUSPECT, "primary_alive": False,
               "primary_lost_since": 0.0}
    d = decide(view(**suspect, command=Command.SWITCHOVER))
    assert (d.next_state, d.refused, d.keeps_command, d.consumes_command) == (
        State.FENCING, False, True, False)
    d = decide(view(**suspect, command=Command.FAILOVER))
    assert (d.next_state, d.keeps_command, d.consumes_command) == (State.FENCING, False, True)
    d = decide(view(state=State.FENCING, step_done=True, command=Command.SWITCHOVER))
    assert (d.next_state, d.refused, d.consumes_command) == (State.PROMOTING, True, True)
    assert "switchover refused: an operation is in progress (fencing)" in d.message
    # a failover asked while a switchover prepares is not the drain that follows
    d = decide(view(state=State.PREPARING, step_done=True, switchover=True,
                    command=Command.FAILOVER))
    assert (d.next_state, d.refused) == (State.DRAINING, True)
    assert "failover refused: an operation is in progress (preparing)" in d.message
    # asked mid-resync (refused there, even forced): refused although blocked would take it,
    # and the message says to ask again (a half-overwritten replica is not promoted on a
    # request made where that was refused)
    d = decide(view(state=State.RESYNCING, primary_alive=False, primary_lost_since=0.0,
                    command=Command.FORCE_FAILOVER))
    assert (d.next_state, d.refused, d.keeps_command) == (State.BLOCKED, True, False)
    assert d.message.endswith("force_failover refused: the replica is mid-resync; the service "
                              "is blocked now: ask again if it still applies"), d.message


def test_draining_carries_out_a_failover_request() -> None:
    for cmd in (Command.FAILOVER, Command.FORCE_FAILOVER):
        d = decide(view(state=State.DRAINING, replica_lag_seconds=4.0, command=cmd))
        assert (d.next_state, d.action) == (State.FENCING, Action.FENCE)


def test_primary_lost_while_draining_takes_the_failover_path() -> None:
    d = decide(view(state=State.DRAINING, primary_alive=False, primary_lost_since=999.0,
                    barrier=True, replica_lag_seconds=0.0))
    assert (d.next_state, d.action) == (State.PRIMARY_SUSPECT, Action.WAIT)


@pytest.mark.parametrize("state", [State.FENCING, State.PROMOTING, State.REROUTING,
                                   State.RESYNCING])
def test_steps_time_out_into_failed(state: State) -> None:
    policy = Policy()
    limit = step_timeout(state, policy)
    assert limit is not None
    inside = decide(view(state=state, state_since=1000.0 - limit + 1, policy=policy))
    assert inside.next_state is state
    late = decide(view(state=state, state_since=1000.0 - limit - 1, policy=policy))
    assert (late.next_state, late.action) == (State.FAILED, Action.ALERT)
    assert f"{state} timed out after {limit:.0f}s waiting for" in late.message
    # a step that completed is not failed for having been slow
    if state is not State.RESYNCING:
        done = decide(view(state=state, state_since=0.0, step_done=True, policy=policy))
        assert done.next_state is not State.FAILED


def test_policy_step_timeouts() -> None:
    p = Policy()
    assert (p.fence_timeout_seconds, p.promote_timeout_seconds, p.reroute_timeout_seconds,
            p.resync_timeout_seconds) == (60, 120, 120, 3600)
    assert step_timeout(State.HEALTHY, p) is None
    assert step_timeout(State.FENCING, Policy(fence_timeout_seconds=5)) == 5


def test_retry_resumes_a_failed_resync_and_cancel_abandons() -> None:
    retry = decide(view(state=State.FAILED, command=Command.RETRY,
                        failed_step=State.RESYNCING))
    assert (retry.next_state, retry.action) == (State.RESYNCING, Action.RESYNC)
    for step in (State.FENCING, State.PROMOTING, State.REROUTING, State.RESYNCING, None):
        cancel = decide(view(state=State.FAILED, command=Command.CANCEL, failed_step=step))
        assert (cancel.next_state, cancel.action) == (State.HEALTHY, Action.NONE)
        assert "operation abandoned by an operator" in cancel.message
    unknown = decide(view(state=State.FAILED, command=Command.RETRY, failed_step=None))
    assert (unknown.next_state, unknown.action, unknown.refused) == (State.FAILED,
                                                                     Action.ALERT, True)
    waiting = decide(view(state=State.FAILED, failed_step=State.FENCING))
    assert (waiting.next_state, waiting.action) == (State.FAILED, Action.ALERT)


@pytest.mark.parametrize("state", [s for s in State if s is not State.FAILED])
@pytest.mark.parametrize("cmd", [Command.RETRY, Command.CANCEL])
def test_retry_and_cancel_outside_failed_are_refused(state: State, cmd: Command) -> None:
    v = view(state=state, command=cmd, primary_alive=True, protected=True)
    quiet = decide(dataclasses.replace(v, command=Command.NONE))
    d = decide(v)
    # refused and consumed; what the state does on its own goes on unchanged
    assert (d.next_state, d.action) == (quiet.next_state, quiet.action)
    if not d.changes:
        assert d.refused and d.consumes_command and f"{cmd} refused" in d.message


@pytest.mark.parametrize("state", [State.FENCING, State.PROMOTING, State.REROUTING,
                                   State.RESYNCING, State.FAILED_OVER, State.FAILED,
                                   State.PRIMARY_SUSPECT])
def test_commands_a_state_has_no_use_for_are_refused_not_left_pending(state: State) -> None:
    quiet = view(state=state, primary_alive=state is not State.PRIMARY_SUSPECT,
                 primary_lost_since=999.0, replica_alive=state is not State.FAILED_OVER,
                 failed_step=State.FENCING)
    for cmd in (Command.FAILOVER, Command.SWITCHOVER):
        d = decide(dataclasses.replace(quiet, command=cmd))
        assert d.next_state is state and d.refused and d.consumes_command
        assert d.action is decide(quiet).action  # a step in progress is still carried out


def test_resync_done_only_when_step_done() -> None:
    d = decide(view(state=State.RESYNCING, protected=True))  # the controller decides "done"
    assert d.next_state is State.RESYNCING
    assert decide(view(state=State.RESYNCING, step_done=True)).next_state is State.HEALTHY


def test_primary_lost_mid_resync_blocks_and_only_force_promotes() -> None:
    d = decide(view(state=State.RESYNCING, primary_alive=False, primary_lost_since=999.0))
    assert (d.next_state, d.action) == (State.BLOCKED, Action.BLOCK)
    blocked = view(state=State.BLOCKED, primary_alive=False, replica_lag_seconds=0.0,
                   replica_consistent=False)
    auto = decide(blocked)  # lag is fine and policy automatic, but the replica is mid-resync
    assert (auto.next_state, auto.action) == (State.BLOCKED, Action.BLOCK)
    manual = decide(dataclasses.replace(blocked, command=Command.FAILOVER))
    assert (manual.next_state, manual.refused) == (State.BLOCKED, True)
    forced = decide(dataclasses.replace(blocked, command=Command.FORCE_FAILOVER))
    assert (forced.next_state, forced.action) == (State.FENCING, Action.FENCE)
    suspect = decide(view(state=State.PRIMARY_SUSPECT, primary_alive=False,
                          primary_lost_since=990.0, replica_consistent=False))
    assert suspect.next_state is State.BLOCKED


def test_an_automatic_failover_stops_when_the_primary_comes_back_before_the_fence() -> None:
    prep = view(state=State.PREPARING, automatic=True)  # the primary has a heartbeat again
    for v in (prep, dataclasses.replace(prep, step_done=True),
              dataclasses.replace(prep, step_failed=True)):
        d = decide(v)
        assert (d.next_state, d.action) == (State.HEALTHY, Action.NONE), v
    still_gone = dataclasses.replace(prep, primary_alive=False, step_done=True)
    assert decide(still_gone).next_state is State.FENCING
    asked = dataclasses.replace(prep, automatic=False, step_done=True)  # an operator's request
    assert decide(asked).next_state is State.FENCING


def test_unprotected_is_not_a_protected_state() -> None:
    assert PROTECTED_STATES == {State.HEALTHY, State.DRAINING}


def test_messages_never_show_none_as_a_number() -> None:
    assert seconds(None) == "unknown" and seconds(1.25) == "1.2s"
    for v in (view(state=State.DRAINING, replica_lag_seconds=None),
              view(state=State.BLOCKED, primary_alive=False, replica_lag_seconds=None,
                   command=Command.FAILOVER),
              view(state=State.PRIMARY_SUSPECT, primary_alive=False, primary_lost_since=990.0,
                   replica_lag_seconds=None, policy=Policy(allow_data_loss=True)),
              view(protected=False, replica_lag_seconds=None)):
        assert "None" not in decide(v).message, decide(v).message


def test_every_row_is_reachable_from_decide() -> None:
    """Each row of the table is produced by at least one view above (no dead rows)."""
    views = [
        view(primary_alive=False), view(command=Command.FAILOVER),
        view(command=Command.SWITCHOVER), view(protected=False),
        view(state=State.UNPROTECTED, protected=True),
        view(state=State.UNPROTECTED, primary_alive=False),
        view(state=State.UNPROTECTED, command=Command.FAILOVER),
        view(state=State.PRIMARY_SUSPECT),
        view(state=State.PRIMARY_SUSPECT, primary_alive=False, primary_lost_since=990.0),
        view(state=State.PRIMARY_SUSPECT, primary_alive=False, primary_lost_since=990.0,
             replica_alive=False),
        view(state=State.BLOCKED), view(state=State.BLOCKED, primary_alive=False),
        view(state=State.PRIMARY_SUSPECT, protected=False),
        view(state=State.BLOCKED, protected=False),
        view(state=State.DRAINING, barrier=True, replica_lag_seconds=0.0),
        view(state=State.DRAINING, state_since=0.0),
        view(state=State.DRAINING, primary_alive=False),
        *[view(state=s, step_done=True) for s in (State.FENCING, State.PROMOTING,
                                                  State.REROUTING, State.RESYNCING)],
        *[view(state=s, state_since=-1e6) for s in (State.FENCING, State.PROMOTING,
                                                    State.REROUTING, State.RESYNCING)],
        *[view(state=State.FAILED, command=Command.RETRY, failed_step=s)
          for s in (State.FENCING, State.PROMOTING, State.REROUTING, State.RESYNCING)],
        view(state=State.FAILED, command=Command.CANCEL),
        view(state=State.FAILED_OVER), view(state=State.RESYNCING, primary_alive=False),
        # a runbook with prechecks: every start goes through them
        view(command=Command.FAILOVER, prepare=True),
        view(state=State.UNPROTECTED, command=Command.FAILOVER, prepare=True),
        view(state=State.PRIMARY_SUSPECT, primary_alive=False, primary_lost_since=990.0,
             prepare=True),
        view(state=State.BLOCKED, primary_alive=False, command=Command.FORCE_FAILOVER,
             prepare=True),
        view(state=State.PREPARING, step_done=True),
        view(state=State.PREPARING, step_done=True, switchover=True),
        view(state=State.PREPARING, step_failed=True),
        view(state=State.PREPARING, automatic=True),
        view(state=State.FAILED, command=Command.RETRY, failed_step=State.PREPARING),
    ]
    produced = {(d.state, d.next_state) for d in map(decide, views) if d.changes}
    assert produced == {(t.src, t.dst) for t in TRANSITIONS}


def test_rerouting_says_what_it_did() -> None:
    """The rerouting step of a service without DNS records changed nothing: its message does
    not say that every server answered the new address."""
    done = dict(state=State.REROUTING, step_done=True)
    with_dns = decide(view(**done))
    without = decide(view(**done, has_dns=False))
    assert with_dns.next_state is without.next_state is State.FAILED_OVER
    assert human(with_dns.message).endswith("the new address answered by every server")
    assert human(without.message).endswith("no DNS records to change")
    assert "answered" not in human(without.message)
